//! Makes one op of the FP8 products that read the same input.
//!
//! A layer's q, k and v projections all read the normed hidden state, as do its gate and up
//! projections, and the LM head and its residual read the final one. Run as separate ops, a
//! decode step wakes the thread pool for each of them, and each matrix is cut into per-thread
//! slices of its own, the small k and v matrices into slivers. This pass merges each such set
//! of [`FP8_LINEAR`] nodes into one with an output per weight, in the order they had, which
//! [`super::fp8_ops::Fp8Linear`] runs as a single parallel product over all their rows.
//!
//! The merged node takes the place of the first of its set: the input is ready there, and every
//! consumer of the others came after them, so after it too.

use std::collections::HashMap;

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto};

use super::rewrite::{COLS, DOMAIN, FP8_LINEAR, ROWS, WEIGHTS};

/// Merges the FP8 linear nodes of each shared input; returns how many nodes were merged away.
pub fn group_shared_inputs(graph: &mut GraphProto) -> usize {
    let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, node) in graph.node.iter().enumerate() {
        if is_fp8_linear(node) {
            groups.entry(&node.input[0]).or_default().push(index);
        }
    }
    let groups: Vec<Vec<usize>> = groups
        .into_values()
        .filter(|members| members.len() > 1 && same_width(graph, members))
        .collect();
    let mut merged_away = vec![false; graph.node.len()];
    for members in &groups {
        let (&first, rest) = members.split_first().expect("a group has members");
        for &other in rest {
            let other = std::mem::take(&mut graph.node[other]);
            let node = &mut graph.node[first];
            for name in [WEIGHTS, ROWS] {
                let from = attribute(&other, name).cloned().unwrap_or_default();
                if let Some(to) = attribute_mut(node, name) {
                    to.strings.extend(from.strings);
                    to.ints.extend(from.ints);
                }
            }
            node.output.extend(other.output);
        }
        for &other in rest {
            merged_away[other] = true;
        }
    }
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !merged_away[index - 1]
    });
    groups.iter().map(|members| members.len() - 1).sum()
}

fn is_fp8_linear(node: &NodeProto) -> bool {
    node.domain == DOMAIN
        && node.op_type == FP8_LINEAR
        && node.input.len() == 1
        && node.output.len() == attribute(node, WEIGHTS).map_or(0, |a| a.strings.len())
        && node.output.len() == attribute(node, ROWS).map_or(0, |a| a.ints.len())
}

/// Products of one input have one row length; the check only keeps a malformed graph from
/// being merged into a node that the loader would then refuse for a different reason.
fn same_width(graph: &GraphProto, members: &[usize]) -> bool {
    let cols = |&index: &usize| attribute(&graph.node[index], COLS).map(|a| a.i);
    let first = cols(&members[0]);
    first.is_some() && members.iter().all(|m| cols(m) == first)
}

fn attribute<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attribute_mut<'n>(node: &'n mut NodeProto, name: &str) -> Option<&'n mut AttributeProto> {
    node.attribute.iter_mut().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rewrite;

    fn linear(input: &str, weight: &str, rows: i64) -> NodeProto {
        let output = vec![format!("{weight}.output")];
        let rows = usize::try_from(rows).expect("test rows are positive");
        rewrite::fp8_node(FP8_LINEAR, weight.into(), input, output, weight, rows, 64)
    }

    fn other(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn products_of_one_input_become_one_node_with_their_outputs_in_order() {
        let mut graph = GraphProto {
            node: vec![
                other("RMSNormalization", &["x"], "normed"),
                linear("normed", "q", 64),
                linear("normed", "k", 16),
                other("RotaryEmbedding", &["q.output"], "q.rope"),
                linear("normed", "v", 16),
                linear("attention", "o", 64),
            ],
            ..Default::default()
        };
        assert_eq!(group_shared_inputs(&mut graph), 2);
        let ops: Vec<&str> = graph.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(ops, ["normed", "q", "q.rope", "o"]);
        let qkv = &graph.node[1];
        assert_eq!(qkv.input, ["normed"]);
        assert_eq!(qkv.output, ["q.output", "k.output", "v.output"]);
        let names: Vec<&[u8]> = attribute(qkv, WEIGHTS)
            .expect("weights")
            .strings
            .iter()
            .map(Vec::as_slice)
            .collect();
        assert_eq!(names, [b"q".as_slice(), b"k", b"v"]);
        assert_eq!(attribute(qkv, ROWS).expect("rows").ints, [64, 16, 16]);
        assert_eq!(graph.node[3], linear("attention", "o", 64));
    }

    #[test]
    fn products_of_different_inputs_or_widths_stay_apart() {
        let mut wider = linear("normed", "wide", 8);
        attribute_mut(&mut wider, COLS).expect("cols").i = 128;
        let mut graph = GraphProto {
            node: vec![
                linear("a", "p", 8),
                linear("b", "q", 8),
                linear("normed", "narrow", 8),
                wider,
            ],
            ..Default::default()
        };
        let before = graph.clone();
        assert_eq!(group_shared_inputs(&mut graph), 0);
        assert_eq!(graph, before);
    }
}
