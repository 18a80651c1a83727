//! x86_64 kernels for AVX-512 (F, on top of AVX2 + FMA + F16C): the matrix product's tile.
//!
//! A prompt is compute-bound, and AVX-512 doubles the work per instruction and the register
//! file. With 16 output channels per panel row, one 512-bit register holds a whole panel row,
//! so a tile is 24 tokens × 16 channels in 24 accumulators, and each input is broadcast from
//! memory as part of its FMA (an embedded broadcast): per reduction step one load of weights
//! and 24 FMAs. Everything else — the matrix-vector product, panel packing, row dequantization
//! — is the AVX2 code: those are bound by memory or amortized over a tile's tokens.

use std::arch::x86_64::*;

use super::avx2;
use super::parallel::{Backend, NR};

pub(super) static BACKEND: Backend = Backend {
    mr: MR,
    matvec_rows: avx2::matvec_rows,
    pack_panel: avx2::pack_panel,
    tile,
    dequantize_row: avx2::dequantize_row,
};

/// Tokens per register tile: 24 accumulators, the weights and spare registers for the
/// compiler, of 32.
const MR: usize = 24;

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn tile(panel: &[f32], x: &[f32], tile: &mut [[f32; NR]]) {
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
