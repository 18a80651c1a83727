//! aarch64 kernels for Advanced SIMD (NEON), present on every ARMv8-A core.
//!
//! A code becomes an f16 bit pattern with a widening shift, a shift and a mask (see
//! [`super::e4m3::f16_bits`]); `fcvtl`/`fcvtl2` widen that to f32, subnormals included, so no f32
//! denormal is ever formed. The conversions are written as inline assembly because their
//! intrinsics take Rust's `f16` vector types, which are not stable yet.

use std::arch::aarch64::*;
use std::arch::asm;

use super::e4m3::{F16_RESCALE, SCALED_VALUES};
use super::matrix::{Fp8Matrix, ScaleCursor};
use super::parallel::{Backend, NR};
use super::prefetch::{LINE, prefetch_ahead};

pub(super) static BACKEND: Backend = Backend {
    mr: MR,
    matvec_rows,
    matmul_rows,
    pack_panel,
    tile,
    dequantize_row,
    pairs: None,
};

/// Rows walked together by the matrix-vector kernel.
const ROWS: usize = 4;

/// Tokens per register tile of the matrix product: 6 × 4 accumulators and 4 weight vectors
/// take 28 of the 32 registers.
const MR: usize = 6;
/// Codes per step of the kernels: one 128-bit register.
const STEP: usize = 16;

/// Clears bit 14 of `(code << 8) >> 1` (arithmetic), leaving the f16 pattern of a code.
const F16_MASK: u16 = 0xbfff;

/// f32 values of the low four f16 patterns.
#[inline(always)]
fn widen_low(patterns: uint16x8_t) -> float32x4_t {
    let values: float32x4_t;
    // SAFETY: a register-only conversion, available on every aarch64 core.
    unsafe {
        asm!(
            "fcvtl {values:v}.4s, {patterns:v}.4h",
            patterns = in(vreg) patterns,
            values = lateout(vreg) values,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    values
}

/// f32 values of the high four f16 patterns.
#[inline(always)]
fn widen_high(patterns: uint16x8_t) -> float32x4_t {
    let values: float32x4_t;
    // SAFETY: as for `widen_low`.
    unsafe {
        asm!(
            "fcvtl2 {values:v}.4s, {patterns:v}.8h",
            patterns = in(vreg) patterns,
            values = lateout(vreg) values,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    values
}

/// f16 patterns of codes held in the high bytes of 16-bit lanes.
#[inline(always)]
fn patterns(high_bytes: uint16x8_t) -> uint16x8_t {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe {
        let shifted = vreinterpretq_u16_s16(vshrq_n_s16::<1>(vreinterpretq_s16_u16(high_bytes)));
        vandq_u16(shifted, vdupq_n_u16(F16_MASK))
    }
}

/// Decodes 16 codes to `e4m3 · 2^-8`, in order.
///
/// # Safety
/// `codes` must be valid for reading 16 bytes.
#[inline(always)]
unsafe fn decode_16(codes: *const u8) -> [float32x4_t; 4] {
    // SAFETY: 16 readable bytes (caller).
    let bytes = unsafe { vld1q_u8(codes) };
    // SAFETY: NEON is part of the aarch64 baseline.
    let (low, high) = unsafe {
        (
            patterns(vshll_n_u8::<8>(vget_low_u8(bytes))),
            patterns(vshll_high_n_u8::<8>(bytes)),
        )
    };
    [
        widen_low(low),
        widen_high(low),
        widen_low(high),
        widen_high(high),
    ]
}

/// Adds one step of `R` rows to `acc`: `codes[r]` are 16 codes of row `r`, `x` the matching
/// inputs. With `scales` (blocked layout) each row's step is scaled before accumulation.
///
/// # Safety
/// `x` must be valid for reading 16 f32 and each `codes[r]` for 16 bytes.
#[inline(always)]
unsafe fn step<const R: usize>(
    codes: [*const u8; R],
    x: *const f32,
    scales: Option<[f32; R]>,
    acc: &mut [[float32x4_t; 2]; R],
) {
    // SAFETY: 16 readable f32 and bytes (caller); NEON is part of the aarch64 baseline.
    unsafe {
        let xs = [
            vld1q_f32(x),
            vld1q_f32(x.add(4)),
            vld1q_f32(x.add(8)),
            vld1q_f32(x.add(12)),
        ];
        for r in 0..R {
            let w = decode_16(codes[r]);
            match scales {
                None => {
                    acc[r][0] = vfmaq_f32(acc[r][0], w[0], xs[0]);
                    acc[r][1] = vfmaq_f32(acc[r][1], w[1], xs[1]);
                    acc[r][0] = vfmaq_f32(acc[r][0], w[2], xs[2]);
                    acc[r][1] = vfmaq_f32(acc[r][1], w[3], xs[3]);
                }
                Some(scales) => {
                    let low = vfmaq_f32(vmulq_f32(w[0], xs[0]), w[1], xs[1]);
                    let high = vfmaq_f32(vmulq_f32(w[2], xs[2]), w[3], xs[3]);
                    acc[r][0] = vfmaq_n_f32(acc[r][0], low, scales[r]);
                    acc[r][1] = vfmaq_n_f32(acc[r][1], high, scales[r]);
                }
            }
        }
    }
}

/// `y[r] = W[first_row + r] · x` for `R` rows walked together.
///
/// # Safety
/// `first_row + R <= w.rows()` and `x.len() == w.cols()`.
#[inline(always)]
unsafe fn dot_rows<const R: usize>(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32; R]) {
    let cols = w.cols();
    let whole = cols - cols % STEP;
    let rows: [&[u8]; R] = std::array::from_fn(|r| w.row_bytes(first_row + r));
    let row_scales: [&[f32]; R] = std::array::from_fn(|r| w.row_scales(first_row + r));
    // SAFETY: NEON is part of the aarch64 baseline.
    let zero = unsafe { vdupq_n_f32(0.0) };
    // Two accumulators per row hide the FMA latency.
    let mut acc = [[zero; 2]; R];
    let mut cursor = w.block().map(|_| ScaleCursor::new(w));
    let mut step_scales = || {
        cursor.as_mut().map(|cursor| {
            let index = cursor.next();
            let mut scales = [0.0; R];
            for (scale, row) in scales.iter_mut().zip(&row_scales) {
                *scale = row[index];
            }
            scales
        })
    };
    let starts = rows.map(<[u8]>::as_ptr);
    for col in (0..whole).step_by(STEP) {
        if col % LINE == 0 {
            // Past the matrix's end the addresses are only prefetched, never read.
            for start in starts {
                prefetch_ahead(start.wrapping_add(col));
            }
        }
        // SAFETY: `col < whole <= cols`, within every row.
        let codes = starts.map(|start| unsafe { start.add(col) });
        // SAFETY: `x` and every row hold 16 elements from `col`.
        unsafe { step(codes, x.as_ptr().add(col), step_scales(), &mut acc) };
    }
    if whole < cols {
        // The last partial step goes through zero-padded copies.
        let len = cols - whole;
        let mut padded = [[0u8; STEP]; R];
        for (padded, row) in padded.iter_mut().zip(&rows) {
            padded[..len].copy_from_slice(&row[whole..]);
        }
        let mut xs = [0.0f32; STEP];
        xs[..len].copy_from_slice(&x[whole..]);
        let codes = padded.each_ref().map(|padded| padded.as_ptr());
        // SAFETY: 16-element copies.
        unsafe { step(codes, xs.as_ptr(), step_scales(), &mut acc) };
    }
    for r in 0..R {
        let scale = if w.block().is_some() {
            1.0
        } else {
            row_scales[r][0]
        };
        // SAFETY: NEON is part of the aarch64 baseline.
        let sum = unsafe { vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1])) };
        y[r] = sum * (scale * F16_RESCALE);
    }
}

/// # Safety
/// None beyond the aarch64 baseline; `unsafe` to fit [`Backend`].
unsafe fn matvec_rows(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32]) {
    assert!(x.len() == w.cols() && first_row + y.len() <= w.rows());
    let mut groups = y.chunks_exact_mut(ROWS);
    let mut row = first_row;
    for y in &mut groups {
        let y: &mut [f32; ROWS] = y.try_into().expect("chunks_exact yields ROWS elements");
        // SAFETY: rows `row..row + ROWS` exist (asserted above).
        unsafe { dot_rows(w, row, x, y) };
        row += ROWS;
    }
    for y in groups.into_remainder() {
        // SAFETY: as above.
        unsafe { dot_rows(w, row, x, std::array::from_mut(y)) };
        row += 1;
    }
}

/// Rows walked together by the small-batch kernel.
const BATCH_ROWS: usize = 4;
/// Tokens per pass of the small-batch kernel: 16 accumulators, the four widened weights of a
/// row and four inputs take 24 of the 32 registers.
const BATCH_TOKENS: usize = 4;

/// `out[t][r] = W[first_row + r] · x_t` for `R` rows and `T` tokens walked together: each step
/// of a row is decoded (and, with blocked scales, scaled) once and multiplied into one
/// accumulator per token. `x` holds the tokens' inputs `stride` apart, zero-padded to whole
/// steps.
///
/// # Safety
/// `first_row + R <= w.rows()`; `x` holds `T` inputs of `stride >= w.cols()` rounded up to
/// whole steps.
#[inline(always)]
unsafe fn dot_tokens<const R: usize, const T: usize>(
    w: &Fp8Matrix,
    first_row: usize,
    x: &[f32],
    stride: usize,
) -> [[f32; R]; T] {
    let cols = w.cols();
    let whole = cols - cols % STEP;
    assert!(x.len() >= T * stride && stride >= cols.next_multiple_of(STEP));
    let rows: [&[u8]; R] = std::array::from_fn(|r| w.row_bytes(first_row + r));
    let row_scales: [&[f32]; R] = std::array::from_fn(|r| w.row_scales(first_row + r));
    // SAFETY: NEON is part of the aarch64 baseline.
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut acc = [[zero; T]; R];
    let mut cursor = w.block().map(|_| ScaleCursor::new(w));
    let starts = rows.map(<[u8]>::as_ptr);
    let mut step = |codes: [*const u8; R], col: usize| {
        let scale = cursor.as_mut().map(ScaleCursor::next);
        // SAFETY: 16 readable bytes at each `codes[r]` (callers below); every token's inputs
        // hold whole steps, so `col + 16 <= stride`; NEON is part of the aarch64 baseline.
        unsafe {
            for r in 0..R {
                let mut w = decode_16(codes[r]);
                if let Some(index) = scale {
                    w = w.map(|w| vmulq_n_f32(w, row_scales[r][index]));
                }
                for t in 0..T {
                    let x = x.as_ptr().add(t * stride + col);
                    let acc = &mut acc[r][t];
                    *acc = vfmaq_f32(*acc, w[0], vld1q_f32(x));
                    *acc = vfmaq_f32(*acc, w[1], vld1q_f32(x.add(4)));
                    *acc = vfmaq_f32(*acc, w[2], vld1q_f32(x.add(8)));
                    *acc = vfmaq_f32(*acc, w[3], vld1q_f32(x.add(12)));
                }
            }
        }
    };
    for col in (0..whole).step_by(STEP) {
        if col % LINE == 0 {
            // Past the matrix's end the addresses are only prefetched, never read.
            for start in starts {
                prefetch_ahead(start.wrapping_add(col));
            }
        }
        // SAFETY: `col + 16 <= whole <= cols`, within every row.
        step(starts.map(|start| unsafe { start.add(col) }), col);
    }
    if whole < cols {
        // The last partial step decodes from zero-padded copies.
        let mut padded = [[0u8; STEP]; R];
        for (padded, row) in padded.iter_mut().zip(&rows) {
            padded[..cols - whole].copy_from_slice(&row[whole..]);
        }
        step(padded.each_ref().map(|p| p.as_ptr()), whole);
    }
    let scales: [f32; R] = std::array::from_fn(|r| match w.block() {
        Some(_) => F16_RESCALE,
        None => row_scales[r][0] * F16_RESCALE,
    });
    // SAFETY: NEON is part of the aarch64 baseline.
    std::array::from_fn(|t| std::array::from_fn(|r| unsafe { vaddvq_f32(acc[r][t]) } * scales[r]))
}

/// One pass of `R` rows over `tokens <= BATCH_TOKENS` tokens, writing `y[t * stride_y + r]`.
///
/// # Safety
/// As [`dot_tokens`], for `tokens` inputs.
#[inline(always)]
unsafe fn pass<const R: usize>(
    w: &Fp8Matrix,
    first_row: usize,
    x: &[f32],
    stride: usize,
    tokens: usize,
    y: &mut [f32],
    stride_y: usize,
) {
    fn store<const R: usize, const T: usize>(out: [[f32; R]; T], y: &mut [f32], stride_y: usize) {
        for (t, out) in out.iter().enumerate() {
            y[t * stride_y..t * stride_y + R].copy_from_slice(out);
        }
    }
    // SAFETY: as the caller's; each arm reads `T == tokens` inputs.
    unsafe {
        match tokens {
            1 => store(dot_tokens::<R, 1>(w, first_row, x, stride), y, stride_y),
            2 => store(dot_tokens::<R, 2>(w, first_row, x, stride), y, stride_y),
            3 => store(dot_tokens::<R, 3>(w, first_row, x, stride), y, stride_y),
            BATCH_TOKENS => store(
                dot_tokens::<R, BATCH_TOKENS>(w, first_row, x, stride),
                y,
                stride_y,
            ),
            _ => unreachable!("passes take 1 to {BATCH_TOKENS} tokens"),
        }
    }
}

/// # Safety
/// None beyond the aarch64 baseline; `unsafe` to fit [`Backend`].
unsafe fn matmul_rows(w: &Fp8Matrix, first_row: usize, x: &[f32], m: usize, y: &mut [f32]) {
    let cols = w.cols();
    let rows = y.len() / m;
    assert!(x.len() == m * cols && y.len() == m * rows && first_row + rows <= w.rows());
    let stride = cols.next_multiple_of(STEP);
    let mut padded = vec![0.0; m * stride];
    for (padded, x) in padded.chunks_exact_mut(stride).zip(x.chunks_exact(cols)) {
        padded[..cols].copy_from_slice(x);
    }
    // Row groups outside, token passes inside: a group's weights come from memory once and
    // stay in L1 for the later passes.
    for first in (0..rows).step_by(BATCH_ROWS) {
        for token in (0..m).step_by(BATCH_TOKENS) {
            let tokens = BATCH_TOKENS.min(m - token);
            let x = &padded[token * stride..];
            let y = &mut y[token * rows + first..];
            // SAFETY: the rows exist (asserted above); `x` holds `tokens` padded inputs.
            unsafe {
                if first + BATCH_ROWS <= rows {
                    pass::<BATCH_ROWS>(w, first_row + first, x, stride, tokens, y, rows);
                } else {
                    for r in first..rows {
                        let y = &mut y[r - first..];
                        pass::<1>(w, first_row + r, x, stride, tokens, y, rows);
                    }
                }
            }
        }
    }
}

/// Transposes four rows of four into four columns.
#[inline(always)]
fn transpose_4x4(r: [float32x4_t; 4]) -> [float32x4_t; 4] {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe {
        let t0 = vtrn1q_f32(r[0], r[1]);
        let t1 = vtrn2q_f32(r[0], r[1]);
        let t2 = vtrn1q_f32(r[2], r[3]);
        let t3 = vtrn2q_f32(r[2], r[3]);
        let pairs = |a: float32x4_t, b: float32x4_t| {
            let (a, b) = (vreinterpretq_f64_f32(a), vreinterpretq_f64_f32(b));
            (
                vreinterpretq_f32_f64(vtrn1q_f64(a, b)),
                vreinterpretq_f32_f64(vtrn2q_f64(a, b)),
            )
        };
        let (c0, c2) = pairs(t0, t2);
        let (c1, c3) = pairs(t1, t3);
        [c0, c1, c2, c3]
    }
}

/// # Safety
/// None beyond the aarch64 baseline; `unsafe` to fit [`Backend`].
unsafe fn pack_panel(
    w: &Fp8Matrix,
    first_row: usize,
    rows: usize,
    first_col: usize,
    panel: &mut [f32],
) {
    let depth = panel.len() / NR;
    assert!(rows <= NR && first_row + rows <= w.rows() && first_col + depth <= w.cols());
    let span = w.scale_span();
    // SAFETY: NEON is part of the aarch64 baseline.
    let zero = unsafe { vdupq_n_f32(0.0) };
    // Sixteen columns at a time; scale blocks are multiples of 16 and panels start at multiples
    // of 16, so these never straddle two scales.
    let mut k = 0;
    while k + STEP <= depth {
        for quad in 0..NR / 4 {
            let mut decoded = [[zero; 4]; 4];
            for (i, decoded) in decoded.iter_mut().enumerate() {
                let j = quad * 4 + i;
                if j < rows {
                    let row = first_row + j;
                    let scale = w.row_scales(row)[(first_col + k) / span] * F16_RESCALE;
                    let codes = &w.row_bytes(row)[first_col + k..first_col + k + STEP];
                    // SAFETY: `codes` holds 16 bytes.
                    let values = unsafe { decode_16(codes.as_ptr()) };
                    // SAFETY: NEON is part of the aarch64 baseline.
                    *decoded = values.map(|v| unsafe { vmulq_n_f32(v, scale) });
                }
            }
            for part in 0..STEP / 4 {
                let columns = transpose_4x4(std::array::from_fn(|i| decoded[i][part]));
                for (c, column) in columns.into_iter().enumerate() {
                    let start = (k + part * 4 + c) * NR + quad * 4;
                    let out = &mut panel[start..start + 4];
                    // SAFETY: `out` holds 4 f32.
                    unsafe { vst1q_f32(out.as_mut_ptr(), column) };
                }
            }
        }
        k += STEP;
    }
    for k in k..depth {
        for j in 0..NR {
            panel[k * NR + j] = if j < rows {
                let row = first_row + j;
                let code = w.row_bytes(row)[first_col + k];
                let scale = w.row_scales(row)[(first_col + k) / span] * F16_RESCALE;
                SCALED_VALUES[usize::from(code)] * scale
            } else {
                0.0
            };
        }
    }
}

/// # Safety
/// None beyond the aarch64 baseline; `unsafe` to fit [`Backend`].
unsafe fn tile(panel: &[f32], x: &[f32], tile: &mut [[f32; NR]]) {
    let depth = panel.len() / NR;
    assert!(x.len() >= depth * MR && tile.len() == MR);
    // SAFETY: NEON is part of the aarch64 baseline.
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut acc = [[zero; NR / 4]; MR];
    let weights = panel.as_ptr();
    let inputs = x.as_ptr();
    for k in 0..depth {
        // SAFETY: `k < depth`: the panel holds `depth * NR` f32 and the inputs `depth * MR`.
        unsafe {
            let w = weights.add(k * NR);
            let w = [
                vld1q_f32(w),
                vld1q_f32(w.add(4)),
                vld1q_f32(w.add(8)),
                vld1q_f32(w.add(12)),
            ];
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = *inputs.add(k * MR + i);
                for (acc, &w) in acc.iter_mut().zip(&w) {
                    *acc = vfmaq_n_f32(*acc, w, x);
                }
            }
        }
    }
    for (row, acc) in tile.iter_mut().zip(acc) {
        for (part, acc) in acc.into_iter().enumerate() {
            let out = &mut row[part * 4..part * 4 + 4];
            // SAFETY: `out` holds 4 f32.
            unsafe { vst1q_f32(out.as_mut_ptr(), acc) };
        }
    }
}

/// # Safety
/// None beyond the aarch64 baseline; `unsafe` to fit [`Backend`].
unsafe fn dequantize_row(w: &Fp8Matrix, row: usize, out: &mut [f32]) {
    assert_eq!(out.len(), w.cols());
    let span = w.scale_span();
    let codes = w.row_bytes(row);
    let scales = w.row_scales(row);
    let mut k = 0;
    while k + STEP <= out.len() {
        // Blocks are multiples of 16, so one scale covers these 16 columns.
        let scale = scales[k / span] * F16_RESCALE;
        // SAFETY: `k + 16 <= cols` codes and outputs.
        unsafe {
            let values = decode_16(codes.as_ptr().add(k));
            for (part, values) in values.into_iter().enumerate() {
                vst1q_f32(
                    out.as_mut_ptr().add(k + part * 4),
                    vmulq_n_f32(values, scale),
                );
            }
        }
        k += STEP;
    }
    for k in k..out.len() {
        out[k] = SCALED_VALUES[usize::from(codes[k])] * (scales[k / span] * F16_RESCALE);
    }
}
