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
//! The op keeps tract's cache type and state contract (state name, symbol resolution), so
//! the plan treats it as the op it replaces.

use rayon::prelude::*;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::tract_ndarray::{ArrayView4, Ix4, s};
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;
use tract_transformers::ops::flash_sdpa::FlashSdpaOp;
use tract_transformers::ops::inplace_kv_cache::{InPlaceKvCache, InPlaceKvSdpa};

/// Replaces every `InPlaceKvSdpa` of the optimised model by [`DecodeAttention`]; returns how
/// many.
pub fn use_decode_attention(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let Some(fused) = model.node(id).op_as::<InPlaceKvSdpa>() else {
            continue;
        };
        let op = DecodeAttention(fused.clone());
        model.node_mut(id).op = Box::new(op);
        replaced += 1;
    }
    Ok(replaced)
}

/// `InPlaceKvSdpa` with a direct kernel for single-query steps (see the module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeAttention(InPlaceKvSdpa);

impl Op for DecodeAttention {
    fn name(&self) -> StaticName {
        "MarengoDecodeAttention".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        self.0.info()
    }
    op_as_typed_op!();
}

impl EvalOp for DecodeAttention {
    not_out_of_plan!();
    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(DecodeAttentionState {
            op: self.0.clone(),
            k: InPlaceKvCache::new(self.0.axis),
            v: InPlaceKvCache::new(self.0.axis),
        })))
    }
}

impl TypedOp for DecodeAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.output_facts(inputs)
    }
    as_op!();
}

#[derive(Clone, Debug)]
struct DecodeAttentionState {
    op: InPlaceKvSdpa,
    k: InPlaceKvCache,
    v: InPlaceKvCache,
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
            self.k.valid_shape().as_deref(),
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
        let k = self.k.valid_view::<f32>()?.into_dimensionality::<Ix4>()?;
        let v = self.v.valid_view::<f32>()?.into_dimensionality::<Ix4>()?;
        let out = if q.shape()[2] == 1 && inputs.len() == 3 && self.op.axis == 2 {
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

/// Attention of one query per head (`q`: `[B, Hq, 1, D]`) over every cached key and value
/// (`[B, Hkv, L, D]`): the query is the last position, so the causal mask hides nothing.
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
    let mut out = vec![0.0f32; batch * q_heads * dim];
    out.par_chunks_mut(dim).enumerate().for_each(|(task, out)| {
        let (b, head) = (task / q_heads, task % q_heads);
        let query: Vec<f32> = q.slice(s![b, head, 0, ..]).iter().copied().collect();
        let keys = k.slice(s![b, head / group, .., ..]);
        let values = v.slice(s![b, head / group, .., ..]);
        let mut weights: Vec<f32> = keys
            .rows()
            .into_iter()
            .map(|key| match key.as_slice() {
                Some(key) => dot(&query, key) * scale,
                None => key.iter().zip(&query).map(|(k, q)| k * q).sum::<f32>() * scale,
            })
            .collect();
        let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for w in &mut weights {
            *w = (*w - max).exp();
            total += *w;
        }
        for (w, value) in weights.iter().zip(values.rows()) {
            let w = w / total;
            match value.as_slice() {
                Some(value) => axpy(w, value, out),
                None => out.iter_mut().zip(value).for_each(|(o, v)| *o += w * v),
            }
        }
    });
    debug_assert_eq!(len, k.dim().2);
    Tensor::from_shape(&[batch, q_heads, 1, dim], &out)
}

/// A dot product in eight independent lanes, which the compiler turns into vector code.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
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

/// `y += a · x` over slices, so that the compiler makes vector code of it.
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
        for (len, dim) in [(1, 8), (7, 16), (33, 20), (300, 64)] {
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
}
