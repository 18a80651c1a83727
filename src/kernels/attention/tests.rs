//! Every attention kernel against the scalar reference, over a cache with room to spare, at
//! lengths inside one task and across several, with and without grouped queries.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::kernels::available_isas;

/// Allowed absolute error of an output (a weighted mean of values in [-2, 2]).
const TOLERANCE: f32 = 1e-5;

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-2.0..2.0)).collect()
}

/// Each available implementation's output against the reference's for `shape` and `scale`.
fn check(rng: &mut ChaCha8Rng, shape: AttentionShape, scale: f32) {
    let AttentionShape {
        batch,
        query_heads,
        kv_heads,
        dim,
        capacity,
        ..
    } = shape;
    let queries = random(rng, batch * query_heads * dim);
    let keys = random(rng, batch * kv_heads * capacity * dim);
    let values = random(rng, batch * kv_heads * capacity * dim);
    let mut want = vec![f32::NAN; queries.len()];
    decode_with(
        Isa::Scalar,
        shape,
        &queries,
        &keys,
        &values,
        scale,
        &mut want,
    )
    .expect("reference attention");
    for isa in available_isas() {
        let mut got = vec![f32::NAN; queries.len()];
        decode_with(isa, shape, &queries, &keys, &values, scale, &mut got).expect("attention");
        for (index, (got, want)) in got.iter().zip(&want).enumerate() {
            assert!(
                (got - want).abs() <= TOLERANCE,
                "{isa:?} {shape:?} scale {scale} output {index}: got {got}, reference {want}"
            );
        }
    }
}

#[test]
fn every_kernel_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (len, dim) in [
        (1usize, 8),
        (7, 16),
        (33, 20),
        (255, 3),
        (256, 32),
        (257, 40),
        (300, 64),
        (1000, 128),
    ] {
        for (batch, query_heads, kv_heads) in [(1, 6, 2), (1, 3, 3), (2, 4, 1)] {
            // All positions, then a sliding window's last 5 or the last 260 (across tasks).
            for start in [0, len.saturating_sub(5), len.saturating_sub(260)] {
                let shape = AttentionShape {
                    batch,
                    query_heads,
                    kv_heads,
                    dim,
                    start,
                    len,
                    capacity: len + 5,
                };
                check(&mut rng, shape, (dim as f32).sqrt().recip());
            }
        }
    }
}

/// Scores hundreds apart: most weights underflow, where the kernels' `exp` stops at the smallest
/// normal f32.
#[test]
fn kernels_match_the_reference_on_scores_far_apart() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for len in [5, 300] {
        let shape = AttentionShape {
            batch: 1,
            query_heads: 2,
            kv_heads: 1,
            dim: 24,
            start: 0,
            len,
            capacity: len,
        };
        check(&mut rng, shape, 30.0);
    }
}

#[test]
fn bad_operands_are_refused() {
    let shape = AttentionShape {
        batch: 1,
        query_heads: 4,
        kv_heads: 2,
        dim: 8,
        start: 0,
        len: 3,
        capacity: 4,
    };
    let (queries, cache, mut out) = (vec![0.0; 32], vec![0.0; 64], vec![0.0; 32]);
    let run = |shape, keys: &[f32], out: &mut [f32]| {
        decode(shape, &queries, keys, &cache, 1.0, out).unwrap_err()
    };
    for bad in [
        AttentionShape {
            kv_heads: 3,
            ..shape
        },
        AttentionShape { len: 0, ..shape },
        AttentionShape { len: 5, ..shape },
        AttentionShape { start: 3, ..shape },
    ] {
        assert_eq!(run(bad, &cache, &mut out), KernelError::AttentionShape(bad));
    }
    assert_eq!(
        run(shape, &cache[1..], &mut out),
        KernelError::Operand {
            operand: "attention keys",
            expected: 64,
            actual: 63
        }
    );
    assert_eq!(
        run(shape, &cache, &mut out[..31]),
        KernelError::Operand {
            operand: "attention output",
            expected: 32,
            actual: 31
        }
    );
}

/// Checks an `e^x` for x ≤ 0 against the library's over [-90, 0].
fn check_exp(exp: impl Fn(f32) -> f32) {
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

#[test]
fn exp_is_within_a_few_ulp_of_the_library() {
    check_exp(portable::exp);
}

#[cfg(target_arch = "aarch64")]
#[test]
fn neon_exp_is_within_a_few_ulp_of_the_library() {
    use std::arch::aarch64::{vdupq_n_f32, vgetq_lane_f32};
    // SAFETY: NEON is part of the aarch64 baseline.
    check_exp(|x| unsafe { vgetq_lane_f32::<0>(neon::exp(vdupq_n_f32(x))) });
}
