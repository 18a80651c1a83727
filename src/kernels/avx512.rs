//! x86_64 kernels for AVX-512 (F, on top of AVX2 + FMA + F16C): the matrix product.
//!
//! A prompt is compute-bound, and AVX-512 doubles the work per instruction and the register
//! file. With 16 output channels per panel row, one 512-bit register holds a whole panel row,
//! so a tile is 24 tokens × 16 channels in 24 accumulators, and each input is broadcast from
//! memory as part of its FMA (an embedded broadcast): per reduction step one load of weights
//! and 24 FMAs. Packing a panel decodes 16 weights of a row into one register and transposes
//! 16 × 16 blocks in registers; every weight is packed once per prompt chunk, so at the AVX2
//! packer's speed it took a fifth of a prefill.
//!
//! The matrix-vector product is the AVX2 kernel's scheme at twice the width (64 codes per step,
//! even and odd codes moved into f16 position by shifts, widened from memory), with four rows
//! walked together: half the instructions per weight, yet still bound by the core rather than
//! by memory on Zen 4, where [`super::avx512bf16`] replaces it. Rows with blocked scales that do not cover whole 64-weight steps take the
//! AVX2 kernel; row dequantization is the AVX2 code.
//!
//! The small-batch product walks four rows with the matrix-vector kernel's decoding and
//! multiplies each decoded step into one accumulator per token, four tokens a pass: eight
//! tokens' inputs (64 KiB for a 2048-wide matrix) no longer stay in L1 and ran slower. Blocked
//! scales take the AVX2 kernel, as for the matrix-vector product.

use std::arch::x86_64::*;

use super::avx2;
use super::e4m3::F16_RESCALE;
use super::matrix::Fp8Matrix;
use super::parallel::{Backend, NR};
use super::prefetch::{LINE, prefetch_ahead};
use super::scratch::Scratch;

pub(super) static BACKEND: Backend = Backend {
    mr: MR,
    matvec_rows,
    matmul_rows,
    pack_panel,
    tile,
    dequantize_row: avx2::dequantize_row,
    pairs: None,
};

/// Tokens per register tile: 24 accumulators, the weights and spare registers for the
/// compiler, of 32.
pub(super) const MR: usize = 24;

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile(panel: &[f32], x: &[f32], tile: &mut [[f32; NR]]) {
    let depth = panel.len() / NR;
    assert!(x.len() >= depth * MR && tile.len() == MR);
    let mut acc = [_mm512_setzero_ps(); MR];
    let weights = panel.as_ptr();
    let inputs = x.as_ptr();
    for k in 0..depth {
        // SAFETY: `k < depth`: the panel holds `depth * NR` f32 and the inputs `depth * MR`.
        unsafe {
            let w = _mm512_loadu_ps(weights.add(k * NR));
            let x = inputs.add(k * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(i)), w, *acc);
            }
        }
    }
    for (row, acc) in tile.iter_mut().zip(acc) {
        // SAFETY: each tile row holds NR = 16 f32.
        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), acc) };
    }
}

/// Clears bit 14 of `(code << 8) >> 1` (arithmetic), leaving the f16 pattern of a code.
const F16_MASK: i16 = 0xbfff_u16 as i16;

/// Decodes 16 codes to `e4m3 · 2^-8`, in order.
///
/// # Safety
/// `codes` must be valid for reading 16 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn decode_16(codes: *const u8) -> __m512 {
    // SAFETY: 16 readable bytes (caller); unaligned load.
    let bytes = unsafe { _mm_loadu_si128(codes.cast()) };
    let high_bytes = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(bytes));
    let patterns = _mm256_and_si256(
        _mm256_srai_epi16::<1>(high_bytes),
        _mm256_set1_epi16(F16_MASK),
    );
    _mm512_cvtph_ps(patterns)
}

/// Transposes 16 rows of 16 into 16 columns: within each 128-bit lane as the AVX2 8 × 8
/// transpose does, then the 4 × 4 lanes of each group of four.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_16x16(r: [__m512; 16]) -> [__m512; 16] {
    // u[4g + c], lane l, holds column 4l + c of rows 4g..4g + 4.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let rows = &r[4 * g..4 * g + 4];
        let t0 = _mm512_unpacklo_ps(rows[0], rows[1]);
        let t1 = _mm512_unpackhi_ps(rows[0], rows[1]);
        let t2 = _mm512_unpacklo_ps(rows[2], rows[3]);
        let t3 = _mm512_unpackhi_ps(rows[2], rows[3]);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(t0, t2);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xee>(t0, t2);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xee>(t1, t3);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let low01 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
        let high01 = _mm512_shuffle_f32x4::<0xee>(u[c], u[4 + c]);
        let low23 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
        let high23 = _mm512_shuffle_f32x4::<0xee>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(low01, low23);
        out[4 + c] = _mm512_shuffle_f32x4::<0xdd>(low01, low23);
        out[8 + c] = _mm512_shuffle_f32x4::<0x88>(high01, high23);
        out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(high01, high23);
    }
    out
}

/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn pack_panel(
    w: &Fp8Matrix,
    first_row: usize,
    rows: usize,
    first_col: usize,
    panel: &mut [f32],
) {
    let depth = panel.len() / NR;
    if rows < NR {
        // The last strip of a matrix whose rows are not a multiple of 16.
        // SAFETY: the AVX2 features are a subset of this function's.
        return unsafe { avx2::pack_panel(w, first_row, rows, first_col, panel) };
    }
    assert!(first_row + NR <= w.rows() && first_col + depth <= w.cols());
    let span = w.scale_span();
    let codes: [&[u8]; NR] =
        std::array::from_fn(|j| &w.row_bytes(first_row + j)[first_col..first_col + depth]);
    let scales: [&[f32]; NR] = std::array::from_fn(|j| w.row_scales(first_row + j));
    let whole = depth - depth % 16;
    for k in (0..whole).step_by(16) {
        // Blocks are multiples of 16 and panels start at multiples of 16: one scale per row.
        let block = (first_col + k) / span;
        let rows: [__m512; NR] = std::array::from_fn(|j| {
            // SAFETY: `k + 16 <= depth` codes are in the row's slice.
            let values = unsafe { decode_16(codes[j][k..k + 16].as_ptr()) };
            _mm512_mul_ps(values, _mm512_set1_ps(scales[j][block] * F16_RESCALE))
        });
        for (i, column) in transpose_16x16(rows).into_iter().enumerate() {
            let out = &mut panel[(k + i) * NR..(k + i + 1) * NR];
            // SAFETY: `out` holds 16 f32.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), column) };
        }
    }
    for k in whole..depth {
        for j in 0..NR {
            let scale = scales[j][(first_col + k) / span] * F16_RESCALE;
            panel[k * NR + j] = super::e4m3::SCALED_VALUES[usize::from(codes[j][k])] * scale;
        }
    }
}

/// Codes per step of the matrix-vector kernel: one 512-bit load.
const STEP: usize = 64;
/// Rows walked together by the matrix-vector kernel: four read streams per core.
const ROWS: usize = 4;

/// Places `x` in the order in which [`decode_step`] produces weights: per step of 64, the even
/// columns 0..32, the even columns 32..64, then the odd ones likewise. Zero-padded to whole
/// steps.
fn interleave(x: &[f32]) -> Scratch {
    let mut ordered = Scratch::zeroed(x.len().next_multiple_of(STEP));
    for (col, &x) in x.iter().enumerate() {
        let within = col % STEP;
        let group = (within % 2) * 2 + within / 32;
        ordered[col - within + group * 16 + (within % 32) / 2] = x;
    }
    ordered
}

/// Decodes 64 codes to `e4m3 · 2^-8` in the order of [`interleave`]: each 16-bit lane holds an
/// even code in its low byte and an odd one in its high byte, shifts move each into f16
/// position, and the f16 → f32 conversion reads the patterns from `scratch`, so that it
/// widens in the load unit instead of taking the shuffle port for the upper halves.
///
/// # Safety
/// `codes` must be valid for reading 64 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_step(codes: *const u8, scratch: &mut [__m512i; 2]) -> [__m512; 4] {
    // SAFETY: 64 readable bytes (caller); unaligned load.
    let pairs = unsafe { _mm512_loadu_si512(codes.cast()) };
    scratch[0] = _mm512_and_si512(
        _mm512_srai_epi16::<1>(_mm512_slli_epi16::<8>(pairs)),
        _mm512_set1_epi16(F16_MASK),
    );
    // The low byte's bits land below the f16 mantissa's top three bits and are masked off.
    scratch[1] = _mm512_and_si512(
        _mm512_srai_epi16::<1>(pairs),
        _mm512_set1_epi16(0xbf80_u16 as i16),
    );
    let (a, b, c, d): (__m512, __m512, __m512, __m512);
    // SAFETY: `scratch` holds 128 bytes; the instruction needs AVX-512F, enabled here.
    unsafe {
        std::arch::asm!(
            "vcvtph2ps {a}, ymmword ptr [{p}]",
            "vcvtph2ps {b}, ymmword ptr [{p} + 32]",
            "vcvtph2ps {c}, ymmword ptr [{p} + 64]",
            "vcvtph2ps {d}, ymmword ptr [{p} + 96]",
            p = in(reg) scratch.as_ptr(),
            a = lateout(zmm_reg) a,
            b = lateout(zmm_reg) b,
            c = lateout(zmm_reg) c,
            d = lateout(zmm_reg) d,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    [a, b, c, d]
}

/// `y[r] = W[first_row + r] · x` for `R` rows walked together, scales per row.
///
/// # Safety
/// `first_row + R <= w.rows()`; `x` is `interleave`d from `w.cols()` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dot_rows<const R: usize>(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32; R]) {
    let cols = w.cols();
    let whole = cols - cols % STEP;
    let rows: [&[u8]; R] = std::array::from_fn(|r| w.row_bytes(first_row + r));
    let mut scratch = [[_mm512_setzero_si512(); 2]; R];
    // Two accumulators per row hide the FMA latency.
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let starts = rows.map(<[u8]>::as_ptr);
    let mut step = |codes: [*const u8; R], x: *const f32| {
        // SAFETY: 64 readable f32 at `x` and bytes at each `codes[r]` (callers below).
        unsafe {
            let xs = [
                _mm512_loadu_ps(x),
                _mm512_loadu_ps(x.add(16)),
                _mm512_loadu_ps(x.add(32)),
                _mm512_loadu_ps(x.add(48)),
            ];
            for r in 0..R {
                let w = decode_step(codes[r], &mut scratch[r]);
                acc[r][0] = _mm512_fmadd_ps(w[0], xs[0], acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w[1], xs[1], acc[r][1]);
                acc[r][0] = _mm512_fmadd_ps(w[2], xs[2], acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w[3], xs[3], acc[r][1]);
            }
        }
    };
    for col in (0..whole).step_by(STEP) {
        // Past the matrix's end the addresses are only prefetched, never read.
        for start in starts {
            prefetch_ahead(start.wrapping_add(col));
        }
        // SAFETY: `col + 64 <= whole <= cols`, within every row; `x` holds whole steps.
        step(starts.map(|start| unsafe { start.add(col) }), unsafe {
            x.as_ptr().add(col)
        });
    }
    if whole < cols {
        // The last partial step decodes from zero-padded copies.
        let mut padded = [[0u8; STEP]; R];
        for (padded, row) in padded.iter_mut().zip(&rows) {
            padded[..cols - whole].copy_from_slice(&row[whole..]);
        }
        // SAFETY: 64-byte copies; `x` is padded to whole steps.
        step(padded.each_ref().map(|p| p.as_ptr()), unsafe {
            x.as_ptr().add(whole)
        });
    }
    for r in 0..R {
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        y[r] = sum * (w.row_scales(first_row + r)[0] * F16_RESCALE);
    }
}

/// # Safety
/// The CPU must support AVX-512F and BW, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn matvec_rows(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32]) {
    if w.block().is_some() {
        // SAFETY: the AVX2 features are a subset of this function's.
        return unsafe { avx2::matvec_rows(w, first_row, x, y) };
    }
    assert!(x.len() == w.cols() && first_row + y.len() <= w.rows());
    const { assert!(LINE == STEP) };
    let x = interleave(x);
    let mut groups = y.chunks_exact_mut(ROWS);
    let mut row = first_row;
    for y in &mut groups {
        let y: &mut [f32; ROWS] = y.try_into().expect("chunks_exact yields ROWS elements");
        // SAFETY: rows `row..row + ROWS` exist (asserted above).
        unsafe { dot_rows(w, row, &x, y) };
        row += ROWS;
    }
    for y in groups.into_remainder() {
        // SAFETY: as above.
        unsafe { dot_rows(w, row, &x, std::array::from_mut(y)) };
        row += 1;
    }
}

/// Rows walked together by the small-batch kernel.
const BATCH_ROWS: usize = 4;
/// Tokens per pass of the small-batch kernel: with [`BATCH_ROWS`], 16 accumulators, the four
/// widened weights of a row and the compiler's temporaries.
const BATCH_TOKENS: usize = 4;

/// `out[t][r] = W[first_row + r] · x_t` for `R` rows and `T` tokens walked together: each step
/// of a row is decoded once and multiplied into one accumulator per token. `x` holds the tokens'
/// `interleave`d inputs `stride` apart.
///
/// # Safety
/// `first_row + R <= w.rows()`; `x` holds `T` inputs of `stride >= w.cols()` rounded up to
/// whole steps.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
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
    let mut scratch = [[_mm512_setzero_si512(); 2]; R];
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let starts = rows.map(<[u8]>::as_ptr);
    let mut step = |codes: [*const u8; R], col: usize| {
        // SAFETY: 64 readable bytes at each `codes[r]` (callers below); every token's inputs
        // hold whole steps, so `col + 64 <= stride`.
        unsafe {
            for r in 0..R {
                let w = decode_step(codes[r], &mut scratch[r]);
                for t in 0..T {
                    let x = x.as_ptr().add(t * stride + col);
                    let acc = &mut acc[r][t];
                    *acc = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), *acc);
                    *acc = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x.add(16)), *acc);
                    *acc = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(x.add(32)), *acc);
                    *acc = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(x.add(48)), *acc);
                }
            }
        }
    };
    for col in (0..whole).step_by(STEP) {
        // Past the matrix's end the addresses are only prefetched, never read.
        for start in starts {
            prefetch_ahead(start.wrapping_add(col));
        }
        // SAFETY: `col + 64 <= whole <= cols`, within every row.
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
    let scales: [f32; R] = std::array::from_fn(|r| w.row_scales(first_row + r)[0] * F16_RESCALE);
    std::array::from_fn(|t| std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r][t]) * scales[r]))
}

/// One pass of `R` rows over `tokens <= BATCH_TOKENS` tokens, writing `y[t * stride_y + r]`.
///
/// # Safety
/// As [`dot_tokens`], for `tokens` inputs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
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
/// The CPU must support AVX-512F and BW, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(
    w: &Fp8Matrix,
    first_row: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) {
    if w.block().is_some() {
        // SAFETY: the AVX2 features are a subset of this function's.
        return unsafe { avx2::matmul_rows(w, first_row, x, m, y) };
    }
    let cols = w.cols();
    let rows = y.len() / m;
    assert!(x.len() == m * cols && y.len() == m * rows && first_row + rows <= w.rows());
    let stride = cols.next_multiple_of(STEP);
    let x: Vec<f32> = x
        .chunks_exact(cols)
        .flat_map(|x| interleave(x).to_vec())
        .collect();
    // Row groups outside, token passes inside: a group's weights come from memory once and
    // stay in L1 for the later passes.
    for first in (0..rows).step_by(BATCH_ROWS) {
        for token in (0..m).step_by(BATCH_TOKENS) {
            let tokens = BATCH_TOKENS.min(m - token);
            let x = &x[token * stride..];
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
