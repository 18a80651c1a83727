//! `Bundle::open` on a hand-made tiny bundle, then on broken copies of it.

use std::collections::BTreeMap;

use super::layout::{ROPE_COS, ROPE_SIN, Role, SCALE_SUFFIX};
use super::manifest::*;
use super::*;

/// Builds a consistent FP8 bundle for a tiny architecture in a fresh directory; the tensors'
/// bytes are their index, so that reads can be told apart.
fn write_bundle(edit: impl FnOnce(&mut Manifest)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let arch = Architecture {
        family: "llama".into(),
        hidden_size: 8,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        intermediate_size: 16,
        vocab_size: 10,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        context_length: 6,
        max_context_length: None,
        sliding_window: None,
        rope_scaling: None,
        attention_bias: false,
    };
    let mut tensors = Vec::new();
    let mut offset = 0u64;
    let mut push = |name: String, dtype: TensorDtype, shape: Vec<usize>, scale_of| {
        let length = shape.iter().product::<usize>() as u64 * dtype.size();
        tensors.push(TensorEntry {
            name,
            dtype,
            shape,
            offset,
            length,
            scale_of,
            rel_rms_error: None,
        });
        offset = (offset + length).next_multiple_of(TENSOR_ALIGNMENT);
    };
    for t in layout::expected_tensors(&arch) {
        if t.role == Role::Norm {
            push(t.name, TensorDtype::F32, t.shape, None);
        } else {
            let rows = t.shape[0];
            push(t.name.clone(), TensorDtype::Fp8E4m3fn, t.shape, None);
            push(
                format!("{}{SCALE_SUFFIX}", t.name),
                TensorDtype::F32,
                vec![rows],
                Some(t.name),
            );
        }
    }
    push(ROPE_COS.into(), TensorDtype::F32, vec![6, 2], None);
    push(ROPE_SIN.into(), TensorDtype::F32, vec![6, 2], None);
    let last = tensors.last().unwrap();
    let mut weights = vec![0u8; (last.offset + last.length) as usize];
    for (i, t) in tensors.iter().enumerate() {
        weights[t.offset as usize..(t.offset + t.length) as usize].fill(i as u8);
    }

    let mut files = BTreeMap::new();
    for (name, bytes) in [
        (GRAPH_FILE, b"onnx".to_vec()),
        (WEIGHTS_FILE, weights),
        (TOKENIZER_FILE, b"{}".to_vec()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let (size, sha256) = digest::sha256_file(&path).unwrap();
        files.insert(name.to_owned(), FileEntry { size, sha256 });
    }
    let mut manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        architecture: arch,
        quantization: Quantization {
            kind: QuantKind::Fp8E4m3fn,
            block_size: None,
            head_residual: false,
        },
        chat_template: None,
        special_tokens: SpecialTokens::default(),
        files,
        tensors,
        provenance: Provenance {
            sources: vec![],
            exporter_version: "test".into(),
            command_line: vec![],
            created: 0,
        },
    };
    edit(&mut manifest);
    std::fs::write(
        dir.path().join(MANIFEST_FILE),
        serde_json::to_string(&manifest).unwrap(),
    )
    .unwrap();
    dir
}

fn open_err(dir: &tempfile::TempDir) -> String {
    Bundle::open(dir.path()).unwrap_err().to_string()
}

#[test]
fn a_consistent_bundle_opens_and_maps_its_tensors() {
    let dir = write_bundle(|_| {});
    let bundle = Bundle::open(dir.path()).unwrap();
    bundle.verify_hashes().unwrap();
    let name = layout::layer_tensor(0, "self_attn.k_proj");
    let entry = bundle.tensor(&name).unwrap();
    assert_eq!(entry.shape, vec![4, 8]);
    let index = bundle
        .manifest()
        .tensors
        .iter()
        .position(|t| t.name == name)
        .unwrap();
    let bytes = bundle.tensor_bytes(&name).unwrap();
    assert_eq!(bytes.len(), 32);
    assert!(bytes.iter().all(|&b| b == index as u8));
    assert_eq!(bytes.as_ptr() as usize % TENSOR_ALIGNMENT as usize, 0);
}

#[test]
fn a_truncated_weights_file_is_refused() {
    let dir = write_bundle(|_| {});
    let path = dir.path().join(WEIGHTS_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let err = open_err(&dir);
    assert!(
        err.contains("model.weights") && err.contains("size"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let dir = write_bundle(|_| {});
    std::fs::remove_file(dir.path().join(TOKENIZER_FILE)).unwrap();
    assert!(open_err(&dir).contains("tokenizer.json"));
}

#[test]
fn malformed_manifest_is_refused() {
    let dir = write_bundle(|_| {});
    std::fs::write(dir.path().join(MANIFEST_FILE), "{\"format\": ").unwrap();
    let err = open_err(&dir);
    assert!(
        err.contains("bundle.json") && err.contains("manifest"),
        "{err}"
    );
}

#[test]
fn other_formats_and_versions_are_refused() {
    let dir = write_bundle(|m| m.format = "something-else".into());
    assert!(open_err(&dir).contains("something-else"));
    let dir = write_bundle(|m| m.format_version = 2);
    assert!(open_err(&dir).contains("format_version 2"));
}

#[test]
fn misaligned_tensor_is_refused() {
    let dir = write_bundle(|m| m.tensors[1].offset += 16);
    let name = layout::EMBEDDING.to_owned() + SCALE_SUFFIX;
    let err = open_err(&dir);
    assert!(
        err.contains(&name) && err.contains("multiple of 4096"),
        "{err}"
    );
}

#[test]
fn tensor_outside_the_weights_is_refused() {
    let dir = write_bundle(|m| {
        let last = m.tensors.last_mut().unwrap();
        last.offset += TENSOR_ALIGNMENT;
    });
    let err = open_err(&dir);
    assert!(err.contains(ROPE_SIN) && err.contains("outside"), "{err}");
}

#[test]
fn overlapping_tensors_are_refused() {
    let dir = write_bundle(|m| m.tensors[2].offset = m.tensors[0].offset);
    assert!(open_err(&dir).contains("overlaps"));
}

#[test]
fn shape_not_matching_the_architecture_is_refused() {
    let dir = write_bundle(|m| {
        let t = &mut m.tensors[0];
        t.shape = vec![8, 10];
    });
    let err = open_err(&dir);
    assert!(
        err.contains(layout::EMBEDDING) && err.contains("[10, 8]"),
        "{err}"
    );
}

#[test]
fn length_not_matching_the_shape_is_refused() {
    let dir = write_bundle(|m| m.tensors[0].length -= 1);
    assert!(open_err(&dir).contains("does not match shape"));
}

#[test]
fn a_missing_scale_is_named() {
    let scale = layout::layer_tensor(0, "mlp.up_proj") + SCALE_SUFFIX;
    let dir = write_bundle(|m| m.tensors.retain(|t| t.name != scale));
    let err = open_err(&dir);
    assert!(err.contains(&scale) && err.contains("missing"), "{err}");
}

#[test]
fn changed_content_of_the_same_size_fails_verification_only() {
    let dir = write_bundle(|_| {});
    std::fs::write(dir.path().join(TOKENIZER_FILE), b"[]").unwrap();
    let bundle = Bundle::open(dir.path()).unwrap();
    let err = bundle.verify_hashes().unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn an_architecture_the_graph_cannot_compute_is_refused_by_field() {
    let dir = write_bundle(|m| m.architecture.num_kv_heads = 3);
    let err = open_err(&dir);
    assert!(
        err.contains("num_kv_heads = 3") && err.contains("divide"),
        "{err}"
    );
    let dir = write_bundle(|m| m.architecture.head_dim = 3);
    let err = open_err(&dir);
    assert!(
        err.contains("head_dim = 3") && err.contains("even"),
        "{err}"
    );
}

#[test]
fn a_head_residual_outside_fp8_is_refused() {
    let dir = write_bundle(|m| {
        m.quantization.kind = QuantKind::F16;
        m.quantization.head_residual = true;
    });
    assert!(open_err(&dir).contains("head_residual"));
}

#[test]
fn external_data_must_agree_with_the_table() {
    let dir = write_bundle(|_| {});
    let bundle = Bundle::open(dir.path()).unwrap();
    let k = layout::layer_tensor(0, "self_attn.k_proj");
    let v = layout::layer_tensor(0, "self_attn.v_proj");
    let fp8 = onnx::DataType::Float8e4m3fn as i32;
    let external = |entry: &TensorEntry| {
        [
            ("location".to_owned(), WEIGHTS_FILE.to_owned()),
            ("offset".to_owned(), entry.offset.to_string()),
            ("length".to_owned(), entry.length.to_string()),
        ]
    };
    fn pairs(kv: &[(String, String); 3]) -> Vec<(&str, &str)> {
        kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
    let k_data = external(bundle.tensor(&k).unwrap());
    let v_data = external(bundle.tensor(&v).unwrap());

    let entry = bundle
        .external_tensor(&k, fp8, &[4, 8], pairs(&k_data))
        .unwrap();
    assert_eq!(entry.name, k);

    // k_proj's initializer pointing at v_proj's bytes (same shape, same length).
    let err = bundle
        .external_tensor(&k, fp8, &[4, 8], pairs(&v_data))
        .unwrap_err();
    assert!(
        matches!(&err, onnx::ExternalDataError::Disagrees { tensor, what: "offset", .. } if *tensor == k),
        "{err}"
    );
    let err = bundle
        .external_tensor(&k, fp8, &[8, 4], pairs(&k_data))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&k) && err.contains("shape"), "{err}");
    let err = bundle
        .external_tensor(&k, onnx::DataType::Float as i32, &[4, 8], pairs(&k_data))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&k) && err.contains("data_type"), "{err}");
    let err = bundle
        .external_tensor("not.a.tensor", fp8, &[4, 8], pairs(&k_data))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not.a.tensor") && err.contains("table"),
        "{err}"
    );
}

#[test]
fn the_stored_tensors_of_a_residual_head_with_block_scales() {
    let mut manifest_arch = None;
    write_bundle(|m| manifest_arch = Some(m.architecture.clone()));
    let arch = manifest_arch.unwrap();
    let quant = Quantization {
        kind: QuantKind::Fp8E4m3fn,
        block_size: Some(4),
        head_residual: true,
    };
    let stored = layout::stored_tensors(&arch, &quant).unwrap();
    let names: Vec<(&str, Option<&str>)> = stored
        .all()
        .map(|(t, of)| (t.name.as_str(), of))
        .filter(|(name, _)| name.starts_with("model.embed_tokens"))
        .collect();
    assert_eq!(
        names,
        [
            ("model.embed_tokens.weight", None),
            (
                "model.embed_tokens.weight_scale",
                Some("model.embed_tokens.weight")
            ),
            ("model.embed_tokens.weight.residual", None),
            (
                "model.embed_tokens.weight.residual_scale",
                Some("model.embed_tokens.weight.residual")
            ),
        ]
    );
    let scale = stored
        .all()
        .find(|(t, _)| t.name == "model.embed_tokens.weight.residual_scale")
        .unwrap()
        .0;
    assert_eq!(
        (scale.dtype, scale.shape.as_slice()),
        (TensorDtype::F32, &[10, 2][..])
    );

    let err = layout::stored_tensors(
        &arch,
        &Quantization {
            block_size: Some(3),
            ..quant
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            layout::QuantizationError::BlockSize {
                block: 3,
                cols: 8,
                ..
            }
        ),
        "{err}"
    );
}

/// A bundle written before the context was chosen at run time has no `max_context_length`:
/// its default context is its maximum. A run may choose up to the maximum, and no further.
#[test]
fn a_run_chooses_its_context_up_to_the_maximum() {
    let dir = write_bundle(|_| {});
    let manifest = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
    assert!(!manifest.contains("max_context_length"), "{manifest}");
    let bundle = Bundle::open(dir.path()).unwrap();
    let arch = &bundle.manifest().architecture;
    assert_eq!(arch.max_context(), 6);
    assert_eq!(arch.run_context(None), Ok(6));
    assert_eq!(arch.run_context(Some(3)), Ok(3));
    let err = arch.run_context(Some(7)).unwrap_err();
    assert_eq!(
        err,
        architecture::ContextError::BeyondMaximum {
            requested: 7,
            max: 6
        }
    );
    assert!(
        err.to_string().contains('7') && err.to_string().contains("maximum of 6"),
        "{err}"
    );
    assert_eq!(
        arch.run_context(Some(0)),
        Err(architecture::ContextError::Zero)
    );

    let mut longer = arch.clone();
    longer.context_length = 4;
    longer.max_context_length = Some(6);
    assert_eq!(longer.run_context(None), Ok(4));
    assert_eq!(longer.run_context(Some(6)), Ok(6));
    longer.max_context_length = Some(3);
    let err = longer.validate().unwrap_err();
    assert_eq!(err.field, architecture::ArchitectureField::MaxContextLength);
    assert!(err.to_string().contains("max_context_length = 3"), "{err}");
}
