//! Computes the logits of the last position only.
//!
//! The bundle's graph returns logits for every position it is fed, as an ONNX causal LM
//! does, but generation only ever samples from the last one: during a prefill chunk of 128
//! tokens, 127 rows of the LM head's product would be thrown away. The head is the widest
//! matrix of the model (32000 × 4096 for Mistral, 49152 × 576 for SmolLM2, a fifth of that
//! model's weights), so this pass slices the head's input to the last position before the
//! products. `logits` becomes `[batch, 1, vocab]`.
//!
//! The head is found from the graph's `logits` output, through the `Identity` the exporter
//! names it with: the node before is either the head's product (`MatMul` or marengo's FP8
//! linear, whatever the weight's dtype and whether it is tied to the embedding) or the `Add`
//! of the two products of a head with a residual. A graph of any other shape is left as it
//! is; it runs, only slower.

use marengo_bundle::graph::{ADD, LOGITS, MATMUL};

/// The op that only names a value, as the exporter's `logits` output is named.
const IDENTITY: &str = "Identity";
use tract_onnx::pb::{self, GraphProto, NodeProto, TensorProto};

use super::rewrite::FP8_LINEAR;

/// The head's input cut to the last position.
const LAST_HIDDEN: &str = "marengo.last_position.hidden";
const STARTS: &str = "marengo.last_position.starts";
const ENDS: &str = "marengo.last_position.ends";
const AXES: &str = "marengo.last_position.axes";

/// Slices the LM head's input to the last position; returns whether the graph had the
/// expected shape (and was changed).
pub fn keep_last_position(graph: &mut GraphProto) -> bool {
    let Some(heads) = head_products(graph) else {
        return false;
    };
    let hidden = graph.node[heads[0]].input[0].clone();
    for &head in &heads {
        graph.node[head].input[0] = LAST_HIDDEN.into();
    }
    graph.initializer.extend([
        int64_vector(STARTS, -1),
        int64_vector(ENDS, i64::MAX),
        int64_vector(AXES, 1),
    ]);
    let slice = NodeProto {
        name: "marengo.last_position".into(),
        op_type: "Slice".into(),
        input: vec![hidden, STARTS.into(), ENDS.into(), AXES.into()],
        output: vec![LAST_HIDDEN.into()],
        ..Default::default()
    };
    let first_head = *heads.iter().min().expect("at least one head product");
    graph.node.insert(first_head, slice);
    set_sequence_length_to_one(graph);
    true
}

/// The indices of the head's products, which all read the same hidden state.
fn head_products(graph: &GraphProto) -> Option<Vec<usize>> {
    let producer = |name: &str| {
        graph
            .node
            .iter()
            .position(|n| n.output.iter().any(|o| o == name))
    };
    let mut logits = producer(LOGITS)?;
    // Bounded, so that identities naming each other in a cycle leave the graph alone.
    for _ in 0..graph.node.len() {
        if graph.node[logits].op_type != IDENTITY {
            break;
        }
        logits = producer(graph.node[logits].input.first()?)?;
    }
    let heads = match graph.node[logits].op_type.as_str() {
        ADD => graph.node[logits]
            .input
            .iter()
            .map(|input| producer(input))
            .collect::<Option<Vec<_>>>()?,
        _ => vec![logits],
    };
    let is_product = |n: &NodeProto| n.op_type == MATMUL || n.op_type == FP8_LINEAR;
    let hidden = graph.node[heads[0]].input.first()?;
    heads
        .iter()
        .all(|&h| is_product(&graph.node[h]) && graph.node[h].input.first() == Some(hidden))
        .then_some(heads)
}

fn int64_vector(name: &str, value: i64) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![1],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: vec![value],
        ..Default::default()
    }
}

/// The declared shape of `logits` says [`SEQUENCE`](marengo_bundle::graph::SEQUENCE); it is
/// now 1.
fn set_sequence_length_to_one(graph: &mut GraphProto) {
    use pb::tensor_shape_proto::dimension::Value;
    let declared = graph
        .output
        .iter_mut()
        .find(|o| o.name == LOGITS)
        .and_then(|o| o.r#type.as_mut())
        .and_then(|t| match t.value.as_mut() {
            Some(pb::type_proto::Value::TensorType(tensor)) => tensor.shape.as_mut(),
            None => None,
        });
    if let Some(dim) = declared.and_then(|shape| shape.dim.get_mut(1)) {
        dim.value = Some(Value::DimValue(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use marengo_bundle::graph::{BATCH, SEQUENCE};
    use pb::tensor_shape_proto::{Dimension, dimension::Value};

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn graph(nodes: Vec<NodeProto>) -> GraphProto {
        let dim = |value| Dimension {
            value: Some(value),
            ..Default::default()
        };
        GraphProto {
            node: nodes,
            output: vec![pb::ValueInfoProto {
                name: LOGITS.into(),
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: pb::tensor_proto::DataType::Float as i32,
                        shape: Some(pb::TensorShapeProto {
                            dim: vec![
                                dim(Value::DimParam(BATCH.into())),
                                dim(Value::DimParam(SEQUENCE.into())),
                                dim(Value::DimValue(32)),
                            ],
                        }),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn sequence_dim(graph: &GraphProto) -> Option<Value> {
        match graph.output[0].r#type.as_ref()?.value.as_ref()? {
            pb::type_proto::Value::TensorType(t) => t.shape.as_ref()?.dim[1].value.clone(),
        }
    }

    #[test]
    fn a_head_with_a_residual_reads_the_last_position() {
        let mut g = graph(vec![
            node("RMSNormalization", &["x", "gamma"], "hidden"),
            node(FP8_LINEAR, &["hidden"], "head"),
            node(FP8_LINEAR, &["hidden"], "head.residual"),
            node("Add", &["head", "head.residual"], LOGITS),
        ]);
        assert!(keep_last_position(&mut g));
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            ["RMSNormalization", "Slice", FP8_LINEAR, FP8_LINEAR, "Add"]
        );
        assert_eq!(g.node[1].input[0], "hidden");
        assert_eq!(g.node[2].input, [LAST_HIDDEN]);
        assert_eq!(g.node[3].input, [LAST_HIDDEN]);
        assert_eq!(g.initializer.len(), 3);
        assert_eq!(sequence_dim(&g), Some(Value::DimValue(1)));
    }

    /// The exporter names the head's sum through an `Identity`.
    #[test]
    fn a_head_behind_the_output_identity_reads_the_last_position() {
        let mut g = graph(vec![
            node(FP8_LINEAR, &["hidden"], "head"),
            node(FP8_LINEAR, &["hidden"], "head.residual"),
            node("Add", &["head", "head.residual"], "head.sum"),
            node(IDENTITY, &["head.sum"], LOGITS),
        ]);
        assert!(keep_last_position(&mut g));
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Slice", FP8_LINEAR, FP8_LINEAR, "Add", IDENTITY]);
        assert_eq!(g.node[1].input, [LAST_HIDDEN]);
        assert_eq!(g.node[2].input, [LAST_HIDDEN]);
        assert_eq!(sequence_dim(&g), Some(Value::DimValue(1)));
    }

    #[test]
    fn an_f32_head_reads_the_last_position() {
        let mut g = graph(vec![
            node("Transpose", &["W"], "WT"),
            node(MATMUL, &["hidden", "WT"], LOGITS),
        ]);
        assert!(keep_last_position(&mut g));
        assert_eq!(g.node[1].op_type, "Slice");
        assert_eq!(g.node[2].input, [LAST_HIDDEN, "WT"]);
    }

    #[test]
    fn other_graphs_are_left_alone() {
        for nodes in [
            // Not a product.
            vec![node("Softmax", &["hidden"], LOGITS)],
            // Two products of different inputs.
            vec![
                node("MatMul", &["a", "W"], "p"),
                node("MatMul", &["b", "W"], "q"),
                node("Add", &["p", "q"], LOGITS),
            ],
            // No logits at all.
            vec![node("MatMul", &["a", "W"], "other")],
            // An identity of nothing a product made.
            vec![node(IDENTITY, &["hidden"], LOGITS)],
            // Identities naming each other.
            vec![
                node(IDENTITY, &["a"], LOGITS),
                node(IDENTITY, &[LOGITS], "a"),
            ],
        ] {
            let mut g = graph(nodes);
            let before = g.clone();
            assert!(!keep_last_position(&mut g));
            assert_eq!(g, before);
        }
    }
}
