//! x86_64 kernels for AVX2 + FMA + F16C.
//!
//! A code becomes an f16 bit pattern with shifts and a mask (see [`super::e4m3::f16_bits`]);
//! `vcvtph2ps` widens that to f32, subnormals included, so no f32 denormal is ever formed.
//!
//! The matrix-vector product is what a decode step waits on, and on two cores it is barely
//! faster than memory, so its inner loop avoids the shuffle port, the bottleneck here: codes are
//! taken as pairs in 16-bit lanes and moved into place with shifts alone (which puts even and odd
//! columns in separate vectors, so `x` is reordered to match once per call), and the f16 → f32
//! conversion reads its input from memory, which widens in the load unit. Two rows are walked
//! together so that each loaded piece of `x` serves both, with two accumulators per row to hide
//! the FMA latency; more rows run out of registers.

use std::arch::x86_64::*;

use super::e4m3::{F16_RESCALE, SCALED_VALUES};
use super::matrix::{Fp8Matrix, ScaleCursor};
use super::parallel::{Backend, NR};
use super::prefetch::{LINE, prefetch_ahead};
use super::scratch::Scratch;

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
const ROWS: usize = 2;

/// Tokens per register tile of the matrix product: 6 × 2 accumulators, 2 weight vectors and a
/// broadcast fill 15 of the 16 registers.
const MR: usize = 6;

/// Clears bit 14 of `(code << 8) >> 1` (arithmetic), leaving the f16 pattern of a code.
const F16_MASK: i16 = 0xbfff_u16 as i16;

/// The f16 patterns of eight codes held in the high bytes of 16-bit lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn patterns_128(high_bytes: __m128i) -> __m128i {
    _mm_and_si128(_mm_srai_epi16::<1>(high_bytes), _mm_set1_epi16(F16_MASK))
}

#[inline]
#[target_feature(enable = "avx2")]
fn patterns_256(high_bytes: __m256i) -> __m256i {
    _mm256_and_si256(
        _mm256_srai_epi16::<1>(high_bytes),
        _mm256_set1_epi16(F16_MASK),
    )
}

/// Decodes 16 codes to `e4m3 · 2^-8`, in order.
///
/// # Safety
/// `codes` must be valid for reading 16 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn decode_16(codes: *const u8) -> [__m256; 2] {
    // SAFETY: 16 readable bytes (caller); unaligned load.
    let bytes = unsafe { _mm_loadu_si128(codes.cast()) };
    let zero = _mm_setzero_si128();
    [
        _mm256_cvtph_ps(patterns_128(_mm_unpacklo_epi8(zero, bytes))),
        _mm256_cvtph_ps(patterns_128(_mm_unpackhi_epi8(zero, bytes))),
    ]
}

/// Decodes 8 codes to `e4m3 · 2^-8`.
///
/// # Safety
/// `codes` must be valid for reading 8 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn decode_8(codes: *const u8) -> __m256 {
    // SAFETY: 8 readable bytes (caller).
    let bytes = unsafe { _mm_loadl_epi64(codes.cast()) };
    _mm256_cvtph_ps(patterns_128(_mm_unpacklo_epi8(_mm_setzero_si128(), bytes)))
}

#[inline]
#[target_feature(enable = "avx2")]
fn horizontal_sum(v: __m256) -> f32 {
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// Bytes of codes per step of the matrix-vector kernel.
const STEP: usize = 32;

/// Places `x` in the order in which [`decode_step`] produces weights: per step of 32, the even
/// columns 0..16, the odd ones, then the even and odd columns 16..32. Zero-padded to whole steps.
fn interleave(x: &[f32]) -> Scratch {
    let mut ordered = Scratch::zeroed(x.len().next_multiple_of(STEP));
    for (col, &x) in x.iter().enumerate() {
        let within = col % STEP;
        let half = within / 16;
        let odd = within % 2;
        ordered[col - within + half * 16 + odd * 8 + (within % 16) / 2] = x;
    }
    ordered
}

/// Converts the 32 f16 patterns of a step, stored as `[even codes, odd codes]`, to f32 in the
/// order of [`interleave`]. The memory form of `vcvtph2ps` widens in the load unit, leaving the
/// shuffle port — the bottleneck of this kernel — free; written as intrinsics, the compiler
/// would forward the stored patterns through registers and extract the upper halves instead.
///
/// # Safety
/// `patterns` must be valid for reading 64 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen(patterns: *const __m256i) -> [__m256; 4] {
    let (a, b, c, d): (__m256, __m256, __m256, __m256);
    // SAFETY: 64 readable bytes (caller); the instruction needs F16C, enabled here.
    unsafe {
        std::arch::asm!(
            "vcvtph2ps {a}, xmmword ptr [{p}]",
            "vcvtph2ps {b}, xmmword ptr [{p} + 32]",
            "vcvtph2ps {c}, xmmword ptr [{p} + 16]",
            "vcvtph2ps {d}, xmmword ptr [{p} + 48]",
            p = in(reg) patterns,
            a = lateout(ymm_reg) a,
            b = lateout(ymm_reg) b,
            c = lateout(ymm_reg) c,
            d = lateout(ymm_reg) d,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    [a, b, c, d]
}

/// Decodes 32 codes to `e4m3 · 2^-8`, in the order of [`interleave`]: each 16-bit lane holds
/// an even code in its low byte and an odd one in its high byte, and shifts (no shuffles) move
/// each into f16 position. `scratch` is where the patterns pass through memory (see [`widen`]).
///
/// # Safety
/// `codes` must be valid for reading 32 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn decode_step(codes: *const u8, scratch: &mut [__m256i; 2]) -> [__m256; 4] {
    // SAFETY: 32 readable bytes (caller); unaligned load.
    let pairs = unsafe { _mm256_loadu_si256(codes.cast()) };
    scratch[0] = patterns_256(_mm256_slli_epi16::<8>(pairs));
    // The low byte's bits land below the f16 mantissa's top three bits and are masked off.
    scratch[1] = _mm256_and_si256(
        _mm256_srai_epi16::<1>(pairs),
        _mm256_set1_epi16(0xbf80_u16 as i16),
    );
    // SAFETY: `scratch` holds 64 bytes.
    unsafe { widen(scratch.as_ptr()) }
}

/// Scales for one step of a row: those of its first and second 16 columns.
type StepScales = (f32, f32);

/// Adds one step of `R` rows to `acc`: `codes[r]` are 32 codes of row `r`, `x` the matching
/// `interleave`d inputs. With `scales`, each 16 columns are scaled before accumulation (blocked
/// layout); without, the row's scale is applied once at the end.
///
/// # Safety
/// `x` must be valid for reading 32 f32 and each `codes[r]` for 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step<const R: usize>(
    codes: [*const u8; R],
    x: *const f32,
    scales: Option<[StepScales; R]>,
    scratch: &mut [[__m256i; 2]; R],
    acc: &mut [[__m256; 2]; R],
) {
    // SAFETY: 32 readable f32 and bytes (caller).
    unsafe {
        let xs = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        for r in 0..R {
            let w = decode_step(codes[r], &mut scratch[r]);
            match scales {
                None => {
                    acc[r][0] = _mm256_fmadd_ps(w[0], xs[0], acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w[1], xs[1], acc[r][1]);
                    acc[r][0] = _mm256_fmadd_ps(w[2], xs[2], acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w[3], xs[3], acc[r][1]);
                }
                Some(scales) => {
                    let (low_scale, high_scale) = scales[r];
                    let low = _mm256_fmadd_ps(w[1], xs[1], _mm256_mul_ps(w[0], xs[0]));
                    let high = _mm256_fmadd_ps(w[3], xs[3], _mm256_mul_ps(w[2], xs[2]));
                    acc[r][0] = _mm256_fmadd_ps(low, _mm256_set1_ps(low_scale), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(high, _mm256_set1_ps(high_scale), acc[r][1]);
                }
            }
        }
    }
}

/// `y[r] = W[first_row + r] · x` for `R` rows walked together.
///
/// # Safety
/// `first_row + R <= w.rows()`; `x` is `interleave`d from `w.cols()` values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows<const R: usize>(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32; R]) {
    let cols = w.cols();
    let whole = cols - cols % STEP;
    let rows: [&[u8]; R] = std::array::from_fn(|r| w.row_bytes(first_row + r));
    let row_scales: [&[f32]; R] = std::array::from_fn(|r| w.row_scales(first_row + r));
    let mut scratch = [[_mm256_setzero_si256(); 2]; R];
    // Two accumulators per row hide the FMA latency.
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut cursor = w.block().map(|_| ScaleCursor::new(w));
    let mut step_scales = || {
        cursor.as_mut().map(|cursor| {
            let (low, high) = (cursor.next(), cursor.next());
            let mut scales = [(0.0, 0.0); R];
            for (scales, row) in scales.iter_mut().zip(&row_scales) {
                *scales = (row[low], row[high]);
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
        // SAFETY: `x` holds whole steps (interleave); each row 32 codes from `col`.
        unsafe {
            step(
                codes,
                x.as_ptr().add(col),
                step_scales(),
                &mut scratch,
                &mut acc,
            )
        };
    }
    if whole < cols {
        // The last partial step decodes from zero-padded copies.
        let mut padded = [[0u8; STEP]; R];
        for (padded, row) in padded.iter_mut().zip(&rows) {
            padded[..cols - whole].copy_from_slice(&row[whole..]);
        }
        let codes = padded.each_ref().map(|padded| padded.as_ptr());
        // SAFETY: as above, with 32-byte copies.
        unsafe {
            step(
                codes,
                x.as_ptr().add(whole),
                step_scales(),
                &mut scratch,
                &mut acc,
            )
        };
    }
    for r in 0..R {
        let scale = if w.block().is_some() {
            1.0
        } else {
            row_scales[r][0]
        };
        y[r] = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1])) * (scale * F16_RESCALE);
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matvec_rows(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32]) {
    assert!(x.len() == w.cols() && first_row + y.len() <= w.rows());
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
const BATCH_ROWS: usize = 2;
/// Tokens per pass of the small-batch kernel: 8 accumulators, the four widened weights of a
/// row and two scales fill 14 of the 16 registers.
const BATCH_TOKENS: usize = 4;

/// `out[t][r] = W[first_row + r] · x_t` for `R` rows and `T` tokens walked together: each step
/// of a row is decoded (and, with blocked scales, scaled) once and multiplied into one
/// accumulator per token. `x` holds the tokens' `interleave`d inputs `stride` apart.
///
/// # Safety
/// `first_row + R <= w.rows()`; `x` holds `T` inputs of `stride >= w.cols()` rounded up to
/// whole steps.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut scratch = [[_mm256_setzero_si256(); 2]; R];
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut cursor = w.block().map(|_| ScaleCursor::new(w));
    let starts = rows.map(<[u8]>::as_ptr);
    let mut step = |codes: [*const u8; R], col: usize| {
        let scales = cursor.as_mut().map(|cursor| (cursor.next(), cursor.next()));
        // SAFETY: 32 readable bytes at each `codes[r]` (callers below); every token's inputs
        // hold whole steps, so `col + 32 <= stride`.
        unsafe {
            for r in 0..R {
                let mut w = decode_step(codes[r], &mut scratch[r]);
                if let Some((low, high)) = scales {
                    let (low, high) = (row_scales[r][low], row_scales[r][high]);
                    w[0] = _mm256_mul_ps(w[0], _mm256_set1_ps(low));
                    w[1] = _mm256_mul_ps(w[1], _mm256_set1_ps(low));
                    w[2] = _mm256_mul_ps(w[2], _mm256_set1_ps(high));
                    w[3] = _mm256_mul_ps(w[3], _mm256_set1_ps(high));
                }
                for t in 0..T {
                    let x = x.as_ptr().add(t * stride + col);
                    let acc = &mut acc[r][t];
                    *acc = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), *acc);
                    *acc = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), *acc);
                    *acc = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), *acc);
                    *acc = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), *acc);
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
        // SAFETY: `col + 32 <= whole <= cols`, within every row.
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
    std::array::from_fn(|t| std::array::from_fn(|r| horizontal_sum(acc[r][t]) * scales[r]))
}

/// One pass of `R` rows over `tokens <= BATCH_TOKENS` tokens, writing `y[t * stride_y + r]`.
///
/// # Safety
/// As [`dot_tokens`], for `tokens` inputs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(
    w: &Fp8Matrix,
    first_row: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) {
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

/// Transposes eight rows of eight into eight columns.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose_8x8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pack_panel(
    w: &Fp8Matrix,
    first_row: usize,
    rows: usize,
    first_col: usize,
    panel: &mut [f32],
) {
    let depth = panel.len() / NR;
    assert!(rows <= NR && first_row + rows <= w.rows() && first_col + depth <= w.cols());
    let span = w.scale_span();
    let codes: [&[u8]; NR] = std::array::from_fn(|j| match j < rows {
        true => &w.row_bytes(first_row + j)[first_col..first_col + depth],
        false => &[],
    });
    let scales: [&[f32]; NR] = std::array::from_fn(|j| match j < rows {
        true => w.row_scales(first_row + j),
        false => &[],
    });
    // Eight columns at a time; scale blocks are multiples of 16 and panels start at multiples
    // of 16, so eight columns never straddle two scales.
    let mut k = 0;
    while k + 8 <= depth {
        for half in 0..NR / 8 {
            let mut decoded = [_mm256_setzero_ps(); 8];
            for (i, decoded) in decoded.iter_mut().enumerate() {
                let j = half * 8 + i;
                if j < rows {
                    let scale = scales[j][(first_col + k) / span] * F16_RESCALE;
                    // SAFETY: `k + 8 <= depth` codes are in the row's slice.
                    let values = unsafe { decode_8(codes[j][k..k + 8].as_ptr()) };
                    *decoded = _mm256_mul_ps(values, _mm256_set1_ps(scale));
                }
            }
            for (i, column) in transpose_8x8(decoded).into_iter().enumerate() {
                let start = (k + i) * NR + half * 8;
                let out = &mut panel[start..start + 8];
                // SAFETY: `out` holds 8 f32.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), column) };
            }
        }
        k += 8;
    }
    for k in k..depth {
        for j in 0..NR {
            panel[k * NR + j] = if j < rows {
                let scale = scales[j][(first_col + k) / span] * F16_RESCALE;
                SCALED_VALUES[usize::from(codes[j][k])] * scale
            } else {
                0.0
            };
        }
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(panel: &[f32], x: &[f32], tile: &mut [[f32; NR]]) {
    let depth = panel.len() / NR;
    assert!(x.len() >= depth * MR && tile.len() == MR);
    let zero = _mm256_setzero_ps();
    let mut acc = [[zero; 2]; MR];
    let weights = panel.as_ptr();
    let inputs = x.as_ptr();
    for k in 0..depth {
        // SAFETY: `k < depth`: the panel holds `depth * NR` f32 and the inputs `depth * MR`.
        unsafe {
            let w0 = _mm256_loadu_ps(weights.add(k * NR));
            let w1 = _mm256_loadu_ps(weights.add(k * NR + 8));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*inputs.add(k * MR + i));
                acc[0] = _mm256_fmadd_ps(x, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, w1, acc[1]);
            }
        }
    }
    for (row, acc) in tile.iter_mut().zip(acc) {
        // SAFETY: each tile row holds NR = 16 f32.
        unsafe {
            _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
        }
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize_row(w: &Fp8Matrix, row: usize, out: &mut [f32]) {
    assert_eq!(out.len(), w.cols());
    let span = w.scale_span();
    let codes = w.row_bytes(row);
    let scales = w.row_scales(row);
    let mut k = 0;
    while k + 16 <= out.len() {
        // Blocks are multiples of 16, so one scale covers these 16 columns.
        let scale = _mm256_set1_ps(scales[k / span] * F16_RESCALE);
        // SAFETY: `k + 16 <= cols` codes and outputs.
        unsafe {
            let values = decode_16(codes.as_ptr().add(k));
            _mm256_storeu_ps(out.as_mut_ptr().add(k), _mm256_mul_ps(values[0], scale));
            _mm256_storeu_ps(out.as_mut_ptr().add(k + 8), _mm256_mul_ps(values[1], scale));
        }
        k += 16;
    }
    for k in k..out.len() {
        out[k] = SCALED_VALUES[usize::from(codes[k])] * (scales[k / span] * F16_RESCALE);
    }
}
