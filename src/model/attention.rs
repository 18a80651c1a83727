//! Attention for a decode step, over the KV cache as it grows in place.
//!
//! tract-transformers fuses each layer's KV cache and attention into one stateful op
//! (`InPlaceKvSdpa`) that appends the new keys and values without copying the past, then
//! runs its flash-attention kernel. That kernel is built for blocks of queries, and a decode
//! step has one: this op keeps the keys and values in a [`KvCache`] and hands single-query steps
//! to marengo's own kernel ([`attention::decode`], which says why), reading each key and value
//! once. Prompt chunks (more than one query) keep tract's kernel. The op keeps tract's state
//! contract (state name, symbol resolution), so the plan treats it as the op it replaces.
//!
//! A model with a sliding window (Mistral-7B v0.1) attends, from each query, to the last
//! `window` positions only, itself included (transformers' `kv_idx > q_idx - sliding_window`):
//! a decode step hands the kernel the window's start, and a prompt chunk that reaches past a
//! window gives tract's kernel the keys from the first query's window on and a mask.

use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::tract_ndarray::{Array4, ArrayView4, Ix4, s};
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;
use tract_transformers::ops::flash_sdpa::FlashSdpaOp;
use tract_transformers::ops::inplace_kv_cache::InPlaceKvSdpa;

use super::kv_cache::KvCache;
use crate::kernels::attention::{self, AttentionShape};

/// Replaces every `InPlaceKvSdpa` of the optimised model (with the sequence on axis 2, as the
/// bundle's graph has it) by [`DecodeAttention`] with room for `context` positions, attending
/// over the last `window` positions when there is one; returns how many.
pub fn use_decode_attention(
    model: &mut TypedModel,
    context: usize,
    window: Option<usize>,
) -> TractResult<usize> {
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
            window,
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
    /// Positions each query attends to, itself included; `None` is the whole context.
    window: Option<usize>,
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
            window: self.window,
            context: self.context,
            lanes: Vec::new(),
        })))
    }
}

impl TypedOp for DecodeAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.fused.output_facts(inputs)
    }
    as_op!();
}

/// The keys and values of one stream (a lane of the plan's state).
#[derive(Clone, Debug)]
struct LaneCache {
    k: KvCache,
    v: KvCache,
}

impl LaneCache {
    fn new(context: usize) -> Self {
        LaneCache {
            k: KvCache::new(context),
            v: KvCache::new(context),
        }
    }
}

/// One cache per lane: a turn's seats (axis 0 of its tensors) are streams at their own
/// positions, each appending to and attending over its own lane's cache. A state one
/// stream owns is one lane wide.
#[derive(Clone, Debug)]
pub struct DecodeAttentionState {
    op: InPlaceKvSdpa,
    window: Option<usize>,
    context: usize,
    lanes: Vec<LaneCache>,
}

impl DecodeAttentionState {
    fn lane(&mut self, lane: usize) -> &mut LaneCache {
        if self.lanes.len() <= lane {
            let context = self.context;
            self.lanes.resize_with(lane + 1, || LaneCache::new(context));
        }
        &mut self.lanes[lane]
    }

    /// Forgets a lane's positions from `keep` on, so that the stream continues from there
    /// (the next turn of a conversation whose history was edited).
    pub fn truncate(&mut self, lane: usize, keep: usize) {
        let cache = self.lane(lane);
        cache.k.truncate(keep);
        cache.v.truncate(keep);
    }

    /// Positions a lane holds.
    pub fn positions(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, |cache| cache.k.positions())
    }
}

impl OpState for DecodeAttentionState {
    fn init_tensor_fact(&self) -> Option<(String, TypedFact)> {
        Some((self.op.name.clone(), self.op.past_sequence_fact.clone()))
    }

    fn has_init_tensor_fact(&self) -> bool {
        true
    }

    /// Binds the past length to the first seat's: nothing in the plan's shapes depends on
    /// it (each seat's attention reads its own lane), tract only needs it bound.
    fn resolve_symbols(&mut self, state: &mut TurnState) -> TractResult<()> {
        let lane = state.seating.lanes().first().map_or(0, |lane| lane.0);
        let shape = self.lanes.get(lane).and_then(|cache| cache.k.valid_shape());
        DynKeyValueCacheState::resolve_symbols(
            state,
            self.op.past_sequence_fact.clone(),
            shape.as_ref().map(|shape| &shape[..]),
        )
    }

    fn reset_lanes(&mut self, lanes: &[LaneId]) -> TractResult<()> {
        for lane in lanes {
            *self.lane(lane.0) = LaneCache::new(self.context);
        }
        Ok(())
    }

    fn eval(
        &mut self,
        ctx: &EvalContext,
        _op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 3,
            "attention expects [Q, K_new, V_new]; an explicit attention mask is not supported"
        );
        let dt = inputs[0].datum_type();
        let q = inputs[0].cast_to::<f32>()?;
        let k = inputs[1].cast_to::<f32>()?;
        let v = inputs[2].cast_to::<f32>()?;
        let q = q
            .to_plain_array_view::<f32>()?
            .into_dimensionality::<Ix4>()?;
        let k = k
            .to_plain_array_view::<f32>()?
            .into_dimensionality::<Ix4>()?;
        let v = v
            .to_plain_array_view::<f32>()?
            .into_dimensionality::<Ix4>()?;
        let seats = q.shape()[0];
        let lanes: Vec<usize> = if ctx.seating.max_lanes() == 1 {
            vec![0; seats]
        } else {
            ctx.seating.lanes().iter().map(|lane| lane.0).collect()
        };
        ensure!(
            lanes.len() == seats,
            "{seats} seats for the lanes {lanes:?}"
        );
        let scale = self
            .op
            .scale
            .unwrap_or((q.shape()[3] as f32).sqrt().recip());
        let flash = FlashSdpaOp {
            causal: self.op.causal,
            scale: self.op.scale,
        };
        let window = self.window;
        let mut outputs = Vec::with_capacity(seats);
        for (seat, &lane) in lanes.iter().enumerate() {
            let seat_range = s![seat..seat + 1, .., .., ..];
            let cache = self.lane(lane);
            cache.k.push_view(k.slice(seat_range))?;
            cache.v.push_view(v.slice(seat_range))?;
            let q = q.slice(seat_range);
            let out = if q.shape()[2] == 1 {
                let start = window.map_or(0, |w| cache.k.positions().saturating_sub(w));
                one_query(q, &cache.k, &cache.v, scale, start)?
            } else {
                many_queries(&flash, q, &cache.k, &cache.v, window)?
            };
            outputs.push(out);
        }
        let out = if outputs.len() == 1 {
            outputs.pop().expect("one seat")
        } else {
            Tensor::stack_tensors(0, &outputs)?
        };
        Ok(tvec!(out.cast_to_dt(dt)?.into_owned().into_tvalue()))
    }
}

/// Attention of a prompt chunk (`q`: `[B, Hq, S, D]`, the last `S` cached positions) by tract's
/// flash kernel: causal over the whole cache, or, once a sliding `window` has left positions
/// behind, over the keys from the first query's window on with [`window_mask`].
fn many_queries(
    flash: &FlashSdpaOp,
    q: ArrayView4<f32>,
    k: &KvCache,
    v: &KvCache,
    window: Option<usize>,
) -> TractResult<Tensor> {
    let positions = k.positions();
    let (k, v) = (k.view()?, v.view()?);
    let Some(window) = window.filter(|&w| positions > w) else {
        return Ok(flash.flash_attention_gqa(q, k, v, None).into_tensor());
    };
    let first_query = positions - q.shape()[2];
    let start = (first_query + 1).saturating_sub(window);
    let keys = s![.., .., start.., ..];
    let mask = window_mask(q.shape()[2], first_query, start, positions, window);
    Ok(flash
        .flash_attention_gqa(q, k.slice(keys), v.slice(keys), Some(mask.view()))
        .into_tensor())
}

/// Masks scores that a sliding window (or causality) excludes by far less than any score, rather
/// than by −∞: tract's flash kernel would meet a query's first block of keys all −∞ and make
/// NaN of `−∞ − −∞`; this way such a block's weights are wiped by the first block the query
/// does see (`e^(MASKED − max)` is 0), and blocks masked whole are still skipped (its test is
/// `< −65503`).
const MASKED: f32 = -1e30;

/// The additive mask `[1, 1, queries, positions - start]` of a prompt chunk whose first query
/// is at `first_query`, over the keys from `start` on: a query at `p` sees the key at `j` when
/// `j ≤ p` and `p − j < window`.
fn window_mask(
    queries: usize,
    first_query: usize,
    start: usize,
    positions: usize,
    window: usize,
) -> Array4<f32> {
    Array4::from_shape_fn((1, 1, queries, positions - start), |(_, _, i, j)| {
        let (query, key) = (first_query + i, start + j);
        if key <= query && query - key < window {
            0.0
        } else {
            MASKED
        }
    })
}

/// Attention of one query per head (`q`: `[B, Hq, 1, D]`) over the cached keys and values from
/// position `start` on, by the kernel (see [`attention::decode`]).
fn one_query(
    q: ArrayView4<f32>,
    k: &KvCache,
    v: &KvCache,
    scale: f32,
    start: usize,
) -> TractResult<Tensor> {
    let (batch, query_heads, _, dim) = q.dim();
    let [_, kv_heads, capacity, _] = k.shape();
    ensure!(
        v.shape() == k.shape() && v.positions() == k.positions(),
        "keys {:?} and values {:?} differ",
        k.valid_shape(),
        v.valid_shape()
    );
    let shape = AttentionShape {
        batch,
        query_heads,
        kv_heads,
        dim,
        start,
        len: k.positions(),
        capacity,
    };
    let queries: Vec<f32> = q.iter().copied().collect();
    let mut out = vec![0.0f32; queries.len()];
    attention::decode(shape, &queries, k.slots()?, v.slots()?, scale, &mut out)?;
    Tensor::from_shape(&[batch, query_heads, 1, dim], &out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            // Room to spare, as in a session: the kernel reads the cache where it lies.
            let (mut keys, mut values) = (KvCache::new(len + 3), KvCache::new(len + 3));
            keys.push_view(k.view()).unwrap();
            values.push_view(v.view()).unwrap();
            let ours = one_query(q.view(), &keys, &values, scale, 0).unwrap();
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

    /// A prompt chunk under a sliding window (through tract's kernel and the mask) against each
    /// of its queries alone (through the decode kernel from the window's start), with windows
    /// shorter than the chunk, than the cache and than tract's 32-key blocks.
    #[test]
    fn a_windowed_chunk_attends_as_its_queries_alone() {
        let (len, dim, chunk) = (90, 16, 40);
        let k = random((1, 2, len, dim), 4);
        let v = random((1, 2, len, dim), 5);
        let q = random((1, 4, chunk, dim), 6);
        let scale = (dim as f32).sqrt().recip();
        let (mut keys, mut values) = (KvCache::new(len), KvCache::new(len));
        keys.push_view(k.view()).unwrap();
        values.push_view(v.view()).unwrap();
        let flash = FlashSdpaOp {
            causal: true,
            scale: None,
        };
        for window in [3, 33, 70] {
            let ours = many_queries(&flash, q.view(), &keys, &values, Some(window)).unwrap();
            let ours = ours.to_plain_array_view::<f32>().unwrap();
            for i in 0..chunk {
                let position = len - chunk + i;
                let (mut k_at, mut v_at) = (KvCache::new(len), KvCache::new(len));
                k_at.push_view(k.slice(s![.., .., ..=position, ..]))
                    .unwrap();
                v_at.push_view(v.slice(s![.., .., ..=position, ..]))
                    .unwrap();
                let start = (position + 1).saturating_sub(window);
                let q_at = q.slice(s![.., .., i..=i, ..]);
                let alone = one_query(q_at, &k_at, &v_at, scale, start).unwrap();
                let alone = alone.to_plain_array_view::<f32>().unwrap();
                for (a, b) in ours.slice(s![.., .., i..=i, ..]).iter().zip(alone.iter()) {
                    assert!(
                        (a - b).abs() <= 1e-5,
                        "window {window}, query {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
