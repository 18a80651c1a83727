//! SLERP of one tensor pair, computed as mergekit computes it (see [`crate::merge`] for the
//! whole list of semantics and where each comes from).
//!
//! The inputs stay in their mapped source bytes and are widened to f32 one chunk at a time, so
//! the extra memory is two chunk buffers per worker plus the output, whatever the tensor size.

use half::{bf16, f16};
use rayon::prelude::*;

use super::torch_order;
use crate::checkpoint::SourceDtype;

/// Elements per chunk of mergekit's `slerp` (`_CHUNK_ELEMENTS`, divided by a batch of one
/// tensor: mergekit's planner merges each tensor on its own). Norms are taken per chunk and
/// then over the chunk norms; dot products are summed per chunk and then over the chunks.
pub const CHUNK_ELEMENTS: usize = 1024 * 1024;
/// Above this `|cos θ|` the two tensors count as colinear and are interpolated linearly
/// (mergekit's `dot_threshold`, compared in f32).
pub const DOT_THRESHOLD: f32 = 0.9995;
/// Norms at or below this are replaced by 1, so that a zero tensor does not divide by zero.
pub const NORM_EPS: f32 = 1e-8;
/// Elements per task of the element-wise pass: small enough to spread a small tensor over the
/// threads, large enough to amortise scheduling.
const ELEMENTWISE_BLOCK: usize = 1 << 16;

/// One side of the merge: little-endian elements as stored in the checkpoint.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub dtype: SourceDtype,
    pub bytes: &'a [u8],
}

/// How to merge one tensor pair.
#[derive(Debug, Clone, Copy)]
pub struct Slerp {
    /// The interpolation factor as mergekit passes it to the kernel: rounded to f32.
    pub t: f32,
    /// The dtype both inputs are converted to first, and the merged tensor is rounded to
    /// (mergekit's `dtype`, or the inputs' own).
    pub work: SourceDtype,
    /// The stored dtype of the result (mergekit's `out_dtype`, or `work`).
    pub out: SourceDtype,
}

/// The two weights the result is made of, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    pub base: f32,
    pub other: f32,
    /// The pair was nearly colinear and was interpolated linearly.
    pub linear: bool,
    /// cos θ, clamped to [-1, 1].
    pub dot: f32,
    /// ‖base‖ and ‖other‖ as used to normalise (1 for a zero tensor).
    pub norms: (f32, f32),
}

impl Slerp {
    /// Merges `base` (t = 0) and `other` (t = 1), both of `len` elements; returns the result's
    /// bytes in `self.out` and the coefficients used.
    pub fn merge(&self, base: Operand, other: Operand, len: usize) -> (Vec<u8>, Coefficients) {
        let coefficients = self.coefficients(base, other, len);
        let size = self.out.size();
        let mut out = vec![0u8; len * size];
        out.par_chunks_mut(ELEMENTWISE_BLOCK * size)
            .enumerate()
            .for_each(|(block, dest)| {
                let start = block * ELEMENTWISE_BLOCK;
                let count = dest.len() / size;
                let mut a = self.load(base, start, count);
                let b = self.load(other, start, count);
                // Two rounded products and a rounded sum, as three torch kernels do it.
                for (x, &y) in a.iter_mut().zip(&b) {
                    *x = coefficients.base * *x + coefficients.other * y;
                }
                if self.out != self.work {
                    for x in a.iter_mut() {
                        *x = round_to(self.work, *x);
                    }
                }
                store(self.out, &a, dest);
            });
        (out, coefficients)
    }

    /// The coefficients of `base` and `other`: mergekit's normalised copies for the angle
    /// (never materialised: each chunk is divided as it is used), a linear blend when the
    /// pair is nearly colinear.
    pub fn coefficients(&self, base: Operand, other: Operand, len: usize) -> Coefficients {
        let t = self.t;
        let chunks: Vec<usize> = (0..len).step_by(CHUNK_ELEMENTS).collect();
        let chunk_len = |start: usize| CHUNK_ELEMENTS.min(len - start);
        let norms: Vec<(f32, f32)> = chunks
            .par_iter()
            .map(|&start| {
                let a = self.load(base, start, chunk_len(start));
                let b = self.load(other, start, chunk_len(start));
                (torch_order::norm(&a), torch_order::norm(&b))
            })
            .collect();
        let guard = |n: f32| if n > NORM_EPS { n } else { 1.0 };
        let a_parts: Vec<f32> = norms.iter().map(|n| n.0).collect();
        let b_parts: Vec<f32> = norms.iter().map(|n| n.1).collect();
        let norm_a = guard(torch_order::norm(&a_parts));
        let norm_b = guard(torch_order::norm(&b_parts));

        let dots: Vec<f32> = chunks
            .par_iter()
            .map(|&start| {
                let mut a = self.load(base, start, chunk_len(start));
                let b = self.load(other, start, chunk_len(start));
                for (x, &y) in a.iter_mut().zip(&b) {
                    *x = (*x / norm_a) * (y / norm_b);
                }
                torch_order::sum(&a)
            })
            .collect();
        let dot = torch_order::sum(&dots).clamp(-1.0, 1.0);
        let linear = dot.abs() > DOT_THRESHOLD;
        if linear || len == 0 {
            return Coefficients {
                base: 1.0 - t,
                other: t,
                linear: true,
                dot,
                norms: (norm_a, norm_b),
            };
        }
        let theta = acos(dot);
        let sin_theta = sin(theta);
        Coefficients {
            base: sin((1.0 - t) * theta) / sin_theta,
            other: sin(t * theta) / sin_theta,
            linear: false,
            dot,
            norms: (norm_a, norm_b),
        }
    }

    /// Elements `start..start + len` of `operand`, converted to the merge dtype, as f32.
    fn load(&self, operand: Operand, start: usize, len: usize) -> Vec<f32> {
        let size = operand.dtype.size();
        let bytes = &operand.bytes[start * size..(start + len) * size];
        let mut out = match operand.dtype {
            // bf16 is the top half of an f32: a shift the compiler vectorises.
            SourceDtype::Bf16 => bytes
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16))
                .collect(),
            other => {
                let mut out = vec![0f32; len];
                other.widen_into(bytes, &mut out);
                out
            }
        };
        if operand.dtype != self.work {
            for v in out.iter_mut() {
                *v = round_to(self.work, *v);
            }
        }
        out
    }
}

/// `x` rounded to the nearest value of `dtype` (ties to even), as torch's casts round.
fn round_to(dtype: SourceDtype, x: f32) -> f32 {
    match dtype {
        SourceDtype::Bf16 => bf16::from_f32(x).to_f32(),
        SourceDtype::F16 => f16::from_f32(x).to_f32(),
        SourceDtype::F32 => x,
    }
}

/// Stores `values` as little-endian `dtype`, rounding to nearest-even.
fn store(dtype: SourceDtype, values: &[f32], dest: &mut [u8]) {
    match dtype {
        SourceDtype::Bf16 => {
            for (d, &x) in dest.as_chunks_mut::<2>().0.iter_mut().zip(values) {
                *d = bf16_bits(x).to_le_bytes();
            }
        }
        SourceDtype::F16 => {
            for (d, &x) in dest.as_chunks_mut::<2>().0.iter_mut().zip(values) {
                *d = f16::from_f32(x).to_le_bytes();
            }
        }
        SourceDtype::F32 => {
            for (d, &x) in dest.as_chunks_mut::<4>().0.iter_mut().zip(values) {
                *d = x.to_le_bytes();
            }
        }
    }
}

/// `bf16::from_f32` without its branches, so that the store loop vectorises: add half an ulp
/// (less one, plus the lowest kept bit for ties to even) and truncate. NaNs stay quiet NaNs.
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// f32 arccos, correctly rounded (through f64). torch takes it from MKL's vector library (or
/// Sleef without MKL), which is within an ulp but not correctly rounded, and differs between
/// builds; correct rounding is the one answer every platform agrees on.
fn acos(x: f32) -> f32 {
    (x as f64).acos() as f32
}

/// f32 sine, correctly rounded (through f64); see [`acos`].
fn sin(x: f32) -> f32 {
    (x as f64).sin() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn merge_f32(t: f32, a: &[f32], b: &[f32]) -> (Vec<f32>, Coefficients) {
        let (a, b) = (f32_bytes(a), f32_bytes(b));
        let slerp = Slerp {
            t,
            work: SourceDtype::F32,
            out: SourceDtype::F32,
        };
        let len = a.len() / 4;
        let (out, c) = slerp.merge(
            Operand {
                dtype: SourceDtype::F32,
                bytes: &a,
            },
            Operand {
                dtype: SourceDtype::F32,
                bytes: &b,
            },
            len,
        );
        let mut values = vec![0f32; len];
        SourceDtype::F32.widen_into(&out, &mut values);
        (values, c)
    }

    #[test]
    fn bf16_rounding_is_halfs() {
        let mut samples = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
        ];
        let mut state = 0x9e37_79b9_u32;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let x = f32::from_bits(state);
            if !x.is_nan() {
                samples.push(x);
            }
        }
        for x in samples {
            assert_eq!(
                bf16_bits(x),
                bf16::from_f32(x).to_bits(),
                "{x:e} ({:08x})",
                x.to_bits()
            );
        }
        assert!(bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn orthogonal_unit_vectors_follow_the_great_circle() {
        let (out, c) = merge_f32(0.5, &[1.0, 0.0], &[0.0, 1.0]);
        assert!(!c.linear);
        let half = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (out[0] - half).abs() < 1e-6 && (out[1] - half).abs() < 1e-6,
            "{out:?}"
        );
        // A straight line would give 0.5, 0.5: the arc keeps the norm.
        assert!((out[0].hypot(out[1]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn colinear_pairs_are_blended_linearly() {
        let (out, c) = merge_f32(0.25, &[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]);
        assert!(c.linear);
        assert_eq!((c.base, c.other), (0.75, 0.25));
        assert_eq!(out, vec![1.25, 2.5, 3.75]);
    }

    #[test]
    fn endpoints_return_the_inputs() {
        let a = [0.3f32, -0.7, 0.1, 0.9];
        let b = [-0.2f32, 0.4, 0.8, -0.5];
        assert_eq!(merge_f32(0.0, &a, &b).0, a);
        let (at_one, _) = merge_f32(1.0, &a, &b);
        for (x, y) in at_one.iter().zip(b) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn zero_tensors_do_not_divide_by_zero() {
        let (out, c) = merge_f32(0.5, &[0.0; 4], &[1.0, 0.0, 0.0, 0.0]);
        assert!(out.iter().all(|v| v.is_finite()));
        assert_eq!(c.dot, 0.0);
    }
}
