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
//! from the graph. The byte ranges of those tensors in `model.weights` are returned, so
//! that the loader can attach the mapped bytes to the ops after parsing. A tied embedding
//! feeds both patterns from one initializer.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use tract_onnx::pb::{self, AttributeProto, GraphProto, NodeProto, TensorProto};

/// The ONNX domain of marengo's own ops in the rewritten (in-memory only) graph.
pub const DOMAIN: &str = "ai.marengo";
pub const FP8_LINEAR: &str = "MarengoFp8Linear";
pub const FP8_GATHER: &str = "MarengoFp8Gather";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RewriteError {
    #[error("model.onnx has no graph")]
    NoGraph,
    #[error("FP8 tensor `{tensor}`: {problem}")]
    Tensor { tensor: String, problem: String },
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

/// Rewrites every FP8 pattern of the model's main graph in place.
pub fn rewrite_fp8(model: &mut pb::ModelProto) -> Result<Fp8Bindings, RewriteError> {
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
        if dq.op_type != "DequantizeLinear" {
            continue;
        }
        let Some(weight) = dq.input.first().and_then(|w| initializers.get(w)) else {
            continue;
        };
        let binding = binding_for(graph, dq, weight)?;
        dropped_nodes.insert(dq_ix);
        dropped_initializers.insert(weight.name.clone());
        dropped_initializers.insert(dq.input[1].clone());
        let dq_out = &dq.output[0];
        for (use_ix, user) in consumers(graph, dq_out) {
            match user.op_type.as_str() {
                "Transpose" if transposes_2d(user) => {
                    dropped_nodes.insert(use_ix);
                    for (mm_ix, mm) in consumers(graph, &user.output[0]) {
                        if mm.op_type != "MatMul" || mm.input.get(1) != Some(&user.output[0]) {
                            return Err(unsupported(&weight.name, mm));
                        }
                        let node =
                            marengo_node(FP8_LINEAR, mm, &mm.input[0], &weight.name, &binding);
                        replacements.insert(mm_ix, node);
                    }
                }
                "Gather" if gathers_rows(user, dq_out) => {
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
    attr(node, "perm").is_none_or(|a| a.ints == [1, 0])
}

fn gathers_rows(node: &NodeProto, table: &str) -> bool {
    node.input.first().is_some_and(|t| t == table) && attr(node, "axis").is_none_or(|a| a.i == 0)
}

/// Reads the weight's and the scale's placement and checks the DequantizeLinear node's
/// attributes describe a per-row or a blocked-along-columns scale.
fn binding_for(
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
    let [rows, cols] = weight.dims[..] else {
        return Err(problem(format!(
            "rank {} (expected a matrix)",
            weight.dims.len()
        )));
    };
    let (rows, cols) = (dim(rows).map_err(&problem)?, dim(cols).map_err(&problem)?);
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
    let axis = attr(dq, "axis").map(|a| a.i).unwrap_or(1);
    let block = attr(dq, "block_size").map(|a| a.i).filter(|&b| b != 0);
    let block = match (axis, block, &scale.dims[..]) {
        (0, None, [n]) if *n as usize == rows => None,
        (1, Some(b), [n, nb]) if *n as usize == rows && b > 0 && (*nb * b) as usize == cols => {
            Some(b as usize)
        }
        _ => {
            return Err(problem(format!(
                "scale `{scale_name}` of shape {:?} with axis {axis} and block size {block:?} \
                 is neither per row nor blocked along columns",
                scale.dims
            )));
        }
    };
    let codes = external_range(weight).map_err(&problem)?;
    if codes.len() != rows * cols {
        return Err(problem(format!(
            "{} bytes for [{rows}, {cols}]",
            codes.len()
        )));
    }
    let scales = external_range(scale).map_err(&problem)?;
    Ok(Fp8Binding {
        codes,
        scales,
        rows,
        cols,
        block,
    })
}

fn dim(d: i64) -> Result<usize, String> {
    usize::try_from(d)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| format!("dimension {d}"))
}

/// The byte range of an initializer stored in `model.weights`.
fn external_range(t: &TensorProto) -> Result<Range<usize>, String> {
    let entry = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    match entry("location") {
        Some("model.weights") => {}
        Some(other) => return Err(format!("external data in `{other}`, not model.weights")),
        None => return Err(format!("`{}` is not stored in model.weights", t.name)),
    }
    let number = |key: &str| -> Result<usize, String> {
        entry(key)
            .ok_or_else(|| format!("`{}` has no external data {key}", t.name))?
            .parse()
            .map_err(|e| format!("`{}` external data {key}: {e}", t.name))
    };
    let offset = number("offset")?;
    let length = number("length")?;
    let end = offset
        .checked_add(length)
        .ok_or_else(|| format!("`{}`: offset overflows", t.name))?;
    Ok(offset..end)
}

fn marengo_node(
    op_type: &str,
    replaced: &NodeProto,
    input: &str,
    weight: &str,
    binding: &Fp8Binding,
) -> NodeProto {
    let int = |name: &str, i: i64| AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    };
    NodeProto {
        name: replaced.name.clone(),
        op_type: op_type.into(),
        domain: DOMAIN.into(),
        input: vec![input.to_string()],
        output: replaced.output.clone(),
        attribute: vec![
            AttributeProto {
                name: "weight".into(),
                r#type: pb::attribute_proto::AttributeType::String as i32,
                s: weight.as_bytes().to_vec(),
                ..Default::default()
            },
            int("rows", binding.rows as i64),
            int("cols", binding.cols as i64),
        ],
        ..Default::default()
    }
}
