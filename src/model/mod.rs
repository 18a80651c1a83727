//! From a bundle to a runnable tract plan.
//!
//! The loader starts from a [`Bundle`] that `Bundle::open` checked, decodes its graph,
//! rewrites the FP8 patterns into marengo ops over the mapped `model.weights`, bound from the
//! checked tensor table ([`rewrite`], [`fp8_ops`]), checks that every other initializer tract
//! will read agrees with the table too, cuts the LM head to the last position
//! ([`last_position`]), makes one op of the FP8 products that read the same input
//! ([`shared_input`]), lets tract-onnx parse the rest, and
//! applies tract-transformers' rewrites, which turn the graph's past→Concat→present KV
//! inputs and outputs into cache state held inside the plan's state: a decode step then
//! feeds only the new token, and the cache is never copied in or out.
//!
//! A run's context may be shorter than the bundle's maximum, which its rotary caches cover:
//! the loader reads only the rows of the caches that context can reach (tract copies an
//! initializer into the heap, and a 128k-position maximum is 64 MiB of caches), and sizes the
//! KV caches for it. A sliding window's mask, which the graph computes for other engines, is
//! disconnected: the attention op applies the manifest's window itself.

pub mod attention;
pub mod fp8_ops;
mod kv_cache;
pub mod last_position;
pub mod rewrite;
pub mod shared_input;

use marengo_bundle::Bundle;
use marengo_bundle::graph::WINDOW_MASK;
use marengo_bundle::layout::{ROPE_COS, ROPE_SIN};
use marengo_bundle::manifest::GRAPH_FILE;
use marengo_bundle::onnx::ExternalDataError;
use prost::Message;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{
    Expansion, InferenceOp, TractErrorContext, expand, format_err,
};

use fp8_ops::{Fp8Node, Fp8NodeKind, MappedFp8};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid ONNX protobuf: {source}")]
    Decode {
        path: String,
        source: prost::DecodeError,
    },
    #[error("{GRAPH_FILE}: {0}")]
    Rewrite(#[from] rewrite::RewriteError),
    #[error("{GRAPH_FILE}: {0}")]
    ExternalData(#[from] ExternalDataError),
    #[error("{GRAPH_FILE}: {0:#}")]
    Tract(TractError),
}

impl From<TractError> for ModelError {
    fn from(e: TractError) -> Self {
        ModelError::Tract(e)
    }
}

/// Which positions of a forward pass the plan computes logits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Logits {
    /// The last position only: all that generation samples from ([`last_position`]).
    #[default]
    LastPosition,
    /// Every position fed, as the bundle's graph states it: for scoring a text
    /// (`marengod perplexity`), at the price of the LM head's product for every token.
    EveryPosition,
}

/// A model ready to run: the optimised plan, shared by every session.
#[derive(Debug)]
pub struct Model {
    plan: Arc<TypedSimplePlan>,
    /// Number of FP8 weights served from the mapping (0 for an f32/f16 bundle).
    pub fp8_weights: usize,
    logits: Logits,
}

/// The per-conversation state of a [`Model`]: the plan's op states, KV caches included.
pub type ModelState = TypedSimpleState;

impl Model {
    /// Loads the bundle's graph, reading FP8 weights in place from its mapped
    /// `model.weights`, with KV caches for its default context, computing the `logits` asked
    /// for.
    pub fn load(bundle: &Bundle, logits: Logits) -> Result<Model, ModelError> {
        let context = bundle.manifest().architecture.context_length;
        Self::load_with_context(bundle, logits, context)
    }

    /// [`Model::load`] for a run of `context` positions, at most the bundle's maximum
    /// (`Architecture::run_context` chose it), attending over the bundle's sliding window when
    /// the context is longer.
    pub fn load_with_context(
        bundle: &Bundle,
        logits: Logits,
        context: usize,
    ) -> Result<Model, ModelError> {
        let onnx_path = bundle.graph_path();
        let bytes = std::fs::read(&onnx_path).map_err(|source| ModelError::Io {
            path: onnx_path.display().to_string(),
            source,
        })?;
        let mut proto =
            pb::ModelProto::decode(bytes.as_slice()).map_err(|source| ModelError::Decode {
                path: onnx_path.display().to_string(),
                source,
            })?;
        let bindings = rewrite::rewrite_fp8(&mut proto, bundle)?;
        let graph = proto.graph.as_mut().ok_or(rewrite::RewriteError::NoGraph)?;
        let external = Some(pb::tensor_proto::DataLocation::External as i32);
        for initializer in &graph.initializer {
            if initializer.data_location == external || !initializer.external_data.is_empty() {
                rewrite::external_tensor(bundle, initializer)?;
            }
        }
        cut_rotary_caches(graph, context)?;
        disconnect_window_mask(graph);
        let logits = match logits {
            Logits::LastPosition if !last_position::keep_last_position(graph) => {
                tracing::warn!(
                    "no LM head found before `logits`: every position's logits are computed"
                );
                Logits::EveryPosition
            }
            logits => logits,
        };
        shared_input::group_shared_inputs(graph);

        let mut onnx = tract_onnx::onnx();
        onnx.op_register
            .insert(rewrite::FP8_LINEAR, fp8_linear_node);
        onnx.op_register
            .insert(rewrite::FP8_GATHER, fp8_gather_node);
        let dir_str = bundle.dir().to_str().context("bundle path is not UTF-8")?;
        let parsed = onnx.parse(&proto, Some(dir_str))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(format_err!("unresolved inputs {:?}", parsed.unresolved_inputs).into());
        }
        let mut model = parsed.model;

        let mut attached = 0;
        for node in model.nodes_mut() {
            let Some(expansion) = node.op_as_mut::<Box<dyn Expansion>>() else {
                continue;
            };
            let Some(fp8) = expansion.as_any_mut().downcast_mut::<Fp8Node>() else {
                continue;
            };
            let weights = fp8
                .weight_names
                .iter()
                .map(|name| {
                    let binding = bindings
                        .get(name)
                        .with_context(|| format!("no FP8 binding for `{name}`"))?;
                    MappedFp8::new(
                        name,
                        bundle.weights().clone(),
                        binding.codes.clone(),
                        binding.scales.clone(),
                        binding.rows,
                        binding.cols,
                        binding.block,
                    )
                })
                .collect::<TractResult<Vec<_>>>()?;
            attached += weights.len();
            fp8.weights = weights;
        }

        let mut typed = model.into_typed()?;
        let detect = tract_onnx::tract_core::transform::get_transform("transformers_detect_all")?
            .context("tract-transformers is not linked")?;
        typed.transform(&*detect)?;
        let mut typed = typed.into_optimized()?;
        let window = bundle.manifest().architecture.sliding_window;
        attention::use_decode_attention(&mut typed, context, window.filter(|&w| w < context))?;
        let plan = TypedSimplePlan::new(typed)?;
        Ok(Model {
            plan,
            fp8_weights: attached,
            logits,
        })
    }

    /// The positions the plan computes logits for: [`Logits::EveryPosition`] also when the
    /// last-position cut was asked for but the graph's head was not recognised.
    pub fn logits(&self) -> Logits {
        self.logits
    }

    /// A fresh state: empty KV cache.
    pub fn new_state(&self) -> Result<ModelState, ModelError> {
        Ok(self.plan.spawn()?)
    }

    /// The optimised graph, for inspection and tests.
    pub fn typed_model(&self) -> &TypedModel {
        self.plan.model()
    }
}

/// Takes the sliding window's mask ([`WINDOW_MASK`]) off every `Attention`: the plan's
/// attention runs the window from the manifest ([`attention`]) over its own cache, in a form
/// tract fuses with the cache, and the mask's nodes, left without a consumer, are pruned.
fn disconnect_window_mask(graph: &mut pb::GraphProto) {
    for node in graph.node.iter_mut().filter(|n| n.op_type == "Attention") {
        if let Some(mask) = node.input.get_mut(3)
            && mask == WINDOW_MASK
        {
            mask.clear();
        }
    }
}

/// Makes the rotary caches' initializers (checked against the tensor table, `[max_context,
/// head_dim / 2]`) read their first `context` rows only.
fn cut_rotary_caches(graph: &mut pb::GraphProto, context: usize) -> Result<(), ModelError> {
    for cache in graph
        .initializer
        .iter_mut()
        .filter(|t| t.name == ROPE_COS || t.name == ROPE_SIN)
    {
        let rows = cache
            .dims
            .first()
            .map_or(0, |&d| usize::try_from(d).unwrap_or(0));
        if context > rows {
            return Err(
                format_err!("{}: {rows} positions, {context} asked for", cache.name).into(),
            );
        }
        let length = cache
            .external_data
            .iter_mut()
            .find(|entry| entry.key == "length")
            .with_context(|| format!("{}: no external data length", cache.name))?;
        let bytes: usize = length.value.parse().context("external data length")?;
        length.value = (bytes / rows * context).to_string();
        cache.dims[0] = context as i64;
    }
    Ok(())
}

fn fp8_node(
    kind: Fp8NodeKind,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let weight_names: Vec<String> = node.get_attr_vec(rewrite::WEIGHTS)?;
    let rows: Vec<usize> = node.get_attr_vec(rewrite::ROWS)?;
    let cols: usize = node.get_attr(rewrite::COLS)?;
    node.expect(
        !weight_names.is_empty() && rows.len() == weight_names.len(),
        "one row count per weight",
    )?;
    Ok((
        expand(Fp8Node {
            kind,
            weight_names,
            rows,
            cols,
            weights: Vec::new(),
        }),
        vec![],
    ))
}

fn fp8_linear_node(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    fp8_node(Fp8NodeKind::Linear, node)
}

fn fp8_gather_node(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    fp8_node(Fp8NodeKind::Gather, node)
}
