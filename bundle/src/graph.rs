//! The graph contract: what `model.onnx` names and how it uses the weights, as far as the
//! exporter (which writes the graph) and the engine (which binds its inputs and outputs and
//! rewrites its FP8 patterns before tract parses it) must agree.
//!
//! ## Inputs and outputs
//!
//! Inputs `input_ids` and `position_ids`, int64 `[batch, sequence_length]`, and per layer
//! `past_key_values.{layer}.key` / `.value`, f32
//! `[batch, num_kv_heads, past_sequence_length, head_dim]`. Outputs `logits`, f32
//! `[batch, sequence_length, vocab_size]`, and per layer `present.{layer}.key` / `.value` over
//! `total_sequence_length`.
//!
//! ## The weight patterns the engine rewrites
//!
//! Weights stay `[out, in]` as HuggingFace stores them. An FP8 weight `W` is only ever used as
//!
//! - a linear layer: [`DEQUANTIZE_LINEAR`]`(W, W_scale)` → [`TRANSPOSE`]`(perm = [1, 0])` →
//!   [`MATMUL`]`(x, ·)`;
//! - the embedding lookup: [`DEQUANTIZE_LINEAR`]`(E, E_scale, axis = 0)` →
//!   [`GATHER`]`(·, input_ids, axis = 0)`;
//!
//! with the scale per row (`axis = 0`, scale `[rows]`) or per block along the row
//! (`axis = 1`, [`BLOCK_SIZE`], scale `[rows, cols / block]`). A tied embedding feeds both
//! patterns from one initializer. A head with its FP8 residual (`head_residual`) is used
//! twice, once per part: the two products (or lookups) of the same input are summed by one
//! [`ADD`], which for the head is the node producing [`LOGITS`].
//!
//! Every initializer lives in `model.weights`, and its `external_data` (`location`, `offset`,
//! `length`) repeats what the tensor table says; [`crate::Bundle::external_tensor`] checks that
//! the two agree.

/// ONNX IR version written (IR 10 is the first with opset 23's types).
pub const IR_VERSION: i64 = 10;
/// The default-domain opset the graph uses.
pub const OPSET: i64 = 23;

/// Token ids, int64 `[batch, sequence_length]`.
pub const INPUT_IDS: &str = "input_ids";
/// Absolute positions of those tokens, int64 `[batch, sequence_length]`.
pub const POSITION_IDS: &str = "position_ids";
/// Next-token logits, f32 `[batch, sequence_length, vocab_size]`.
pub const LOGITS: &str = "logits";
/// A sliding window's additive mask, f32 `[batch, 1, sequence_length, total_sequence_length]`
/// (0 where a query at position `p` sees the key at `j`: `0 ≤ p − j < sliding_window`, −∞
/// elsewhere), computed in the graph from `position_ids` and the past's length and given to
/// every `Attention` as `attn_mask`. Only bundles whose `sliding_window` is shorter than their
/// maximum context have it; the engine, which runs the window itself from the manifest,
/// disconnects it.
pub const WINDOW_MASK: &str = "attention.window_mask";

/// Symbolic dimension: sequences in a batch.
pub const BATCH: &str = "batch";
/// Symbolic dimension: tokens fed in this step.
pub const SEQUENCE: &str = "sequence_length";
/// Symbolic dimension: tokens already in the KV cache.
pub const PAST_SEQUENCE: &str = "past_sequence_length";
/// Symbolic dimension: past plus new tokens.
pub const TOTAL_SEQUENCE: &str = "total_sequence_length";

/// Which half of a layer's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kv {
    Key,
    Value,
}

impl Kv {
    pub const BOTH: [Kv; 2] = [Kv::Key, Kv::Value];

    fn as_str(self) -> &'static str {
        match self {
            Kv::Key => "key",
            Kv::Value => "value",
        }
    }
}

/// The graph input `past_key_values.{layer}.key` or `.value`.
pub fn past_name(layer: usize, kv: Kv) -> String {
    format!("past_key_values.{layer}.{}", kv.as_str())
}

/// The graph output `present.{layer}.key` or `.value`.
pub fn present_name(layer: usize, kv: Kv) -> String {
    format!("present.{layer}.{}", kv.as_str())
}

/// Op types of the weight patterns (default ONNX domain).
pub const DEQUANTIZE_LINEAR: &str = "DequantizeLinear";
pub const TRANSPOSE: &str = "Transpose";
pub const MATMUL: &str = "MatMul";
pub const GATHER: &str = "Gather";
/// Sums the two parts of a weight stored with a residual.
pub const ADD: &str = "Add";

/// `DequantizeLinear`'s and `Gather`'s axis attribute.
pub const AXIS: &str = "axis";
/// `DequantizeLinear`'s block attribute, present for block scales.
pub const BLOCK_SIZE: &str = "block_size";
/// `Transpose`'s permutation attribute.
pub const PERM: &str = "perm";
/// The only transpose of a weight: `[out, in]` → `[in, out]`.
pub const TRANSPOSE_PERM: [i64; 2] = [1, 0];

/// `external_data` key: the file holding the bytes, always `model.weights`.
pub const EXTERNAL_LOCATION: &str = "location";
/// `external_data` key: byte offset in that file.
pub const EXTERNAL_OFFSET: &str = "offset";
/// `external_data` key: byte length.
pub const EXTERNAL_LENGTH: &str = "length";
