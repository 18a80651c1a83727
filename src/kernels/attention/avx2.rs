//! The attention for x86_64 with AVX2: the portable loops compiled with AVX2 enabled, whose
//! eight-lane vectors the lane loops of [`Portable`]'s `dot` and `axpy` fill exactly (the build's
//! baseline, SSE2, has four).

use super::Partial;
use super::portable::Portable;

/// The kernel for [`super::Kernel`].
#[target_feature(enable = "avx2")]
pub(super) fn attend(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    dim: usize,
    scale: f32,
) -> Partial {
    super::attend::<Portable>(queries, keys, values, dim, scale)
}
