//! Every export variant (FP8 per channel and blocked, f16, f32; tied and untied; sharded and
//! single; bf16 and f32 sources) is a bundle the daemon accepts, and its `model.onnx` is the
//! graph `ARCHITECTURE.md` promises: names, symbolic dims, opset, external data, FP8 plumbing.

use std::collections::HashMap;
use std::path::Path;

use marengo_bundle::Bundle;
use marengo_bundle::manifest::{QuantKind, TENSOR_ALIGNMENT, TensorDtype};
use marengo_bundle::onnx::{AttributeProto, DataType, Dim, ModelProto, NodeProto};
use marengo_testkit::exporter::{convert, marengo_export, tiny_checkpoint};
use marengo_testkit::{repo_root, scratch_dir};
use prost::Message;

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn check_bundle(dir: &Path, kind: QuantKind, block: Option<usize>, tied: bool) {
    let bundle = Bundle::open(dir).unwrap();
    bundle.verify_hashes().unwrap();
    let manifest = bundle.manifest();
    let arch = &manifest.architecture;
    assert_eq!(manifest.quantization.kind, kind);
    assert_eq!(manifest.quantization.block_size, block);
    assert_eq!(arch.tie_word_embeddings, tied);
    assert_eq!(arch.context_length, 4096);
    assert_eq!(arch.max_context(), 4096);
    assert_eq!(arch.sliding_window, None);

    let bytes = std::fs::read(bundle.graph_path()).unwrap();
    let model = ModelProto::decode(bytes.as_slice()).unwrap();
    assert_eq!(model.ir_version, 10);
    assert_eq!(model.opset_import.len(), 1);
    assert_eq!(
        (
            model.opset_import[0].domain.as_str(),
            model.opset_import[0].version
        ),
        ("", 23)
    );
    let graph = model.graph.unwrap();

    // Inputs and outputs, with the engine's symbol names.
    let sym = |s: &str| Dim::Symbol(s.into());
    let kv = |len: &str| {
        vec![
            sym("batch"),
            Dim::Fixed(arch.num_kv_heads as i64),
            sym(len),
            Dim::Fixed(arch.head_dim as i64),
        ]
    };
    let mut inputs = vec![
        (
            "input_ids".to_owned(),
            (
                DataType::Int64 as i32,
                vec![sym("batch"), sym("sequence_length")],
            ),
        ),
        (
            "position_ids".to_owned(),
            (
                DataType::Int64 as i32,
                vec![sym("batch"), sym("sequence_length")],
            ),
        ),
    ];
    let mut outputs = vec![(
        "logits".to_owned(),
        (
            DataType::Float as i32,
            vec![
                sym("batch"),
                sym("sequence_length"),
                Dim::Fixed(arch.vocab_size as i64),
            ],
        ),
    )];
    for layer in 0..arch.num_layers {
        for kind in ["key", "value"] {
            inputs.push((
                format!("past_key_values.{layer}.{kind}"),
                (DataType::Float as i32, kv("past_sequence_length")),
            ));
            outputs.push((
                format!("present.{layer}.{kind}"),
                (DataType::Float as i32, kv("total_sequence_length")),
            ));
        }
    }
    let shapes = |values: &[marengo_bundle::onnx::ValueInfoProto]| {
        values
            .iter()
            .map(|v| (v.name.clone(), v.tensor_shape().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(shapes(&graph.input), inputs);
    assert_eq!(shapes(&graph.output), outputs);

    // Every initializer is external data matching the manifest's table, page aligned.
    assert_eq!(graph.initializer.len(), manifest.tensors.len());
    for init in &graph.initializer {
        assert!(init.raw_data.is_empty(), "{} has inline data", init.name);
        let entry = bundle.tensor(&init.name).unwrap();
        let location = init.external_location().unwrap().unwrap();
        assert_eq!(location.location, "model.weights");
        assert_eq!(
            (location.offset, location.length),
            (entry.offset, Some(entry.length))
        );
        assert_eq!(location.offset % TENSOR_ALIGNMENT, 0);
        let dims: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        assert_eq!(init.dims, dims, "{}", init.name);
        let expected_type = match entry.dtype {
            TensorDtype::Fp8E4m3fn => DataType::Float8e4m3fn,
            TensorDtype::F16 => DataType::Float16,
            TensorDtype::F32 => DataType::Float,
        };
        assert_eq!(init.data_type, expected_type as i32, "{}", init.name);
    }

    // Node inputs are all defined: graph inputs, initializers or earlier outputs (topological).
    let mut defined: Vec<String> = graph.input.iter().map(|v| v.name.clone()).collect();
    defined.extend(graph.initializer.iter().map(|t| t.name.clone()));
    defined.push(String::new());
    let mut count: HashMap<&str, usize> = HashMap::new();
    for node in &graph.node {
        for input in &node.input {
            assert!(
                defined.contains(input),
                "{} reads undefined {input}",
                node.name
            );
        }
        defined.extend(node.output.iter().cloned());
        *count.entry(node.op_type.as_str()).or_default() += 1;
    }
    for output in &outputs {
        assert!(
            defined.contains(&output.0),
            "output {} is never produced",
            output.0
        );
    }
    let layers = arch.num_layers;
    assert_eq!(count["RMSNormalization"], 2 * layers + 1);
    assert_eq!(count["RotaryEmbedding"], 2 * layers);
    assert_eq!(count["Attention"], layers);
    // FP8 bundles carry the head's rounding error as a second FP8 tensor by default: the LM
    // head is two products (and a tied embedding two lookups), summed.
    let residual = manifest.quantization.head_residual;
    assert_eq!(residual, kind == QuantKind::Fp8E4m3fn);
    let head_parts = 1 + usize::from(residual);
    let linears = 7 * layers + head_parts;
    assert_eq!(count["MatMul"], linears);
    assert_eq!(count["Transpose"], linears);
    assert_eq!(
        count.get("Gather").copied().unwrap_or(0),
        if tied { head_parts } else { 1 }
    );
    let head = if tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    assert_eq!(
        bundle.tensor(&format!("{head}.residual")).is_some(),
        residual
    );

    // Weight plumbing per kind; a tied LM head reuses the embedding's single dequantization.
    let weights = 7 * layers + 1 + usize::from(!tied) + usize::from(residual);
    match kind {
        QuantKind::Fp8E4m3fn => {
            assert_eq!(count["DequantizeLinear"], weights);
            for node in graph
                .node
                .iter()
                .filter(|n| n.op_type == "DequantizeLinear")
            {
                let axis = attr(node, "axis").and_then(|a| a.i);
                let block_size = attr(node, "block_size").and_then(|a| a.i);
                match block {
                    None => assert_eq!((axis, block_size), (Some(0), None), "{}", node.name),
                    Some(b) => assert_eq!((axis, block_size), (Some(1), Some(b as i64))),
                }
                assert_eq!(node.input[1], format!("{}_scale", node.input[0]));
            }
        }
        QuantKind::F16 => assert_eq!(count["Cast"], weights),
        QuantKind::F32 => {
            assert!(!count.contains_key("DequantizeLinear") && !count.contains_key("Cast"));
        }
    }
    let embedding_readers = graph
        .node
        .iter()
        .filter(|n| n.input.iter().any(|i| i == "model.embed_tokens.weight"))
        .count();
    // f32 has no conversion node: a tied embedding is read by Gather and the LM head directly.
    let expected_readers = if kind == QuantKind::F32 && tied { 2 } else { 1 };
    assert_eq!(embedding_readers, expected_readers);
    assert_eq!(bundle.tensor("lm_head.weight").is_some(), !tied);

    // Attention: causal, GQA head counts, present outputs wired to the graph outputs.
    for node in graph.node.iter().filter(|n| n.op_type == "Attention") {
        assert_eq!(attr(node, "is_causal").and_then(|a| a.i), Some(1));
        assert_eq!(
            attr(node, "q_num_heads").and_then(|a| a.i),
            Some(arch.num_heads as i64)
        );
        assert_eq!(
            attr(node, "kv_num_heads").and_then(|a| a.i),
            Some(arch.num_kv_heads as i64)
        );
        assert!(node.output[1].starts_with("present.") && node.input[4].starts_with("past_"));
    }
    for node in graph.node.iter().filter(|n| n.op_type == "RotaryEmbedding") {
        assert_eq!(attr(node, "interleaved").and_then(|a| a.i), Some(0));
        assert_eq!(
            node.input[1..],
            ["rope.cos_cache", "rope.sin_cache", "position_ids"]
        );
    }
}

/// Checks the rotary caches against their definition at a few positions.
fn check_rope(dir: &Path, theta: f64) {
    let bundle = Bundle::open(dir).unwrap();
    let arch = &bundle.manifest().architecture;
    let half = arch.head_dim / 2;
    let cos = bundle.tensor_bytes("rope.cos_cache").unwrap();
    let sin = bundle.tensor_bytes("rope.sin_cache").unwrap();
    let at =
        |bytes: &[u8], i: usize| f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    for position in [0usize, 1, 17, 4095] {
        for j in [0, 1, half - 1] {
            let angle = position as f64 * theta.powf(-2.0 * j as f64 / arch.head_dim as f64);
            let i = position * half + j;
            assert!((f64::from(at(cos, i)) - angle.cos()).abs() < 1e-6);
            assert!((f64::from(at(sin, i)) - angle.sin()).abs() < 1e-6);
        }
    }
}

#[test]
fn mistral_gqa_bf16_sharded_in_every_encoding() {
    let dir = scratch_dir("contract_mistral");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint(
        "mistral-gqa",
        &checkpoint,
        &["--dtype", "bf16", "--shards", "2"],
    );
    let cases: [(&str, &[&str], QuantKind, Option<usize>); 4] = [
        ("fp8", &[], QuantKind::Fp8E4m3fn, None),
        (
            "fp8-block",
            &["--block", "32"],
            QuantKind::Fp8E4m3fn,
            Some(32),
        ),
        ("f16", &["--dtype", "f16"], QuantKind::F16, None),
        ("f32", &["--dtype", "f32"], QuantKind::F32, None),
    ];
    for (name, args, kind, block) in cases {
        let bundle = dir.join(name);
        convert(&checkpoint, &bundle, args);
        check_bundle(&bundle, kind, block, false);
    }
    check_rope(&dir.join("f32"), 10_000.0);
}

#[test]
fn llama_tied_f32_single_file() {
    let dir = scratch_dir("contract_llama");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("llama-tied", &checkpoint, &["--dtype", "f32"]);
    for (name, args, kind) in [
        ("fp8", &[][..], QuantKind::Fp8E4m3fn),
        ("f32", &["--dtype", "f32"][..], QuantKind::F32),
    ] {
        let bundle = dir.join(name);
        convert(&checkpoint, &bundle, args);
        check_bundle(&bundle, kind, None, true);
    }
    check_rope(&dir.join("f32"), 500_000.0);
    let manifest = Bundle::open(dir.join("fp8")).unwrap().manifest().clone();
    assert_eq!(manifest.architecture.head_dim, 32);
    assert_eq!(manifest.special_tokens.bos, Some(1));
    assert_eq!(manifest.special_tokens.eos, vec![2]);
    let quantized: Vec<_> = manifest
        .tensors
        .iter()
        .filter(|t| t.dtype == TensorDtype::Fp8E4m3fn)
        .collect();
    assert!(quantized.iter().all(|t| {
        let err = t.rel_rms_error.unwrap();
        err > 0.0 && err < 0.05
    }));
}

#[test]
fn chat_template_and_special_tokens_come_from_the_checkpoint() {
    let dir = scratch_dir("contract_chat");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("mistral-gqa", &checkpoint, &["--dtype", "bf16"]);
    let tokenizer_config = repo_root().join("tests/fixtures/mistral-7b-v0.1/tokenizer_config.json");
    std::fs::copy(&tokenizer_config, checkpoint.join("tokenizer_config.json")).unwrap();
    // No ids in the model configs: they must come from the tokenizer's own token texts.
    std::fs::remove_file(checkpoint.join("generation_config.json")).unwrap();
    let config_path = checkpoint.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let object = config.as_object_mut().unwrap();
    object.remove("bos_token_id");
    object.remove("eos_token_id");
    std::fs::write(&config_path, config.to_string()).unwrap();

    let bundle = dir.join("bundle");
    convert(&checkpoint, &bundle, &[]);
    let manifest = Bundle::open(&bundle).unwrap().manifest().clone();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer_config).unwrap()).unwrap();
    assert_eq!(
        manifest.chat_template.as_deref(),
        expected["chat_template"].as_str()
    );
    // <s>, </s>, <unk> in the Mistral vocabulary.
    assert_eq!(manifest.special_tokens.bos, Some(1));
    assert_eq!(manifest.special_tokens.eos, vec![2]);
    assert_eq!(manifest.special_tokens.unk, Some(0));
    let sources: Vec<_> = manifest
        .provenance
        .sources
        .iter()
        .map(|s| {
            Path::new(&s.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(
        sources.contains(&"tokenizer_config.json".to_owned()),
        "{sources:?}"
    );
    assert!(
        sources.contains(&"model.safetensors".to_owned()),
        "{sources:?}"
    );
}

#[test]
fn chat_template_jinja_and_end_of_turn_tokens_come_from_the_checkpoint() {
    // A Llama 3.2 Instruct's tokenizer side: chat_template.jinja beside an older template in
    // tokenizer_config.json (transformers reads the file first), generation_config.json listing
    // <|end_of_text|> before the <|eot_id|> the tokenizer names as its EOS, and <|eom_id|>
    // named nowhere but ending a turn all the same.
    let dir = scratch_dir("contract_llama3_chat");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("llama-tied", &checkpoint, &["--dtype", "f32"]);
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join(name)).unwrap()).unwrap()
    };
    let mut tokenizer = read("tokenizer.json");
    let added = tokenizer["added_tokens"].as_array_mut().unwrap();
    for (id, content) in [
        (31997, "<|end_of_text|>"),
        (31998, "<|eom_id|>"),
        (31999, "<|eot_id|>"),
    ] {
        added.push(serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    let write = |name: &str, text: String| std::fs::write(checkpoint.join(name), text).unwrap();
    write("tokenizer.json", tokenizer.to_string());
    write(
        "tokenizer_config.json",
        serde_json::json!({
            "bos_token": "<s>", "eos_token": "<|eot_id|>", "chat_template": "{{ 'older' }}"
        })
        .to_string(),
    );
    write(
        "generation_config.json",
        serde_json::json!({"bos_token_id": 1, "eos_token_id": [31997, 31999]}).to_string(),
    );
    let template =
        std::fs::read_to_string(repo_root().join("tests/fixtures/text/llama-3.2-instruct.jinja"))
            .unwrap();
    write("chat_template.jinja", template.clone());

    let bundle = dir.join("bundle");
    convert(&checkpoint, &bundle, &["--dtype", "f32"]);
    let manifest = Bundle::open(&bundle).unwrap().manifest().clone();
    assert_eq!(manifest.chat_template.as_deref(), Some(template.as_str()));
    assert_eq!(manifest.special_tokens.eos, vec![31999, 31997, 31998]);
    assert!(
        manifest
            .provenance
            .sources
            .iter()
            .any(|s| s.path.ends_with("chat_template.jinja")),
        "the template file is not among the sources"
    );
}

#[test]
fn a_gguf_without_chat_template_takes_one_from_the_command_line() {
    let dir = scratch_dir("contract_gguf_chat_template");
    let gguf = repo_root().join("tests/fixtures/gguf/qwen2-bias.gguf");
    let template = repo_root().join("tests/fixtures/text/qwen2.5-instruct.jinja");
    let convert_gguf = |out: &Path, template: Option<&Path>| {
        let mut args = vec![
            "convert".into(),
            "--gguf".into(),
            gguf.clone().into_os_string(),
            "--out".into(),
            out.as_os_str().to_owned(),
            "--dtype".into(),
            "f32".into(),
        ];
        if let Some(template) = template {
            args.extend(["--chat-template".into(), template.as_os_str().to_owned()]);
        }
        marengo_export::<_, std::ffi::OsString>(args);
    };
    let plain = dir.join("plain");
    convert_gguf(&plain, None);
    let manifest = Bundle::open(&plain).unwrap().manifest().clone();
    assert_eq!(manifest.chat_template, None);

    let templated = dir.join("templated");
    convert_gguf(&templated, Some(&template));
    let manifest = Bundle::open(&templated).unwrap().manifest().clone();
    assert_eq!(
        manifest.chat_template,
        Some(std::fs::read_to_string(&template).unwrap())
    );
    assert!(
        manifest
            .provenance
            .sources
            .iter()
            .any(|s| s.path.ends_with("qwen2.5-instruct.jinja")),
        "the template file is not among the sources"
    );
    // The tiny Qwen2 vocabulary's <|im_end|> ends generation.
    assert_eq!(manifest.special_tokens.eos, vec![259]);
}
