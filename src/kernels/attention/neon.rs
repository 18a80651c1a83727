//! The attention for aarch64 with Advanced SIMD (NEON, every ARMv8-A core): four-lane vectors
//! with fused multiply-adds, and `e^x` four scores at a time.

use std::arch::aarch64::*;

use super::portable::{EXP_POLYNOMIAL, LN2_HI, LN2_LO, LOG2_E};
use super::{Lanes, Partial};

struct Neon;

/// The kernel for [`super::Kernel`] (safe: NEON is part of the aarch64 baseline).
pub(super) fn attend(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    dim: usize,
    scale: f32,
) -> Partial {
    super::attend::<Neon>(queries, keys, values, dim, scale)
}

/// Floats per vector.
const LANES: usize = 4;

impl Lanes for Neon {
    /// Four accumulators of four lanes, so that the additions of one do not wait on another's.
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        const STEP: usize = 4 * LANES;
        let (a_steps, b_steps) = (a.chunks_exact(STEP), b.chunks_exact(STEP));
        let (a_rest, b_rest) = (a_steps.remainder(), b_steps.remainder());
        // SAFETY: every load reads four floats inside its chunk; NEON is part of the baseline.
        unsafe {
            let mut acc = [vdupq_n_f32(0.0); 4];
            for (a, b) in a_steps.zip(b_steps) {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let (a, b) = (a[k * LANES..].as_ptr(), b[k * LANES..].as_ptr());
                    *acc = vfmaq_f32(*acc, vld1q_f32(a), vld1q_f32(b));
                }
            }
            let (a_quads, b_quads) = (a_rest.chunks_exact(LANES), b_rest.chunks_exact(LANES));
            let tail: f32 = a_quads
                .remainder()
                .iter()
                .zip(b_quads.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (a, b) in a_quads.zip(b_quads) {
                acc[0] = vfmaq_f32(acc[0], vld1q_f32(a.as_ptr()), vld1q_f32(b.as_ptr()));
            }
            let sum = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
            vaddvq_f32(sum) + tail
        }
    }

    #[inline(always)]
    fn softmax_numerators(row: &mut [f32], max: f32) -> f32 {
        let mut quads = row.chunks_exact_mut(LANES);
        // SAFETY: every load and store touches four floats inside its chunk; NEON is part of the
        // baseline.
        let mut total = unsafe {
            let max = vdupq_n_f32(max);
            let mut sum = vdupq_n_f32(0.0);
            for quad in &mut quads {
                let e = exp(vsubq_f32(vld1q_f32(quad.as_ptr()), max));
                vst1q_f32(quad.as_mut_ptr(), e);
                sum = vaddq_f32(sum, e);
            }
            vaddvq_f32(sum)
        };
        for score in quads.into_remainder() {
            // SAFETY: NEON is part of the baseline.
            *score = unsafe { vgetq_lane_f32::<0>(exp(vdupq_n_f32(*score - max))) };
            total += *score;
        }
        total
    }

    #[inline(always)]
    fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let mut y_quads = y.chunks_exact_mut(LANES);
        let mut x_quads = x.chunks_exact(LANES);
        // SAFETY: every load and store touches four floats inside its chunk; NEON is part of the
        // baseline.
        unsafe {
            let a = vdupq_n_f32(a);
            for (y, x) in (&mut y_quads).zip(&mut x_quads) {
                let sum = vfmaq_f32(vld1q_f32(y.as_ptr()), a, vld1q_f32(x.as_ptr()));
                vst1q_f32(y.as_mut_ptr(), sum);
            }
        }
        for (y, x) in y_quads.into_remainder().iter_mut().zip(x_quads.remainder()) {
            *y += a * x;
        }
    }
}

/// [`super::portable::exp`] on four lanes: `e^x` for x ≤ 0, the smallest normal f32 below -87.
#[inline(always)]
pub(super) fn exp(x: float32x4_t) -> float32x4_t {
    // SAFETY: register arithmetic only; NEON is part of the baseline.
    unsafe {
        let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0)), vdupq_n_f32(0.0));
        let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(LOG2_E)));
        let r = vfmsq_f32(vfmsq_f32(x, n, vdupq_n_f32(LN2_HI)), n, vdupq_n_f32(LN2_LO));
        let mut p = vdupq_n_f32(EXP_POLYNOMIAL[0]);
        for &c in &EXP_POLYNOMIAL[1..] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        let e_r = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), vmulq_f32(p, r), r);
        let exponent = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
        vmulq_f32(e_r, vreinterpretq_f32_s32(vshlq_n_s32::<23>(exponent)))
    }
}
