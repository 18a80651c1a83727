//! Rewrites the bundle's standard ONNX graph, before tract parses it, so that FP8 weights
//! are never materialised.
//!
//! tract-onnx fails on `FLOAT8E4M3FN` initializers and would copy them to the heap
//! anyway. The exporter writes each FP8 use as one of two standard patterns:
//!
//! - `DequantizeLinear(W, scale) → Transpose(perm=[1,0]) → MatMul(x, ·)`, a linear layer;
//! - `DequantizeLinear(E, scale, axis=0) → Gather(·, ids, axis=0)`, the embedding lookup;
//!
//! and this pass replaces each by one node of marengo's domain (`Fp8Linear(x)`,
//! `Fp8Gather(ids)`) naming the weight, and drops the FP8 initializers and their scales
//! from the graph. The patterns are the bundle crate's ([`marengo_bundle::graph`]), which the
//! exporter writes from. The byte ranges of those tensors in `model.weights` are returned, so
//! that the loader can attach the mapped bytes to the ops after parsing. A tied embedding
//! feeds both patterns from one initializer.
//!
//! The ranges come from the tensor table that [`Bundle::open`] checked, not from the graph:
//! an initializer whose `external_data` says otherwise is refused
//! ([`Bundle::external_tensor`]), so the kernels never read bytes the table does not vouch for.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use marengo_bundle::Bundle;
use marengo_bundle::graph::{
    AXIS, BLOCK_SIZE, DEQUANTIZE_LINEAR, GATHER, MATMUL, PERM, TRANSPOSE, TRANSPOSE_PERM,
};
use marengo_bundle::manifest::{GRAPH_FILE, TensorEntry, WEIGHTS_FILE};
use marengo_bundle::onnx::ExternalDataError;
use tract_onnx::pb::{self, AttributeProto, GraphProto, NodeProto, TensorProto};

/// The ONNX domain of marengo's own ops in the rewritten (in-memory only) graph.
pub const DOMAIN: &str = "ai.marengo";
pub const FP8_LINEAR: &str = "MarengoFp8Linear";
pub const FP8_GATHER: &str = "MarengoFp8Gather";
/// The attributes of marengo's FP8 nodes: the weights' names and row counts, one per output,
/// and their common row length.
pub const WEIGHTS: &str = "weights";
pub const ROWS: &str = "rows";
pub const COLS: &str = "cols";

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("{GRAPH_FILE} has no graph")]
    NoGraph,
    #[error("FP8 tensor `{tensor}`: {problem}")]
    Tensor { tensor: String, problem: String },
    #[error(transparent)]
    ExternalData(#[from] ExternalDataError),
    #[error(
        "FP8 tensor `{tensor}` is used by node `{node}` ({op}), which marengo cannot run from FP8"
    )]
    UnsupportedUse {
        tensor: String,
        node: String,
        op: String,
    },
}

/// Where an FP8 matrix and its scales lie in `model.weights`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Binding {
    pub codes: Range<usize>,
    pub scales: Range<usize>,
    pub rows: usize,
    pub cols: usize,
    pub block: Option<usize>,
}

/// The FP8 weights the rewritten graph refers to, by initializer name.
pub type Fp8Bindings = HashMap<String, Fp8Binding>;

const FLOAT8E4M3FN: i32 = pb::tensor_proto::DataType::Float8e4m3fn as i32;
const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;

/// Rewrites every FP8 pattern of the model's main graph in place; the weights are `bundle`'s.
pub fn rewrite_fp8(
    model: &mut pb::ModelProto,
    bundle: &Bundle,
) -> Result<Fp8Bindings, RewriteError> {
    let graph = model.graph.as_mut().ok_or(RewriteError::NoGraph)?;
    let initializers: HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == FLOAT8E4M3FN)
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    if initializers.is_empty() {
        return Ok(HashMap::new());
    }

    let mut bindings = Fp8Bindings::new();
    let mut dropped_nodes: HashSet<usize> = HashSet::new();
    let mut dropped_initializers: HashSet<String> = HashSet::new();
    let mut replacements: HashMap<usize, NodeProto> = HashMap::new();

    for (dq_ix, dq) in graph.node.iter().enumerate() {
        if dq.op_type != DEQUANTIZE_LINEAR {
            continue;
        }
        let Some(weight) = dq.input.first().and_then(|w| initializers.get(w)) else {
            continue;
        };
        let binding = binding_for(bundle, graph, dq, weight)?;
        dropped_nodes.insert(dq_ix);
        dropped_initializers.insert(weight.name.clone());
        dropped_initializers.insert(dq.input[1].clone());
        let dq_out = &dq.output[0];
        for (use_ix, user) in consumers(graph, dq_out) {
            match user.op_type.as_str() {
                TRANSPOSE if transposes_2d(user) => {
                    dropped_nodes.insert(use_ix);
                    for (mm_ix, mm) in consumers(graph, &user.output[0]) {
                        if mm.op_type != MATMUL || mm.input.get(1) != Some(&user.output[0]) {
                            return Err(unsupported(&weight.name, mm));
                        }
                        let node =
                            marengo_node(FP8_LINEAR, mm, &mm.input[0], &weight.name, &binding);
                        replacements.insert(mm_ix, node);
                    }
                }
                GATHER if gathers_rows(user, dq_out) => {
                    let node =
                        marengo_node(FP8_GATHER, user, &user.input[1], &weight.name, &binding);
                    replacements.insert(use_ix, node);
                }
                _ => return Err(unsupported(&weight.name, user)),
            }
        }
        bindings.insert(weight.name.clone(), binding);
    }

    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter(|(ix, _)| !dropped_nodes.contains(ix))
        .map(|(ix, node)| replacements.remove(&ix).unwrap_or(node))
        .collect();
    let still_used: HashSet<&String> = graph.node.iter().flat_map(|n| n.input.iter()).collect();
    let dropped: HashSet<String> = dropped_initializers
        .into_iter()
        .filter(|name| !still_used.contains(name))
        .collect();
    graph.initializer.retain(|t| !dropped.contains(&t.name));
    graph.input.retain(|i| !dropped.contains(&i.name));
    if !model.opset_import.iter().any(|o| o.domain == DOMAIN) {
        model.opset_import.push(pb::OperatorSetIdProto {
            domain: DOMAIN.into(),
            version: 1,
        });
    }
    Ok(bindings)
}

fn consumers<'g>(
    graph: &'g GraphProto,
    output: &'g str,
) -> impl Iterator<Item = (usize, &'g NodeProto)> {
    graph
        .node
        .iter()
        .enumerate()
        .filter(move |(_, n)| n.input.iter().any(|i| i == output))
}

fn unsupported(tensor: &str, node: &NodeProto) -> RewriteError {
    RewriteError::UnsupportedUse {
        tensor: tensor.to_string(),
        node: node.name.clone(),
        op: node.op_type.clone(),
    }
}

fn attr<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn transposes_2d(node: &NodeProto) -> bool {
    attr(node, PERM).is_none_or(|a| a.ints == TRANSPOSE_PERM)
}

fn gathers_rows(node: &NodeProto, table: &str) -> bool {
    node.input.first().is_some_and(|t| t == table) && attr(node, AXIS).is_none_or(|a| a.i == 0)
}

/// Reads the weight's and the scale's placement from the tensor table and checks the
/// DequantizeLinear node's attributes describe a per-row or a blocked-along-columns scale.
fn binding_for(
    bundle: &Bundle,
    graph: &GraphProto,
    dq: &NodeProto,
    weight: &TensorProto,
) -> Result<Fp8Binding, RewriteError> {
    let problem = |p: String| RewriteError::Tensor {
        tensor: weight.name.clone(),
        problem: p,
    };
    if dq.input.len() > 2 && !dq.input[2].is_empty() {
        return Err(problem("a zero point is not supported".into()));
    }
    let entry = stored(bundle, weight)?;
    let [rows, cols] = entry.shape[..] else {
        return Err(problem(format!(
            "rank {} (expected a matrix)",
            entry.shape.len()
        )));
    };
    let scale_name = dq
        .input
        .get(1)
        .ok_or_else(|| problem("no scale input".into()))?;
    let scale = graph
        .initializer
        .iter()
        .find(|t| &t.name == scale_name)
        .ok_or_else(|| problem(format!("scale `{scale_name}` is not an initializer")))?;
    if scale.data_type != FLOAT {
        return Err(problem(format!("scale `{scale_name}` is not f32")));
    }
    let scale_entry = stored(bundle, scale)?;
    let axis = attr(dq, AXIS).map(|a| a.i).unwrap_or(1);
    let block = attr(dq, BLOCK_SIZE).map(|a| a.i).filter(|&b| b != 0);
    let block = match (axis, block, &scale_entry.shape[..]) {
        (0, None, [n]) if *n == rows => None,
        (1, Some(b), [n, nb])
            if *n == rows && b > 0 && (*nb as i64).checked_mul(b) == Some(cols as i64) =>
        {
            Some(b as usize)
        }
        _ => {
            return Err(problem(format!(
                "scale `{scale_name}` of shape {:?} with axis {axis} and block size {block:?} \
                 is neither per row nor blocked along columns",
                scale_entry.shape
            )));
        }
    };
    let range = |name: &str| {
        bundle
            .tensor_range(name)
            .ok_or_else(|| problem(format!("`{name}` lies outside the mapped weights")))
    };
    Ok(Fp8Binding {
        codes: range(&weight.name)?,
        scales: range(scale_name)?,
        rows,
        cols,
        block,
    })
}

/// The table entry of an initializer that must live in `model.weights`, once the graph's
/// `external_data` agrees with it.
fn stored<'b>(bundle: &'b Bundle, t: &TensorProto) -> Result<&'b TensorEntry, RewriteError> {
    if t.data_location != Some(pb::tensor_proto::DataLocation::External as i32) {
        return Err(RewriteError::Tensor {
            tensor: t.name.clone(),
            problem: format!("is not stored in {WEIGHTS_FILE}"),
        });
    }
    Ok(external_tensor(bundle, t)?)
}

/// [`Bundle::external_tensor`] for a tract-onnx initializer.
pub fn external_tensor<'b>(
    bundle: &'b Bundle,
    t: &TensorProto,
) -> Result<&'b TensorEntry, ExternalDataError> {
    let entries = t
        .external_data
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()));
    bundle.external_tensor(&t.name, t.data_type, &t.dims, entries)
}

fn marengo_node(
    op_type: &str,
    replaced: &NodeProto,
    input: &str,
    weight: &str,
    binding: &Fp8Binding,
) -> NodeProto {
    let (name, output) = (replaced.name.clone(), replaced.output.clone());
    fp8_node(
        op_type,
        name,
        input,
        output,
        weight,
        binding.rows,
        binding.cols,
    )
}

/// A marengo FP8 node of one weight, in the form [`super::shared_input`] later groups.
pub(super) fn fp8_node(
    op_type: &str,
    name: String,
    input: &str,
    output: Vec<String>,
    weight: &str,
    rows: usize,
    cols: usize,
) -> NodeProto {
    NodeProto {
        name,
        op_type: op_type.into(),
        domain: DOMAIN.into(),
        input: vec![input.to_string()],
        output,
        attribute: vec![
            AttributeProto {
                name: WEIGHTS.into(),
                r#type: pb::attribute_proto::AttributeType::Strings as i32,
                strings: vec![weight.as_bytes().to_vec()],
                ..Default::default()
            },
            AttributeProto {
                name: ROWS.into(),
                r#type: pb::attribute_proto::AttributeType::Ints as i32,
                ints: vec![rows as i64],
                ..Default::default()
            },
            AttributeProto {
                name: COLS.into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: cols as i64,
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}
