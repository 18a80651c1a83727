//! x86_64 matrix-vector product and matrix product for AVX-512 with BF16 (Zen 4, Sapphire
//! Rapids and later); the small-batch product and row dequantization are [`super::avx512`]'s.
//!
//! With f32 arithmetic the decode step was bound by the core, not by memory: widening 64
//! codes to f32 took shifts, a round trip through memory and four `vcvtph2ps` before the four
//! FMAs. Every E4M3 value is exact in bf16, and `vdpbf16ps` multiplies 32 bf16 pairs and adds
//! them into 16 f32 lanes, so here a code becomes its bf16 pattern by two 128-entry byte
//! lookups (`vpermi2b`, one for each byte of the pattern, the sign put back with one logic
//! op), and the weights are never widened to f32 at all.
//!
//! `vdpbf16ps` takes both operands in bf16, so `x` is split once per call into
//! `hi = bf16(x)` and `lo = bf16(x - hi)` (both rounded to nearest), and each weight is
//! multiplied by both. The products are exact in f32 and summed in f32 as the FMA kernels
//! sum; what the split drops, `|x - hi - lo| ≤ 2^-18 |x|`, is the only change to the
//! arithmetic: at most `2^-18 Σ|w·x|` on an output, below f32 summation's own error on any
//! row of a few hundred weights. The instruction treats bf16 subnormals as zero and flushes
//! subnormal results, which matters only for activations below 2^-100 or so, far under
//! anything a model carries (weights are looked up as normal bf16, subnormal E4M3 included).
//!
//! Rows with blocked scales take the AVX2 kernel, as in [`super::avx512`].
//!
//! The matrix product (prompts of more than [`super::parallel::SMALL_BATCH`] tokens) is bound
//! by the core, not by memory, so there it does round: its panels hold the scaled weights and
//! its inputs `x` as bf16 pairs ([`super::parallel::PairPanels`]), one `vdpbf16ps` doing the
//! work of two f32 FMAs. Measured on Zen 4, one thread, 2048×2048 to 5632×2048, fastest
//! product on a loaded machine, GFLOP/s before / after: 32 tokens 55–60 / 78–84, 128 tokens
//! 75–83 / 139–147, 512 tokens 61–95 / 149–157. On SmolLM2-135M (`marengod perplexity`,
//! `tests/fixtures/perplexity`, windows of 512, FP8 against f32) the KL mean went from
//! 1.753e-2 to 1.811e-2 (+3.4 %, within the 10 % issue #13 allows), top-1 agreement from
//! 91.31 % to 91.50 %, perplexity from 76.07 to 76.05.

use std::arch::x86_64::*;

use super::avx2;
use super::avx512;
use super::e4m3::bf16_bits;
use super::matrix::Fp8Matrix;
use super::parallel::{Backend, KC, NR, PairPanels};
use super::prefetch::{LINE, prefetch_ahead};

pub(super) static BACKEND: Backend = Backend {
    mr: avx512::MR,
    matvec_rows,
    matmul_rows: avx512::matmul_rows,
    pack_panel: avx512::pack_panel,
    tile: avx512::tile,
    dequantize_row: avx2::dequantize_row,
    pairs: Some(PairPanels {
        mr: avx512::MR,
        pack_panel: pack_pair_panel,
        tile: pair_tile,
    }),
};

/// Codes per step: one 512-bit load, one cache line.
const STEP: usize = 64;
/// Rows walked together: each loaded piece of `x` serves all of them. Two streams read better
/// than four: with four rows of a 4096-column matrix the reads spread over four pages at once
/// and one thread streamed 15–19 GB/s, against 24–26 with two (see `prefetch::AHEAD`).
const ROWS: usize = 2;

/// Byte `i` of each table is a byte of the bf16 pattern of code `i` (sign clear), for the
/// two-register lookup `vpermi2b`: `[high bytes 0..64, 64..128, low bytes 0..64, 64..128]`.
static TABLES: [[u8; 64]; 4] = {
    let mut tables = [[0; 64]; 4];
    let mut code = 0;
    while code < 128 {
        let bits = bf16_bits(code as u8);
        tables[code / 64][code % 64] = (bits >> 8) as u8;
        tables[2 + code / 64][code % 64] = bits as u8;
        code += 1;
    }
    tables
};

/// Places `x` as [`decode_step`] orders weights, split in two bf16 parts: per step of 64
/// columns, `hi` of the first eight columns of each 16 (four lanes of 128 bits), `hi` of the
/// last eight of each 16, then `lo` likewise; 32 bf16 each. Zero-padded to whole steps.
///
/// # Safety
/// The CPU must support AVX-512F and BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn split_interleave(x: &[f32]) -> Vec<u16> {
    let padded = x.len().next_multiple_of(STEP);
    let mut ordered = vec![0u16; 2 * padded];
    let mut tail = [0.0f32; STEP];
    for (col, out) in (0..padded)
        .step_by(STEP)
        .zip(ordered.chunks_exact_mut(2 * STEP))
    {
        let values = match x.get(col..col + STEP) {
            Some(values) => values,
            None => {
                tail[..x.len() - col].copy_from_slice(&x[col..]);
                &tail
            }
        };
        // SAFETY: `values` holds 64 f32.
        let sixteens: [__m512; 4] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_ps(values.as_ptr().add(16 * i)) });
        let hi = sixteens.map(|x| _mm512_cvtneps_pbh(x));
        let lo: [__m256bh; 4] = std::array::from_fn(|i| {
            // SAFETY: `__m256bh` and `__m256i` are both 32 bytes of plain bits.
            let bits = unsafe { std::mem::transmute::<__m256bh, __m256i>(hi[i]) };
            let hi = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)));
            _mm512_cvtneps_pbh(_mm512_sub_ps(sixteens[i], hi))
        });
        for (part, halves) in [hi, lo].into_iter().enumerate() {
            // SAFETY: as above.
            let [a, b, c, d] =
                halves.map(|h| unsafe { std::mem::transmute::<__m256bh, __m256i>(h) });
            // Lanes `[a.first, a.last, b.first, b.last]` and the same of `c`, `d`.
            let ab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
            let cd = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(c), d);
            let first = _mm512_shuffle_i64x2::<0b10_00_10_00>(ab, cd);
            let last = _mm512_shuffle_i64x2::<0b11_01_11_01>(ab, cd);
            let out = out[part * STEP..].as_mut_ptr();
            // SAFETY: `out` holds 2 × 64 u16 from the part's start.
            unsafe {
                _mm512_storeu_si512(out.cast(), first);
                _mm512_storeu_si512(out.add(32).cast(), last);
            }
        }
    }
    ordered
}

/// The bf16 patterns of 64 codes as two vectors: within each 128-bit lane (16 codes), the
/// first eight codes, then the last eight (byte unpacking works within lanes).
///
/// # Safety
/// `codes` must be valid for reading 64 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn decode_step(codes: *const u8, tables: &[__m512i; 4]) -> [__m512i; 2] {
    // SAFETY: 64 readable bytes (caller); unaligned load.
    let codes = unsafe { _mm512_loadu_si512(codes.cast()) };
    // `vpermi2b` indexes 128 entries by the low 7 bits and ignores the sign bit.
    let high = _mm512_permutex2var_epi8(tables[0], codes, tables[1]);
    // high | (codes & 0x80): the sign bit of the code becomes the pattern's.
    let high = _mm512_ternarylogic_epi32::<0xf8>(high, codes, _mm512_set1_epi8(0x80_u8 as i8));
    let low = _mm512_permutex2var_epi8(tables[2], codes, tables[3]);
    [
        _mm512_unpacklo_epi8(low, high),
        _mm512_unpackhi_epi8(low, high),
    ]
}

/// `acc += w · x` over 32 bf16 pairs.
#[inline]
#[target_feature(enable = "avx512bf16,avx512f")]
fn dot_pairs(acc: __m512, w: __m512i, x: __m512i) -> __m512 {
    // SAFETY: `__m512i` and `__m512bh` are both 64 bytes of plain bits.
    let (w, x) = unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(w),
            std::mem::transmute::<__m512i, __m512bh>(x),
        )
    };
    _mm512_dpbf16_ps(acc, w, x)
}

/// `y[r] = W[first_row + r] · x` for `R` rows walked together, scales per row.
///
/// # Safety
/// `first_row + R <= w.rows()`; `x` is [`split_interleave`]d from `w.cols()` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
unsafe fn dot_rows<const R: usize>(
    w: &Fp8Matrix,
    first_row: usize,
    x: &[u16],
    tables: &[__m512i; 4],
    y: &mut [f32; R],
) {
    let cols = w.cols();
    let whole = cols - cols % STEP;
    let rows: [&[u8]; R] = std::array::from_fn(|r| w.row_bytes(first_row + r));
    // Two accumulators per row hide the latency of `vdpbf16ps`.
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let starts = rows.map(<[u8]>::as_ptr);
    let mut step = |codes: [*const u8; R], x: *const u16| {
        // SAFETY: 128 readable bf16 at `x` and 64 bytes at each `codes[r]` (callers below).
        unsafe {
            let xs = [
                _mm512_loadu_si512(x.cast()),
                _mm512_loadu_si512(x.add(32).cast()),
                _mm512_loadu_si512(x.add(64).cast()),
                _mm512_loadu_si512(x.add(96).cast()),
            ];
            for r in 0..R {
                let [first, second] = decode_step(codes[r], tables);
                acc[r][0] = dot_pairs(acc[r][0], first, xs[0]);
                acc[r][1] = dot_pairs(acc[r][1], second, xs[1]);
                acc[r][0] = dot_pairs(acc[r][0], first, xs[2]);
                acc[r][1] = dot_pairs(acc[r][1], second, xs[3]);
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
            x.as_ptr().add(2 * col)
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
            x.as_ptr().add(2 * whole)
        });
    }
    for r in 0..R {
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        y[r] = sum * w.row_scales(first_row + r)[0];
    }
}

/// # Safety
/// The CPU must support AVX-512F, BW, VBMI and BF16, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn matvec_rows(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32]) {
    if w.block().is_some() {
        // SAFETY: the AVX2 features are a subset of this function's.
        return unsafe { avx2::matvec_rows(w, first_row, x, y) };
    }
    assert!(x.len() == w.cols() && first_row + y.len() <= w.rows());
    const { assert!(LINE == STEP) };
    // SAFETY: the features are this function's.
    let x = unsafe { split_interleave(x) };
    // SAFETY: each table holds 64 bytes; unaligned loads.
    let tables = TABLES
        .each_ref()
        .map(|t| unsafe { _mm512_loadu_si512(t.as_ptr().cast()) });
    let mut groups = y.chunks_exact_mut(ROWS);
    let mut row = first_row;
    for y in &mut groups {
        let y: &mut [f32; ROWS] = y.try_into().expect("chunks_exact yields ROWS elements");
        // SAFETY: rows `row..row + ROWS` exist (asserted above).
        unsafe { dot_rows(w, row, &x, &tables, y) };
        row += ROWS;
    }
    for y in groups.into_remainder() {
        // SAFETY: as above.
        unsafe { dot_rows(w, row, &x, &tables, std::array::from_mut(y)) };
        row += 1;
    }
}

/// [`PairPanels::pack_panel`]: the f32 panel of [`avx512::pack_panel`], each two columns
/// rounded to bf16 and interleaved.
///
/// # Safety
/// The CPU must support AVX-512F, BW and BF16, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn pack_pair_panel(
    w: &Fp8Matrix,
    first_row: usize,
    rows: usize,
    first_col: usize,
    panel: &mut [u32],
) {
    let pairs = panel.len() / NR;
    let depth = (2 * pairs).min(w.cols() - first_col);
    assert!(depth <= KC);
    let mut widened = [0.0f32; KC * NR];
    let widened = &mut widened[..depth * NR];
    // SAFETY: this function's features include avx512's.
    unsafe { avx512::pack_panel(w, first_row, rows, first_col, widened) };
    // Word `2j` of the result is word `j` of `first`, word `2j + 1` word `j` of `second`.
    let order: [u16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as u16);
    // SAFETY: 32 u16 are 64 bytes; unaligned load.
    let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
    for (pair, out) in panel.chunks_exact_mut(NR).enumerate() {
        let column = |k: usize| match widened.get(k * NR..(k + 1) * NR) {
            // SAFETY: 16 f32; unaligned load.
            Some(values) => unsafe { _mm512_loadu_ps(values.as_ptr()) },
            None => _mm512_setzero_ps(),
        };
        // The low 16 words hold the first column, the high 16 the second.
        let halves = _mm512_cvtne2ps_pbh(column(2 * pair + 1), column(2 * pair));
        // SAFETY: `__m512bh` and `__m512i` are both 64 bytes of plain bits.
        let halves = unsafe { std::mem::transmute::<__m512bh, __m512i>(halves) };
        let pairs = _mm512_permutexvar_epi16(order, halves);
        // SAFETY: `out` holds 16 u32.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), pairs) };
    }
}

/// [`PairPanels::tile`]: one `vdpbf16ps` per token and pair of columns.
///
/// # Safety
/// The CPU must support AVX-512F and BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pair_tile(panel: &[u32], x: &[u32], tile: &mut [[f32; NR]]) {
    const MR: usize = avx512::MR;
    let pairs = panel.len() / NR;
    assert!(x.len() >= pairs * MR && tile.len() == MR);
    let mut acc = [_mm512_setzero_ps(); MR];
    let weights = panel.as_ptr();
    let inputs = x.as_ptr();
    for p in 0..pairs {
        // SAFETY: `p < pairs`: the panel holds `pairs * NR` u32 and the inputs `pairs * MR`.
        unsafe {
            let w = _mm512_loadu_si512(weights.add(p * NR).cast());
            let x = inputs.add(p * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let pair = _mm512_set1_epi32(*x.add(i) as i32);
                *acc = dot_pairs(*acc, w, pair);
            }
        }
    }
    for (row, acc) in tile.iter_mut().zip(acc) {
        // SAFETY: each tile row holds NR = 16 f32.
        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), acc) };
    }
}
