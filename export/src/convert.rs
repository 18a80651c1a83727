//! `marengo-export convert`: drives a checkpoint through the quantizer and the graph builder
//! into a bundle writer, one tensor at a time.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use marengo_bundle::layout::{
    HEAD_RESIDUAL_SUFFIX, ROPE_COS, ROPE_SIN, Role, SCALE_SUFFIX, expected_tensors, head_tensor,
};
use marengo_bundle::manifest::{
    FORMAT, FORMAT_VERSION, GRAPH_FILE, Manifest, Provenance, QuantKind, Quantization, SourceFile,
    SpecialTokens, TOKENIZER_FILE, TensorDtype,
};
use prost::Message;

use crate::checkpoint::{CheckpointError, CheckpointSource};
use crate::graph;
use crate::progress::Progress;
use crate::quant::{self, Encoding, QuantError};
use crate::writer::{BundleWriter, WriteError};

/// Context exported when neither the user nor a shorter `max_position_embeddings` says
/// otherwise: the design's on-device context.
pub const DEFAULT_CONTEXT: usize = 4096;

/// What `convert` was asked to do.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub out: PathBuf,
    pub kind: QuantKind,
    /// FP8 scale block along the input dimension; `None` is one scale per output channel.
    pub block: Option<usize>,
    /// FP8: store the LM head as two FP8 tensors, the weight and its rounding error
    /// (`Quantization::head_residual`).
    pub head_residual: bool,
    pub context_length: Option<usize>,
    /// Replace a non-empty `out`.
    pub force: bool,
    /// The exporter's argv, for the manifest's provenance.
    pub command_line: Vec<String>,
}

/// Why a checkpoint could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Graph(#[from] graph::MissingTensor),
    #[error("tensor {tensor} in {file}: shape {actual:?}, but config.json calls for {expected:?}")]
    Shape {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error(
        "config.json: sliding_window {window} is shorter than the exported context {context}: \
         the graph attends over the whole context (pass --context-length {window})"
    )]
    SlidingWindow { window: usize, context: usize },
    #[error("--context-length {requested}: must be between 1 and max_position_embeddings {max}")]
    ContextLength { requested: usize, max: usize },
    #[error("--block applies to --dtype fp8 only")]
    BlockWithoutFp8,
    #[error("the checkpoint has no tokenizer.json")]
    NoTokenizer,
}

/// Converts `source` into a bundle at `opts.out`; returns the bundle's path.
pub fn convert(
    source: &dyn CheckpointSource,
    opts: &ConvertOptions,
) -> Result<PathBuf, ConvertError> {
    let config = source.config();
    let mut arch = config.architecture.clone();
    let max = config.max_position_embeddings;
    let context = opts.context_length.unwrap_or(max.min(DEFAULT_CONTEXT));
    if context == 0 || context > max {
        return Err(ConvertError::ContextLength {
            requested: context,
            max,
        });
    }
    if let Some(window) = config.sliding_window
        && window < context
    {
        return Err(ConvertError::SlidingWindow { window, context });
    }
    arch.context_length = context;
    let encoding = match (opts.kind, opts.block) {
        (QuantKind::Fp8E4m3fn, block) => Encoding::Fp8 { block },
        (_, Some(_)) => return Err(ConvertError::BlockWithoutFp8),
        (QuantKind::F16, None) => Encoding::F16,
        (QuantKind::F32, None) => Encoding::F32,
    };
    let stored = match opts.kind {
        QuantKind::Fp8E4m3fn => TensorDtype::Fp8E4m3fn,
        QuantKind::F16 => TensorDtype::F16,
        QuantKind::F32 => TensorDtype::F32,
    };
    let head_residual = opts.head_residual && opts.kind == QuantKind::Fp8E4m3fn;
    let tokenizer = source.tokenizer()?;
    let tokenizer_json = tokenizer
        .tokenizer_json
        .clone()
        .ok_or(ConvertError::NoTokenizer)?;

    let expected: HashMap<String, _> = expected_tensors(&arch)
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let names = source.tensor_names();
    let present: HashSet<&str> = names.iter().map(String::as_str).collect();
    if let Some(missing) = expected_tensors(&arch)
        .into_iter()
        .find(|t| !present.contains(t.name.as_str()))
    {
        return Err(CheckpointError::MissingTensor {
            tensor: missing.name,
            file: None,
        }
        .into());
    }
    for extra in names.iter().filter(|n| !expected.contains_key(*n)) {
        tracing::warn!(tensor = %extra, "not part of the exported model; skipped");
    }

    let mut writer = BundleWriter::create(&opts.out, opts.force)?;
    let progress = Progress::new(source.total_tensor_bytes(), "converting");
    for name in names.iter().filter(|n| expected.contains_key(*n)) {
        let want = &expected[name];
        let tensor = source.tensor(name)?;
        if tensor.shape != want.shape {
            return Err(ConvertError::Shape {
                tensor: name.clone(),
                file: tensor.file.clone(),
                expected: want.shape.clone(),
                actual: tensor.shape.clone(),
            });
        }
        if want.role == Role::Norm {
            let data = quant::norm_to_f32(name, tensor.dtype, &tensor.bytes)?;
            writer.add_tensor(name, TensorDtype::F32, &want.shape, &data, None, None)?;
        } else {
            let (rows, cols) = (want.shape[0], want.shape[1]);
            let encoded = quant::encode(name, tensor.dtype, &tensor.bytes, rows, cols, encoding)?;
            tracing::info!(tensor = %name, rel_rms_error = encoded.rel_rms_error, "encoded");
            writer.add_tensor(
                name,
                stored,
                &want.shape,
                &encoded.data,
                None,
                Some(encoded.rel_rms_error),
            )?;
            add_scales(&mut writer, name, &want.shape, &encoded, opts.block)?;
            if head_residual && name == head_tensor(&arch) {
                let residual = quant::fp8_residual(
                    name,
                    tensor.dtype,
                    &tensor.bytes,
                    rows,
                    cols,
                    &encoded,
                    opts.block,
                )?;
                let residual_name = format!("{name}{HEAD_RESIDUAL_SUFFIX}");
                tracing::info!(
                    tensor = %name,
                    rel_rms_error = residual.rel_rms_error,
                    "encoded with its residual"
                );
                writer.add_tensor(
                    &residual_name,
                    stored,
                    &want.shape,
                    &residual.data,
                    None,
                    Some(residual.rel_rms_error),
                )?;
                add_scales(
                    &mut writer,
                    &residual_name,
                    &want.shape,
                    &residual,
                    opts.block,
                )?;
            }
        }
        progress.advance(tensor.bytes.len() as u64);
    }
    progress.finish();

    let (cos, sin) = graph::rope_caches(&arch);
    let rope_shape = [arch.context_length, arch.head_dim / 2];
    for (name, values) in [(ROPE_COS, cos), (ROPE_SIN, sin)] {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        writer.add_tensor(name, TensorDtype::F32, &rope_shape, &bytes, None, None)?;
    }
    let model = graph::build(&arch, writer.tensors(), env!("CARGO_PKG_VERSION"))?;
    writer.add_file(GRAPH_FILE, &model.encode_to_vec())?;
    writer.copy_file(TOKENIZER_FILE, &tokenizer_json)?;

    let sources = source
        .digests()?
        .into_iter()
        .map(|d| SourceFile {
            path: d.path.display().to_string(),
            size: d.size,
            sha256: d.sha256,
        })
        .collect();
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        architecture: arch,
        quantization: Quantization {
            kind: opts.kind,
            block_size: opts.block,
            head_residual,
        },
        chat_template: tokenizer.chat_template,
        special_tokens: SpecialTokens {
            bos: tokenizer.bos,
            eos: tokenizer.eos,
            pad: tokenizer.pad,
            unk: tokenizer.unk,
        },
        files: Default::default(),
        tensors: Vec::new(),
        provenance: Provenance {
            sources,
            exporter_version: env!("CARGO_PKG_VERSION").into(),
            command_line: opts.command_line.clone(),
            created: created_at(),
        },
    };
    Ok(writer.finish(manifest)?)
}

/// Writes an FP8 tensor's scales, `[rows]` or `[rows, cols / block]`, next to it.
fn add_scales(
    writer: &mut BundleWriter,
    name: &str,
    shape: &[usize],
    encoded: &quant::Encoded,
    block: Option<usize>,
) -> Result<(), WriteError> {
    let Some(scales) = &encoded.scales else {
        return Ok(());
    };
    let (rows, cols) = (shape[0], shape[1]);
    let scale_shape = match block {
        None => vec![rows],
        Some(block) => vec![rows, cols / block],
    };
    let bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let scale_name = format!("{name}{SCALE_SUFFIX}");
    writer
        .add_tensor(
            &scale_name,
            TensorDtype::F32,
            &scale_shape,
            &bytes,
            Some(name),
            None,
        )
        .map(|_| ())
}

/// `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
fn created_at() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}
