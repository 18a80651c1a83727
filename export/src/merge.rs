//! SLERP merges of two Mistral/Llama checkpoints, equal to what mergekit makes from the same
//! YAML, without Python: `marengo-export merge` writes the merged HuggingFace checkpoint, and
//! `marengo-export convert --merge` streams merged tensors straight into the FP8 converter.
//!
//! # Semantics, and where in mergekit each comes from
//!
//! Read from mergekit 0.1.5 (`merge_methods/slerp.py`, `merge_methods/base.py`,
//! `merge_methods/batching.py`, `plan.py`, `config.py`, `io/tasks.py`) and checked against its
//! output (`tests/python/make_merge_refs.py`, `export/tests/merge_matches_mergekit.rs`,
//! `export/tests/merge_coefficients_match_torch.rs`).
//!
//! - **Inputs.** Both tensors are converted to `dtype` when the config gives one (mergekit's
//!   loader casts on load), else kept in their own dtype (two different dtypes meet in f32,
//!   `torch.promote_types`).
//! - **Compute dtype.** Everything below is f32 (mergekit upcasts every non-f64 input to f32);
//!   the result is rounded once, to nearest-even, into the input dtype (`torch.empty_like` of
//!   the input receives it), then cast to `out_dtype` if the config gives one.
//! - **Angle.** Each tensor is flattened whole (mergekit merges one tensor per batch). Norms are
//!   computed per chunk of 2^20 elements and then as the norm of the chunk norms; a norm at or
//!   below `1e-8` becomes 1. The dot product is of normalised copies, `(a/‖a‖)·(b/‖b‖)`, summed
//!   per chunk and then over chunks, and clamped to [-1, 1]. Sums follow PyTorch's own
//!   (one-thread) order ([`torch_order`]), so these f32 values are mergekit's bit for bit.
//! - **Colinear pairs.** When `|cos θ| > 0.9995` (`dot_threshold`, compared in f32) the result
//!   is `(1 - t)·a + t·b`; otherwise `sin((1 - t)θ)/sin θ · a + sin(tθ)/sin θ · b` with
//!   `θ = acos(cos θ)`. `t` is rounded to f32 first and `1 - t` is taken in f32. The result is
//!   two rounded f32 products and a rounded sum (three separate torch kernels, no fused
//!   multiply-add). Where marengo and torch can differ: torch's f32 `acos` and `sin` come from
//!   MKL's vector library (Sleef without MKL), accurate to an ulp but not correctly rounded and
//!   not the same on every build; marengo rounds them correctly. When that moves a coefficient
//!   by an ulp, a handful of the tensor's elements round to the neighbouring bf16 value.
//! - **`t` over depth.** Within each slice, layer `i` of `n` sits at depth `i / (n - 1)` (depth
//!   1 when `n == 1`); a list of values is a gradient: depth `× (len - 1)` splits into an index
//!   and a fraction, and the two neighbouring values are blended linearly in f64.
//! - **Tensors outside the layers.** The embedding takes `t` at depth 0 with the first slice's
//!   parameters; the final norm and LM head take `t` at depth 0 too, with the last slice's (a
//!   gradient therefore gives them its first value). A tied LM head is not written: mergekit
//!   skips the optional `lm_head.weight` when no parent stores it.
//! - **Filters.** `t` may be a list of `{filter, value}`: the first entry whose `filter` is
//!   absent, `*`, or a substring of the output tensor's name decides (so `self_attn`, `mlp`,
//!   and a default entry last). When none matches, the top-level `parameters` are asked next;
//!   when nothing gives a `t`, the merge is refused.
//! - **Base.** `t = 0` is the base model and `t = 1` the other one; the merged checkpoint keeps
//!   the base's `config.json` (with `num_hidden_layers` and the dtype updated) and tokenizer.
//!
//! Deliberate differences: mergekit ignores unknown keys, per-model parameters and unknown
//! parameter names, and lets `t` extrapolate outside [0, 1]; marengo refuses all of these with an
//! error naming the key. mergekit's f32 sums of more than 32768 elements split across torch's
//! threads, so its own bits depend on the thread count; marengo follows the one-thread order.

pub mod config;
pub mod slerp;
pub mod source;
pub mod torch_order;
pub mod write;

pub use config::{MergeConfig, MergeConfigError};
pub use source::{MergeError, MergedCheckpoint, PlannedTensor};
pub use write::{DEFAULT_SHARD_BYTES, write_checkpoint};
