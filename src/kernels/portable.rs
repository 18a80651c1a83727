//! Kernels in plain Rust for CPUs without a vector path of their own: weights are decoded through
//! a 256-entry table, and the loops are shaped (independent lanes, fixed-size tiles) so that the
//! compiler can vectorize the arithmetic for whatever baseline the target has.

use super::Fp8Matrix;
use super::e4m3::{F16_RESCALE, SCALED_VALUES};
use super::parallel::{Backend, NR};

pub(super) static BACKEND: Backend = Backend {
    mr: MR,
    matvec_rows,
    matmul_rows,
    pack_panel,
    tile,
    dequantize_row,
    pairs: None,
};

const LANES: usize = 8;

/// Tokens per tile of the matrix product.
const MR: usize = 6;

/// `Σ codes[i] · x[i]`, with codes decoded to `e4m3 · 2^-8`.
fn dot(codes: &[u8], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut code_chunks = codes.chunks_exact(LANES);
    let mut x_chunks = x.chunks_exact(LANES);
    for (codes, x) in (&mut code_chunks).zip(&mut x_chunks) {
        for lane in 0..LANES {
            lanes[lane] += SCALED_VALUES[usize::from(codes[lane])] * x[lane];
        }
    }
    let tail: f32 = code_chunks
        .remainder()
        .iter()
        .zip(x_chunks.remainder())
        .map(|(&code, &x)| SCALED_VALUES[usize::from(code)] * x)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

fn matvec_rows(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), w.cols());
    let span = w.scale_span();
    for (row, y) in (first_row..).zip(y.iter_mut()) {
        let codes = w.row_bytes(row);
        *y = w
            .row_scales(row)
            .iter()
            .zip(codes.chunks_exact(span).zip(x.chunks_exact(span)))
            .map(|(&scale, (codes, x))| dot(codes, x) * scale)
            .sum::<f32>()
            * F16_RESCALE;
    }
}

/// Widens each row once (scales applied) and takes its dot product with every token.
fn matmul_rows(w: &Fp8Matrix, first_row: usize, x: &[f32], m: usize, y: &mut [f32]) {
    let cols = w.cols();
    let rows = y.len() / m;
    assert!(x.len() == m * cols && y.len() == m * rows);
    let mut weights = vec![0.0; cols];
    for i in 0..rows {
        dequantize_row(w, first_row + i, &mut weights);
        for (token, x) in x.chunks_exact(cols).enumerate() {
            y[token * rows + i] = dot_f32(&weights, x);
        }
    }
}

/// `Σ a[i] · b[i]` in independent lanes.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    let mut b_chunks = b.chunks_exact(LANES);
    for (a, b) in (&mut a_chunks).zip(&mut b_chunks) {
        for lane in 0..LANES {
            lanes[lane] += a[lane] * b[lane];
        }
    }
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(a, b)| a * b)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

fn pack_panel(w: &Fp8Matrix, first_row: usize, rows: usize, first_col: usize, panel: &mut [f32]) {
    let depth = panel.len() / NR;
    let span = w.scale_span();
    for j in 0..NR {
        if j >= rows {
            panel.iter_mut().skip(j).step_by(NR).for_each(|p| *p = 0.0);
            continue;
        }
        let codes = &w.row_bytes(first_row + j)[first_col..first_col + depth];
        let scales = w.row_scales(first_row + j);
        for (k, &code) in codes.iter().enumerate() {
            let scale = scales[(first_col + k) / span] * F16_RESCALE;
            panel[k * NR + j] = SCALED_VALUES[usize::from(code)] * scale;
        }
    }
}

fn tile(panel: &[f32], x: &[f32], tile: &mut [[f32; NR]]) {
    let depth = panel.len() / NR;
    let tile: &mut [[f32; NR]; MR] = tile.try_into().expect("a tile of MR rows");
    *tile = [[0.0; NR]; MR];
    for (weights, x) in panel.chunks_exact(NR).zip(x[..depth * MR].chunks_exact(MR)) {
        for (row, &x) in tile.iter_mut().zip(x) {
            for (acc, &weight) in row.iter_mut().zip(weights) {
                *acc += x * weight;
            }
        }
    }
}

fn dequantize_row(w: &Fp8Matrix, row: usize, out: &mut [f32]) {
    assert_eq!(out.len(), w.cols());
    let span = w.scale_span();
    let codes = w.row_bytes(row);
    for ((codes, out), &scale) in codes
        .chunks_exact(span)
        .zip(out.chunks_exact_mut(span))
        .zip(w.row_scales(row))
    {
        let scale = scale * F16_RESCALE;
        for (out, &code) in out.iter_mut().zip(codes) {
            *out = SCALED_VALUES[usize::from(code)] * scale;
        }
    }
}
