//! `marengo-export convert`: drives a checkpoint through the quantizer and the graph builder
//! into a bundle writer, one tensor at a time.
//!
//! Three steps: a [`Plan`] of what is written (the exported architecture, and the tensors the
//! bundle crate says a bundle of it stores, so that the daemon's check of the table is the
//! same list), a loop that reads, encodes and writes one checkpoint tensor at a time, then
//! the manifest.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use marengo_bundle::layout::{
    QuantizationError, Role, Scaled, StoredTensor, StoredWeight, stored_tensors,
};
use marengo_bundle::manifest::{
    Architecture, FORMAT, FORMAT_VERSION, GRAPH_FILE, Manifest, Provenance, QuantKind,
    Quantization, SourceFile, SpecialTokens, TOKENIZER_FILE,
};
use prost::Message;

use crate::checkpoint::{CheckpointError, CheckpointSource, TokenizerFiles};
use crate::graph;
use crate::progress::Progress;
use crate::quant::{self, Encoding, QuantError};
use crate::writer::{BundleWriter, WriteError};

/// The bundle's default context when neither the user nor a shorter `max_position_embeddings`
/// says otherwise: the design's on-device context. A run may choose any context up to the
/// model's maximum, which the bundle's rotary caches cover; this default keeps the KV cache a
/// plain start reserves from growing with the model's maximum.
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
    #[error("--context-length {requested}: must be between 1 and max_position_embeddings {max}")]
    ContextLength { requested: usize, max: usize },
    #[error("tensor {tensor}: --block {block} does not divide its {cols} input features")]
    Block {
        tensor: String,
        block: usize,
        cols: usize,
    },
    #[error(transparent)]
    Quantization(QuantizationError),
    #[error("--block applies to --dtype fp8 only")]
    BlockWithoutFp8,
    #[error("the checkpoint has no tokenizer.json")]
    NoTokenizer,
}

impl From<QuantizationError> for ConvertError {
    fn from(e: QuantizationError) -> Self {
        match e {
            QuantizationError::BlockSize {
                tensor,
                block,
                cols,
            } => ConvertError::Block {
                tensor,
                block,
                cols,
            },
            other => ConvertError::Quantization(other),
        }
    }
}

/// Converts `source` into a bundle at `opts.out`; returns the bundle's path: the plan, then
/// one tensor at a time through the quantizer into the writer, then the graph, the tokenizer
/// and the manifest.
pub fn convert(
    source: &dyn CheckpointSource,
    opts: &ConvertOptions,
) -> Result<PathBuf, ConvertError> {
    let plan = Plan::new(source, opts)?;
    let mut writer = BundleWriter::create(&opts.out, opts.force)?;
    let progress = Progress::new(source.total_tensor_bytes(), "converting");
    for weight in &plan.weights {
        let read = write_weight(source, &plan, weight, &mut writer)?;
        progress.advance(read);
    }
    progress.finish();

    let (cos, sin) = graph::rope_caches(&plan.arch);
    for (tensor, values) in plan.rope.iter().zip([cos, sin]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        writer.add_tensor(
            &tensor.name,
            tensor.dtype,
            &tensor.shape,
            &bytes,
            None,
            None,
        )?;
    }
    let model = graph::build(&plan.arch, writer.tensors(), env!("CARGO_PKG_VERSION"))?;
    writer.add_file(GRAPH_FILE, &model.encode_to_vec())?;
    writer.copy_file(TOKENIZER_FILE, &plan.tokenizer_json)?;
    let manifest = manifest(source, opts, plan)?;
    Ok(writer.finish(manifest)?)
}

/// What will be written, decided before anything is: the exported architecture and
/// quantization, and the bundle crate's list of stored tensors in the checkpoint's order.
struct Plan {
    arch: Architecture,
    quantization: Quantization,
    encoding: Encoding,
    /// The checkpoint's tensors the model uses, in the checkpoint's order (the bundle's order,
    /// so that a bundle is as reproducible as its source).
    weights: Vec<StoredWeight>,
    rope: [StoredTensor; 2],
    tokenizer: TokenizerFiles,
    tokenizer_json: PathBuf,
}

impl Plan {
    fn new(source: &dyn CheckpointSource, opts: &ConvertOptions) -> Result<Plan, ConvertError> {
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
        arch.context_length = context;
        arch.max_context_length = Some(max);
        arch.sliding_window = config.sliding_window;
        let encoding = match (opts.kind, opts.block) {
            (QuantKind::Fp8E4m3fn, block) => Encoding::Fp8 { block },
            (_, Some(_)) => return Err(ConvertError::BlockWithoutFp8),
            (QuantKind::F16, None) => Encoding::F16,
            (QuantKind::F32, None) => Encoding::F32,
        };
        let quantization = Quantization {
            kind: opts.kind,
            block_size: opts.block,
            head_residual: opts.head_residual && opts.kind == QuantKind::Fp8E4m3fn,
        };
        let tokenizer = source.tokenizer()?;
        let tokenizer_json = tokenizer
            .tokenizer_json
            .clone()
            .ok_or(ConvertError::NoTokenizer)?;
        if tokenizer.chat_template.is_none() {
            tracing::warn!(
                "the checkpoint has no chat template: the bundle serves Generate, and Chat is \
                 refused (a base model, or a GGUF written without tokenizer.chat_template; \
                 --chat-template FILE gives one)"
            );
        }
        if tokenizer.eos.is_empty() {
            tracing::warn!(
                "the checkpoint names no token that ends generation: answers run to max_tokens"
            );
        }

        let stored = stored_tensors(&arch, &quantization)?;
        let names = source.tensor_names();
        let present: HashSet<&str> = names.iter().map(String::as_str).collect();
        if let Some(missing) = stored
            .weights
            .iter()
            .find(|w| !present.contains(w.source.name.as_str()))
        {
            return Err(CheckpointError::MissingTensor {
                tensor: missing.source.name.clone(),
                file: None,
            }
            .into());
        }
        let mut by_name: HashMap<String, StoredWeight> = stored
            .weights
            .into_iter()
            .map(|w| (w.source.name.clone(), w))
            .collect();
        let mut weights = Vec::with_capacity(by_name.len());
        for name in &names {
            match by_name.remove(name) {
                Some(weight) => weights.push(weight),
                None => tracing::warn!(tensor = %name, "not part of the exported model; skipped"),
            }
        }
        Ok(Plan {
            arch,
            quantization,
            encoding,
            weights,
            rope: stored.rope,
            tokenizer,
            tokenizer_json,
        })
    }
}

/// Reads one checkpoint tensor, encodes it as planned and writes it with its scales (and the
/// head's residual); returns the bytes read, for the progress.
fn write_weight(
    source: &dyn CheckpointSource,
    plan: &Plan,
    weight: &StoredWeight,
    writer: &mut BundleWriter,
) -> Result<u64, ConvertError> {
    let want = &weight.source;
    let name = &want.name;
    let tensor = source.tensor(name)?;
    if tensor.shape != want.shape {
        return Err(ConvertError::Shape {
            tensor: name.clone(),
            file: tensor.file.clone(),
            expected: want.shape.clone(),
            actual: tensor.shape.clone(),
        });
    }
    let stored = &weight.stored.tensor;
    if matches!(want.role, Role::Norm | Role::Bias) {
        let data = quant::norm_to_f32(name, tensor.dtype, &tensor.bytes)?;
        writer.add_tensor(name, stored.dtype, &stored.shape, &data, None, None)?;
        return Ok(tensor.bytes.len() as u64);
    }
    let (rows, cols) = (want.shape[0], want.shape[1]);
    let encoded = quant::encode(name, tensor.dtype, &tensor.bytes, rows, cols, plan.encoding)?;
    tracing::info!(tensor = %name, rel_rms_error = encoded.rel_rms_error, "encoded");
    add_scaled(writer, &weight.stored, &encoded)?;
    if let Some(residual) = &weight.residual {
        let encoded_residual = quant::fp8_residual(
            name,
            tensor.dtype,
            &tensor.bytes,
            rows,
            cols,
            &encoded,
            plan.quantization.block_size,
        )?;
        tracing::info!(
            tensor = %name,
            rel_rms_error = encoded_residual.rel_rms_error,
            "encoded with its residual"
        );
        add_scaled(writer, residual, &encoded_residual)?;
    }
    Ok(tensor.bytes.len() as u64)
}

/// Writes an encoded tensor and, for FP8, its scales next to it.
fn add_scaled(
    writer: &mut BundleWriter,
    planned: &Scaled,
    encoded: &quant::Encoded,
) -> Result<(), WriteError> {
    let tensor = &planned.tensor;
    writer.add_tensor(
        &tensor.name,
        tensor.dtype,
        &tensor.shape,
        &encoded.data,
        None,
        Some(encoded.rel_rms_error),
    )?;
    if let (Some(scale), Some(scales)) = (&planned.scale, &encoded.scales) {
        let bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        writer.add_tensor(
            &scale.name,
            scale.dtype,
            &scale.shape,
            &bytes,
            Some(&tensor.name),
            None,
        )?;
    }
    Ok(())
}

/// The manifest of the written bundle (the writer fills in files and tensors).
fn manifest(
    source: &dyn CheckpointSource,
    opts: &ConvertOptions,
    plan: Plan,
) -> Result<Manifest, ConvertError> {
    let sources = source
        .digests()?
        .into_iter()
        .map(|d| SourceFile {
            path: d.path.display().to_string(),
            size: d.size,
            sha256: d.sha256,
        })
        .collect();
    let tokenizer = plan.tokenizer;
    Ok(Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        architecture: plan.arch,
        quantization: plan.quantization,
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
    })
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
