//! The reference kernels: the specification the fast paths are tested against, written for
//! obviousness. Every weight is decoded from the E4M3 definition, scaled, and accumulated in f64,
//! without the shared threading and blocking drivers (so that the tests check those too).

use super::{Fp8Matrix, e4m3};

/// The value of weight `(row, col)`.
fn weight(w: &Fp8Matrix, row: usize, col: usize) -> f64 {
    let scale = w.row_scales(row)[col / w.scale_span()];
    f64::from(e4m3::value(w.row_bytes(row)[col])) * f64::from(scale)
}

fn dot(w: &Fp8Matrix, row: usize, x: &[f32]) -> f32 {
    let sum: f64 = x
        .iter()
        .enumerate()
        .map(|(col, &x)| weight(w, row, col) * f64::from(x))
        .sum();
    sum as f32
}

pub(super) fn matvec(w: &Fp8Matrix, x: &[f32], y: &mut [f32]) {
    for (row, y) in y.iter_mut().enumerate() {
        *y = dot(w, row, x);
    }
}

pub(super) fn matmul(w: &Fp8Matrix, x: &[f32], m: usize, y: &mut [f32]) {
    let (k, n) = (w.cols(), w.rows());
    for token in 0..m {
        matvec(
            w,
            &x[token * k..(token + 1) * k],
            &mut y[token * n..(token + 1) * n],
        );
    }
}

pub(super) fn gather_rows(w: &Fp8Matrix, rows: &[usize], out: &mut [f32]) {
    for (&row, out) in rows.iter().zip(out.chunks_exact_mut(w.cols())) {
        for (col, out) in out.iter_mut().enumerate() {
            *out = weight(w, row, col) as f32;
        }
    }
}
