//! The attention in plain Rust, its loops shaped (independent lanes, no calls) so that the
//! compiler vectorizes them for whatever the target or the calling function enables.

use super::{Lanes, Partial};

pub(super) struct Portable;

/// The kernel for [`super::Kernel`] (safe: it needs nothing beyond the build's baseline).
pub(super) fn attend(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    dim: usize,
    scale: f32,
) -> Partial {
    super::attend::<Portable>(queries, keys, values, dim, scale)
}

impl Lanes for Portable {
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

    #[inline(always)]
    fn softmax_numerators(row: &mut [f32], max: f32) -> f32 {
        row.iter_mut().for_each(|w| *w = exp(*w - max));
        row.iter().sum()
    }

    #[inline(always)]
    fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        axpy(a, x, y);
    }
}

/// `e^x` for x ≤ 0 (a score minus the largest), in plain arithmetic that vectorizes: the
/// library's `expf` is a call per score, and at position 1900 those calls took most of
/// SmolLM2's attention time. Cephes' single-precision method: `x = n ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `e^r` (within 3 ulp of libm, tested), `2^n` built
/// in the exponent bits. Below -87 the result is the smallest normal f32 instead of a vanishing
/// one, which next to the largest score's 1 changes no sum.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_POLYNOMIAL[0];
    for c in &EXP_POLYNOMIAL[1..] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

pub(super) const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, the first exact in few bits, so that `n * LN2_HI` is exact.
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and taking away 1.5 · 2^23 rounds to the nearest integer in f32 arithmetic.
const ROUND: f32 = 12_582_912.0;
/// Cephes' coefficients for `(e^r - 1 - r) / r²`, highest degree first.
pub(super) const EXP_POLYNOMIAL: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `y += a · x` over slices, so that the compiler makes vector code of it.
#[inline(always)]
pub(super) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
