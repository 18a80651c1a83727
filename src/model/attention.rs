//! Attention for a decode step, over the KV cache as it grows in place.
//!
//! tract-transformers fuses each layer's KV cache and attention into one stateful op
//! (`InPlaceKvSdpa`) that appends the new keys and values without copying the past, then
//! runs its flash-attention kernel. That kernel is built for blocks of queries: for a
//! single query it still walks the keys 32 at a time, allocating a mask and running two
//! small matrix products (with packing) per block, so a decode step's attention cost grew
//! with the position far faster than the keys it reads — SmolLM2-135M fell from 98 to 21
//! tokens/s at position 1900. A decode step is a dot product with every key, a softmax and
//! a weighted sum of the values, which this op does directly, reading each key and value
//! once. Prompt chunks (more than one query) keep tract's kernel.
//!
//! The cache itself is one anonymous mapping per layer and per keys/values, sized for the
//! bundle's whole context and never moved: the kernel hands out zero pages on first write,
//! so what is resident is what has been written. tract's in-place cache doubles its buffer
//! as it fills, and the allocator serves the doubled buffer from memory that earlier chunks
//! had touched: on the 7B shape at position 1040, 80 MiB beyond the keys and values
//! themselves were resident. The op keeps tract's state contract (state name, symbol
//! resolution), so the plan treats it as the op it replaces.

use memmap2::MmapMut;
use rayon::prelude::*;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::tract_ndarray::{ArrayView2, ArrayView4, Ix4, s};
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;
use tract_transformers::ops::flash_sdpa::FlashSdpaOp;
use tract_transformers::ops::inplace_kv_cache::InPlaceKvSdpa;

/// Replaces every `InPlaceKvSdpa` of the optimised model (with the sequence on axis 2, as the
/// bundle's graph has it) by [`DecodeAttention`] with room for `context` positions; returns how
/// many.
pub fn use_decode_attention(model: &mut TypedModel, context: usize) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let Some(fused) = model.node(id).op_as::<InPlaceKvSdpa>() else {
            continue;
        };
        if fused.axis != 2 {
            continue;
        }
        let op = DecodeAttention {
            fused: fused.clone(),
            context,
        };
        model.node_mut(id).op = Box::new(op);
        replaced += 1;
    }
    Ok(replaced)
}

/// `InPlaceKvSdpa` with a preallocated cache and a direct kernel for single-query steps (see
/// the module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeAttention {
    fused: InPlaceKvSdpa,
    /// Positions the cache has room for.
    context: usize,
}

impl Op for DecodeAttention {
    fn name(&self) -> StaticName {
        "MarengoDecodeAttention".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        self.fused.info()
    }
    op_as_typed_op!();
}

impl EvalOp for DecodeAttention {
    not_out_of_plan!();
    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(DecodeAttentionState {
            op: self.fused.clone(),
            k: KvBuffer::new(self.context),
            v: KvBuffer::new(self.context),
        })))
    }
}

impl TypedOp for DecodeAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.fused.output_facts(inputs)
    }
    as_op!();
}

#[derive(Clone, Debug)]
struct DecodeAttentionState {
    op: InPlaceKvSdpa,
    k: KvBuffer,
    v: KvBuffer,
}

impl OpState for DecodeAttentionState {
    fn init_tensor_fact(&self) -> Option<(String, TypedFact)> {
        Some((self.op.name.clone(), self.op.past_sequence_fact.clone()))
    }

    fn has_init_tensor_fact(&self) -> bool {
        true
    }

    fn resolve_symbols(&mut self, state: &mut TurnState) -> TractResult<()> {
        DynKeyValueCacheState::resolve_symbols(
            state,
            self.op.past_sequence_fact.clone(),
            self.k.valid_shape().as_ref().map(|shape| &shape[..]),
        )
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("the KV cache has no lane axis")
    }

    fn eval(
        &mut self,
        _ctx: &EvalContext,
        _op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        ensure!(
            matches!(inputs.len(), 3 | 4),
            "attention expects [Q, K_new, V_new] and an optional mask"
        );
        let dt = inputs[0].datum_type();
        self.k.push(inputs[1].cast_to::<f32>()?.as_ref())?;
        self.v.push(inputs[2].cast_to::<f32>()?.as_ref())?;
        let q = inputs[0].cast_to::<f32>()?;
        let q = q
            .to_plain_array_view::<f32>()?
            .into_dimensionality::<Ix4>()?;
        let k = self.k.view()?;
        let v = self.v.view()?;
        let out = if q.shape()[2] == 1 && inputs.len() == 3 {
            let scale = self
                .op
                .scale
                .unwrap_or((q.shape()[3] as f32).sqrt().recip());
            one_query(q, k, v, scale)?
        } else {
            ensure!(
                inputs.len() == 3,
                "an explicit attention mask is not supported"
            );
            let flash = FlashSdpaOp {
                causal: self.op.causal,
                scale: self.op.scale,
            };
            flash.flash_attention_gqa(q, k, v, None).into_tensor()
        };
        Ok(tvec!(out.cast_to_dt(dt)?.into_owned().into_tvalue()))
    }
}

/// Keys or values `[batch, heads, positions, dim]` in an anonymous mapping with room for
/// `capacity` positions, allocated at the first push (when the other sizes are known).
#[derive(Debug)]
struct KvBuffer {
    capacity: usize,
    map: Option<MmapMut>,
    /// `[batch, heads, capacity, dim]`.
    shape: [usize; 4],
    len: usize,
}

impl Clone for KvBuffer {
    /// A copy of the valid positions (tract clones states only to fork a session).
    fn clone(&self) -> Self {
        let mut copy = KvBuffer::new(self.capacity);
        if let Ok(view) = self.view() {
            copy.push_view(view)
                .expect("a copy fits where the original did");
        }
        copy
    }
}

impl KvBuffer {
    fn new(capacity: usize) -> Self {
        KvBuffer {
            capacity,
            map: None,
            shape: [0; 4],
            len: 0,
        }
    }

    fn push(&mut self, input: &Tensor) -> TractResult<()> {
        let view = input
            .to_plain_array_view::<f32>()?
            .into_dimensionality::<Ix4>()?;
        self.push_view(view)
    }

    fn push_view(&mut self, input: ArrayView4<f32>) -> TractResult<()> {
        let (batch, heads, new, dim) = input.dim();
        if self.map.is_none() {
            let bytes = batch * heads * self.capacity * dim * size_of::<f32>();
            self.map = Some(MmapMut::map_anon(bytes.max(1))?);
            self.shape = [batch, heads, self.capacity, dim];
        }
        ensure!(
            [batch, heads, dim] == [self.shape[0], self.shape[1], self.shape[3]],
            "KV cache of shape {:?} fed {:?}",
            self.shape,
            input.dim()
        );
        ensure!(
            self.len + new <= self.capacity,
            "KV cache full: {} + {new} positions exceed the context of {}",
            self.len,
            self.capacity
        );
        let map = self.map.as_mut().expect("allocated above");
        let data: &mut [f32] = bytemuck::cast_slice_mut(&mut map[..]);
        for b in 0..batch {
            for h in 0..heads {
                let first = ((b * heads + h) * self.capacity + self.len) * dim;
                let rows = &mut data[first..first + new * dim];
                for (row, source) in rows
                    .chunks_exact_mut(dim)
                    .zip(input.slice(s![b, h, .., ..]).rows())
                {
                    row.iter_mut().zip(source).for_each(|(r, s)| *r = *s);
                }
            }
        }
        self.len += new;
        Ok(())
    }

    fn valid_shape(&self) -> Option<[usize; 4]> {
        self.map.as_ref()?;
        let [batch, heads, _, dim] = self.shape;
        Some([batch, heads, self.len, dim])
    }

    fn view(&self) -> TractResult<ArrayView4<'_, f32>> {
        let map = self.map.as_ref().context("empty KV cache")?;
        let data: &[f32] = bytemuck::cast_slice(&map[..]);
        let [batch, heads, capacity, dim] = self.shape;
        let full = ArrayView4::from_shape((batch, heads, capacity, dim), data)?;
        Ok(full.slice_move(s![.., .., ..self.len, ..]))
    }
}

/// Keys per task of a decode step. Splitting the keys, not only the heads, keeps both cores
/// busy however few key-value heads a model has (SmolLM2 has 3); each task's keys and values
/// (256 × 128 f32 each on the 7B shape) stay in L2 while its queries pass over them.
const KEYS_PER_TASK: usize = 256;

/// Attention of one query per head (`q`: `[B, Hq, 1, D]`) over every cached key and value
/// (`[B, Hkv, L, D]`): the query is the last position, so the causal mask hides nothing.
///
/// The queries that share a key-value head (grouped-query attention) are taken together, so
/// each key and value is read once per step rather than once per query head: on the 7B shape
/// at position 1024 that is 268 MB a token instead of 1 GB. The keys are split into tasks,
/// each with its own softmax maximum and sum, rescaled when the tasks are combined.
fn one_query(
    q: ArrayView4<f32>,
    k: ArrayView4<f32>,
    v: ArrayView4<f32>,
    scale: f32,
) -> TractResult<Tensor> {
    let (batch, q_heads, _, dim) = q.dim();
    let (_, kv_heads, len, _) = k.dim();
    ensure!(kv_heads > 0 && q_heads % kv_heads == 0 && v.dim() == k.dim() && k.dim().3 == dim);
    let group = q_heads / kv_heads;
    let chunks = len.div_ceil(KEYS_PER_TASK).max(1);
    // `[B, Hq, D]` in order: the queries of one key-value head are consecutive.
    let queries: Vec<f32> = q.iter().copied().collect();
    let partials: Vec<Partial> = (0..batch * kv_heads * chunks)
        .into_par_iter()
        .map(|task| {
            let (b, kv_head, chunk) = (
                task / chunks / kv_heads,
                task / chunks % kv_heads,
                task % chunks,
            );
            let keys = chunk * KEYS_PER_TASK..((chunk + 1) * KEYS_PER_TASK).min(len);
            let first_query = (b * q_heads + kv_head * group) * dim;
            attend(
                &queries[first_query..first_query + group * dim],
                k.slice(s![b, kv_head, keys.clone(), ..]),
                v.slice(s![b, kv_head, keys, ..]),
                scale,
            )
        })
        .collect();
    let mut out = vec![0.0f32; batch * q_heads * dim];
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
                axpy(rescale, &part.out[i * dim..(i + 1) * dim], out);
            }
            out.iter_mut().for_each(|o| *o /= total);
        }
    }
    Tensor::from_shape(&[batch, q_heads, 1, dim], &out)
}

/// One task's share of a decode step, for each of its `group` queries: the largest score, the
/// sum of `exp(score - max)` and the values weighted by those, not yet divided by the sum.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// [`Partial`] of `queries` (`[group, D]`) over `keys` and `values` (`[n, D]`, n ≥ 1).
fn attend(queries: &[f32], keys: ArrayView2<f32>, values: ArrayView2<f32>, scale: f32) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        return unsafe { attend_avx2(queries, keys, values, scale) };
    }
    attend_portable(queries, keys, values, scale)
}

/// [`attend_portable`] compiled for AVX2, whose eight-lane vectors the lane loops of [`dot`]
/// and [`axpy`] fill exactly (the build's baseline, SSE2, has four).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn attend_avx2(
    queries: &[f32],
    keys: ArrayView2<f32>,
    values: ArrayView2<f32>,
    scale: f32,
) -> Partial {
    attend_portable(queries, keys, values, scale)
}

#[inline(always)]
fn attend_portable(
    queries: &[f32],
    keys: ArrayView2<f32>,
    values: ArrayView2<f32>,
    scale: f32,
) -> Partial {
    let (n, dim) = keys.dim();
    let group = queries.len() / dim;
    // The cache's rows are contiguous, so these borrow; other layouts (tests) are copied.
    let (keys, values) = (keys.as_standard_layout(), values.as_standard_layout());
    let keys = keys.as_slice().expect("standard layout");
    let values = values.as_slice().expect("standard layout");
    // `[group, n]`: each key is loaded once and dotted with every query of the group.
    let mut scores = vec![0.0f32; group * n];
    for (j, key) in keys.chunks_exact(dim).enumerate() {
        for (i, query) in queries.chunks_exact(dim).enumerate() {
            scores[i * n + j] = dot(query, key) * scale;
        }
    }
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut sum = vec![0.0f32; group];
    for (i, row) in scores.chunks_exact_mut(n).enumerate() {
        max[i] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|w| *w = exp(*w - max[i]));
        sum[i] = row.iter().sum();
    }
    let mut out = vec![0.0f32; group * dim];
    for (j, value) in values.chunks_exact(dim).enumerate() {
        for (i, out) in out.chunks_exact_mut(dim).enumerate() {
            axpy(scores[i * n + j], value, out);
        }
    }
    Partial { max, sum, out }
}

/// A dot product in independent lanes (four accumulators of eight), which the compiler turns
/// into vector code without waiting on one register's additions.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` for x ≤ 0 (a score minus the largest), in plain arithmetic that vectorizes: the
/// library's `expf` is a call per score, and at position 1900 those calls took most of
/// SmolLM2's attention time. Cephes' single-precision method: `x = n ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `e^r` (within 3 ulp of libm, tested), `2^n` built
/// in the exponent bits. Below -87 the result is the smallest normal f32 instead of a vanishing one, which
/// next to the largest score's 1 changes no sum.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in few bits, so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5 · 2^23 rounds to the nearest integer in f32 arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `y += a · x` over slices, so that the compiler makes vector code of it.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_hir::tract_ndarray::Array4;

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f32> {
        let mut state = seed;
        Array4::from_shape_fn(shape, |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
    }

    /// The direct kernel against tract's flash attention, causal, for the last query of a
    /// grouped-query layout, at lengths inside one of tract's blocks and across several.
    #[test]
    fn one_query_matches_tract_flash_attention() {
        for (len, dim) in [
            (1, 8),
            (7, 16),
            (33, 20),
            (300, 64),
            (256, 32),
            (257, 40),
            (1000, 128),
        ] {
            let q = random((1, 6, 1, dim), 1);
            let k = random((1, 2, len, dim), 2);
            let v = random((1, 2, len, dim), 3);
            let scale = (dim as f32).sqrt().recip();
            let ours = one_query(q.view(), k.view(), v.view(), scale).unwrap();
            let flash = FlashSdpaOp {
                causal: true,
                scale: None,
            };
            let theirs = flash.flash_attention_gqa(q.view(), k.view(), v.view(), None);
            let ours = ours.to_plain_array_view::<f32>().unwrap();
            assert_eq!(ours.shape(), theirs.shape());
            for (a, b) in ours.iter().zip(theirs.iter()) {
                assert!((a - b).abs() <= 1e-5, "len {len}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_the_library() {
        let mut worst = 0.0f32;
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let (ours, libm) = (exp(x), x.exp());
            if x >= -87.0 {
                worst = worst.max((ours - libm).abs() / libm);
            } else {
                assert!(ours <= 2.0 * f32::MIN_POSITIVE, "exp({x}) = {ours}");
            }
        }
        assert!(worst <= 3.0 * f32::EPSILON, "relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
    }

    /// Pushes land after each other, per head, and the view shows exactly the valid positions;
    /// a push past the context is an error, not a wrap.
    #[test]
    fn the_cache_appends_in_place_and_refuses_to_overflow() {
        let first = random((1, 2, 3, 4), 4);
        let second = random((1, 2, 2, 4), 5);
        let mut cache = KvBuffer::new(5);
        cache.push_view(first.view()).unwrap();
        cache.push_view(second.view()).unwrap();
        let view = cache.view().unwrap();
        assert_eq!(view.dim(), (1, 2, 5, 4));
        assert_eq!(view.slice(s![.., .., ..3, ..]), first);
        assert_eq!(view.slice(s![.., .., 3.., ..]), second);
        assert_eq!(cache.valid_shape(), Some([1, 2, 5, 4]));
        assert_eq!(cache.clone().view().unwrap(), view);
        let error = cache.push_view(random((1, 2, 1, 4), 6).view()).unwrap_err();
        assert!(error.to_string().contains("KV cache full"), "{error}");
        let mut other = KvBuffer::new(5);
        other.push_view(first.view()).unwrap();
        let error = other.push_view(random((1, 3, 1, 4), 7).view()).unwrap_err();
        assert!(error.to_string().contains("fed"), "{error}");
    }
}
