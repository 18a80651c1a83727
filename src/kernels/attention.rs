//! Attention of one decode step: each query head's single query against every cached key and
//! value of its key-value head, a softmax and a weighted sum of the values.
//!
//! tract's flash-attention kernel is built for blocks of queries: for a single query it still
//! walks the keys 32 at a time with a mask and two small packed matrix products per block, so a
//! decode step's attention cost grew with the position far faster than the keys it reads
//! (SmolLM2-135M fell from 98 to 21 tokens/s at position 1900). These kernels read each key and
//! value once per step.
//!
//! The queries that share a key-value head (grouped-query attention) are taken together, so each
//! key and value is read once per step rather than once per query head: on the 7B shape at
//! position 1024 that is 268 MB a token instead of 1 GB. The keys are split into tasks over the
//! kernels' pool, each with its own softmax maximum and sum, rescaled when the tasks are combined.
//!
//! As for the FP8 kernels, each instruction set has its own file, selected at run time
//! ([`Isa`]), and all are tested against one scalar reference ([`Isa::Scalar`], in f64).
//! [`Isa::Avx512`] and [`Isa::Avx512Bf16`] run the AVX2 kernel: the attention has no AVX-512
//! version of its own.

mod portable;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use super::{Isa, KernelError, pool};

/// The sizes of one decode step's attention. The queries are `[batch, query_heads, dim]`; the
/// keys and values `[batch, kv_heads, capacity, dim]`, row-major, of which positions
/// `start..len` of each head are attended: a cache with room for the whole context is read where
/// it lies, and a sliding window (Mistral) starts past the positions it has left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub query_heads: usize,
    /// Divides `query_heads`: each key-value head serves `query_heads / kv_heads` queries.
    pub kv_heads: usize,
    pub dim: usize,
    /// The first position attended: 0, or where a sliding window begins.
    pub start: usize,
    /// The end of the positions attended, past `start`.
    pub len: usize,
    /// Positions each head has room for.
    pub capacity: usize,
}

/// Keys per task of a decode step. Splitting the keys, not only the heads, keeps both cores
/// busy however few key-value heads a model has (SmolLM2 has 3); each task's keys and values
/// (256 × 128 f32 each on the 7B shape) stay in L2 while its queries pass over them.
const KEYS_PER_TASK: usize = 256;

/// An instruction set's [`Partial`] of `queries` (`[group, dim]`) over `keys` and `values`
/// (`[n, dim]`, n ≥ 1). Unsafe to call where the CPU lacks the instruction set.
type Kernel =
    unsafe fn(queries: &[f32], keys: &[f32], values: &[f32], dim: usize, scale: f32) -> Partial;

/// One task's share of a decode step, for each of its `group` queries: the largest score, the
/// sum of `exp(score - max)` and the values weighted by those, not yet divided by the sum.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// `out = softmax(scale · q · Kᵀ) · V` for each query head (see [`AttentionShape`] for the
/// layouts; `out` is laid out as the queries). The query is the last position, so no causal
/// mask applies.
pub fn decode(
    shape: AttentionShape,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    decode_with(Isa::best(), shape, queries, keys, values, scale, out)
}

/// [`decode`] with a chosen implementation.
pub fn decode_with(
    isa: Isa,
    shape: AttentionShape,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check(shape, queries, keys, values, out)?;
    if !isa.is_available() {
        return Err(KernelError::IsaUnavailable(isa));
    }
    let kernel: Kernel = match isa {
        Isa::Scalar => {
            scalar::decode(shape, queries, keys, values, scale, out);
            return Ok(());
        }
        Isa::Portable => portable::attend,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16 => avx2::attend,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::attend,
        _ => return Err(KernelError::IsaUnavailable(isa)),
    };
    // SAFETY: the CPU has the kernel's instruction set (checked above).
    unsafe { split(kernel, shape, queries, keys, values, scale, out) };
    Ok(())
}

fn check(
    shape: AttentionShape,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &[f32],
) -> Result<(), KernelError> {
    let AttentionShape {
        batch,
        query_heads,
        kv_heads,
        dim,
        start,
        len,
        capacity,
    } = shape;
    let empty = [batch, query_heads, kv_heads, dim, len].contains(&0);
    if empty || !query_heads.is_multiple_of(kv_heads) || len > capacity || start >= len {
        return Err(KernelError::AttentionShape(shape));
    }
    let query_elements = batch * query_heads * dim;
    let cache_elements = batch * kv_heads * capacity * dim;
    for (operand, expected, actual) in [
        ("attention queries", query_elements, queries.len()),
        ("attention keys", cache_elements, keys.len()),
        ("attention values", cache_elements, values.len()),
        ("attention output", query_elements, out.len()),
    ] {
        if actual != expected {
            return Err(KernelError::Operand {
                operand,
                expected,
                actual,
            });
        }
    }
    Ok(())
}

/// Runs `kernel` over tasks of at most [`KEYS_PER_TASK`] keys of one key-value head and combines
/// their partials.
///
/// # Safety
/// The CPU must have `kernel`'s instruction set; the operands must have passed [`check`].
unsafe fn split(
    kernel: Kernel,
    shape: AttentionShape,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let AttentionShape {
        batch,
        query_heads,
        kv_heads,
        dim,
        start,
        len,
        capacity,
    } = shape;
    let group = query_heads / kv_heads;
    let chunks = (len - start).div_ceil(KEYS_PER_TASK);
    let slots: Vec<OnceLock<Partial>> = (0..batch * kv_heads * chunks)
        .map(|_| OnceLock::new())
        .collect();
    pool::run(slots.len(), |task| {
        // Batch-major, so that the queries of a key-value head are consecutive.
        let (head, chunk) = (task / chunks, task % chunks);
        let first = head * capacity + start + chunk * KEYS_PER_TASK;
        let last = head * capacity + (start + (chunk + 1) * KEYS_PER_TASK).min(len);
        let rows = first * dim..last * dim;
        let head_queries = &queries[head * group * dim..(head + 1) * group * dim];
        // SAFETY: the CPU has the instruction set (caller).
        let partial =
            unsafe { kernel(head_queries, &keys[rows.clone()], &values[rows], dim, scale) };
        // Each task runs once, so its slot is empty.
        let _ = slots[task].set(partial);
    });
    let partials: Vec<Partial> = slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("every task ran"))
        .collect();
    out.fill(0.0);
    for (head_outputs, parts) in out.chunks_mut(group * dim).zip(partials.chunks(chunks)) {
        for (i, out) in head_outputs.chunks_mut(dim).enumerate() {
            let max = parts
                .iter()
                .map(|p| p.max[i])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for part in parts {
                let rescale = (part.max[i] - max).exp();
                total += part.sum[i] * rescale;
                portable::axpy(rescale, &part.out[i * dim..(i + 1) * dim], out);
            }
            out.iter_mut().for_each(|o| *o /= total);
        }
    }
}

/// The arithmetic a task is made of, which each instruction set provides.
trait Lanes {
    /// `Σ a[i] · b[i]`.
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// Replaces each score by `e^(score - max)` and returns their sum (`max` is the row's).
    fn softmax_numerators(row: &mut [f32], max: f32) -> f32;
    /// `y += a · x`.
    fn axpy(a: f32, x: &[f32], y: &mut [f32]);
}

/// [`Partial`] of `queries` (`[group, dim]`) over `keys` and `values` (`[n, dim]`, n ≥ 1), with
/// `L`'s arithmetic. Inlined into each instruction set's function, so that it is compiled for it.
#[inline(always)]
fn attend<L: Lanes>(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    dim: usize,
    scale: f32,
) -> Partial {
    let n = keys.len() / dim;
    let group = queries.len() / dim;
    // `[group, n]`: each key is loaded once and dotted with every query of the group.
    let mut scores = vec![0.0f32; group * n];
    for (j, key) in keys.chunks_exact(dim).enumerate() {
        for (i, query) in queries.chunks_exact(dim).enumerate() {
            scores[i * n + j] = L::dot(query, key) * scale;
        }
    }
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut sum = vec![0.0f32; group];
    for (i, row) in scores.chunks_exact_mut(n).enumerate() {
        max[i] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        sum[i] = L::softmax_numerators(row, max[i]);
    }
    let mut out = vec![0.0f32; group * dim];
    for (j, value) in values.chunks_exact(dim).enumerate() {
        for (i, out) in out.chunks_exact_mut(dim).enumerate() {
            L::axpy(scores[i * n + j], value, out);
        }
    }
    Partial { max, sum, out }
}
