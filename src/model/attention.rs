//! Attention for a decode step, over the KV cache as it grows in place.
//!
//! tract-transformers fuses each layer's KV cache and attention into one stateful op
//! (`InPlaceKvSdpa`) that appends the new keys and values without copying the past, then
//! runs its flash-attention kernel. That kernel is built for blocks of queries, and a decode
//! step has one: this op keeps the keys and values in a [`KvCache`] and hands single-query steps
//! to marengo's own kernel ([`attention::decode`], which says why), reading each key and value
//! once. Prompt chunks (more than one query) keep tract's kernel. The op keeps tract's state
//! contract (state name, symbol resolution), so the plan treats it as the op it replaces.

use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::tract_ndarray::{ArrayView4, Ix4};
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;
use tract_transformers::ops::flash_sdpa::FlashSdpaOp;
use tract_transformers::ops::inplace_kv_cache::InPlaceKvSdpa;

use super::kv_cache::KvCache;
use crate::kernels::attention::{self, AttentionShape};

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
            k: KvCache::new(self.context),
            v: KvCache::new(self.context),
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
    k: KvCache,
    v: KvCache,
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
        let out = if q.shape()[2] == 1 && inputs.len() == 3 {
            let scale = self
                .op
                .scale
                .unwrap_or((q.shape()[3] as f32).sqrt().recip());
            one_query(q, &self.k, &self.v, scale)?
        } else {
            ensure!(
                inputs.len() == 3,
                "an explicit attention mask is not supported"
            );
            let flash = FlashSdpaOp {
                causal: self.op.causal,
                scale: self.op.scale,
            };
            flash
                .flash_attention_gqa(q, self.k.view()?, self.v.view()?, None)
                .into_tensor()
        };
        Ok(tvec!(out.cast_to_dt(dt)?.into_owned().into_tvalue()))
    }
}

/// Attention of one query per head (`q`: `[B, Hq, 1, D]`) over every cached key and value, by
/// the kernel (see [`attention::decode`]).
fn one_query(q: ArrayView4<f32>, k: &KvCache, v: &KvCache, scale: f32) -> TractResult<Tensor> {
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
            // Room to spare, as in a session: the kernel reads the cache where it lies.
            let (mut keys, mut values) = (KvCache::new(len + 3), KvCache::new(len + 3));
            keys.push_view(k.view()).unwrap();
            values.push_view(v.view()).unwrap();
            let ours = one_query(q.view(), &keys, &values, scale).unwrap();
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
