//! ggml tensor element types and their dequantization to f32.
//!
//! A ggml tensor's rows are sequences of fixed-size blocks; each block type packs `block_elems`
//! weights into `block_bytes` bytes (scales as f16 plus packed integers). Layouts follow
//! `ggml-common.h` of the ggml sources. Every type ggml can store in a GGUF file is known here by
//! size, so a file holding a type this module cannot decode still opens and its other tensors
//! still read; only asking for such a tensor fails, naming the type.

use half::{bf16, f16};
use rayon::prelude::*;

/// Element count of a K-quant super-block.
const QK_K: usize = 256;

/// A ggml element type, as stored in a GGUF tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

/// Why a tensor's bytes could not be turned into f32s.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DequantError {
    #[error("element type {0} cannot be dequantized (supported: {SUPPORTED})")]
    Unsupported(&'static str),
    #[error("{elements} elements of {ty} need {expected} bytes, got {actual}")]
    Length {
        ty: &'static str,
        elements: usize,
        expected: usize,
        actual: usize,
    },
    #[error("{elements} elements are not a whole number of {ty} blocks of {block}")]
    PartialBlock {
        ty: &'static str,
        elements: usize,
        block: usize,
    },
}

const SUPPORTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";

impl GgmlType {
    /// The type with ggml's numeric id, if ggml still defines it.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => Bf16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            _ => return None,
        })
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            Iq2Xxs => 16,
            Iq2Xs => 17,
            Iq3Xxs => 18,
            Iq1S => 19,
            Iq4Nl => 20,
            Iq3S => 21,
            Iq2S => 22,
            Iq4Xs => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            Iq1M => 29,
            Bf16 => 30,
            Tq1_0 => 34,
            Tq2_0 => 35,
            Mxfp4 => 39,
        }
    }

    /// ggml's name of the type (`Q4_K`), as llama.cpp's tools print it.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq2Xxs => "IQ2_XXS",
            Iq2Xs => "IQ2_XS",
            Iq3Xxs => "IQ3_XXS",
            Iq1S => "IQ1_S",
            Iq4Nl => "IQ4_NL",
            Iq3S => "IQ3_S",
            Iq2S => "IQ2_S",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Iq1M => "IQ1_M",
            Bf16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            Mxfp4 => "MXFP4",
        }
    }

    /// Elements per block (1 for plain types).
    pub fn block_elems(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | Bf16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | Iq4Nl | Mxfp4 => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K | Iq2Xxs | Iq2Xs | Iq3Xxs | Iq1S | Iq3S | Iq2S
            | Iq4Xs | Iq1M | Tq1_0 | Tq2_0 => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            I8 => 1,
            F16 | Bf16 | I16 => 2,
            F32 | I32 => 4,
            I64 | F64 => 8,
            Mxfp4 => 17,
            Q4_0 | Iq4Nl => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2K => 84,
            Q3K | Iq3S => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Q8K => 292,
            Iq2Xxs | Tq2_0 => 66,
            Iq2Xs => 74,
            Iq3Xxs => 98,
            Iq1S => 50,
            Iq2S => 82,
            Iq4Xs => 136,
            Iq1M => 56,
            Tq1_0 => 54,
        }
    }

    /// Bytes taken by `elements` elements, or `None` when they are not whole blocks or the size
    /// overflows.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let block = self.block_elems() as u64;
        if !elements.is_multiple_of(block) {
            return None;
        }
        (elements / block).checked_mul(self.block_bytes() as u64)
    }

    /// Whether [`dequantize`] decodes this type.
    pub fn is_dequantizable(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | Bf16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K
        )
    }
}

/// Blocks handed to one rayon task: large enough that scheduling is noise, small enough that
/// a big tensor keeps both cores busy.
const BLOCKS_PER_TASK: usize = 4096;

/// Decodes `src`, a whole number of `ty` blocks, into `dst` (one f32 per element).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    let block = ty.block_elems();
    let block_bytes = ty.block_bytes();
    if !dst.len().is_multiple_of(block) {
        return Err(DequantError::PartialBlock {
            ty: ty.name(),
            elements: dst.len(),
            block,
        });
    }
    let expected = dst.len() / block * block_bytes;
    if src.len() != expected {
        return Err(DequantError::Length {
            ty: ty.name(),
            elements: dst.len(),
            expected,
            actual: src.len(),
        });
    }
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => decode_f32,
        GgmlType::F16 => decode_f16,
        GgmlType::Bf16 => decode_bf16,
        GgmlType::Q4_0 => decode_q4_0,
        GgmlType::Q4_1 => decode_q4_1,
        GgmlType::Q5_0 => decode_q5_0,
        GgmlType::Q5_1 => decode_q5_1,
        GgmlType::Q8_0 => decode_q8_0,
        GgmlType::Q4K => decode_q4_k,
        GgmlType::Q5K => decode_q5_k,
        GgmlType::Q6K => decode_q6_k,
        other => return Err(DequantError::Unsupported(other.name())),
    };
    src.par_chunks(block_bytes * BLOCKS_PER_TASK)
        .zip(dst.par_chunks_mut(block * BLOCKS_PER_TASK))
        .for_each(|(src, dst)| {
            for (b, out) in src
                .chunks_exact(block_bytes)
                .zip(dst.chunks_exact_mut(block))
            {
                decode(b, out);
            }
        });
    Ok(())
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn decode_f32(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn decode_f16(b: &[u8], out: &mut [f32]) {
    out[0] = half_at(b, 0);
}

fn decode_bf16(b: &[u8], out: &mut [f32]) {
    out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// `d`, then 16 bytes of 4-bit values biased by 8: low nibbles are elements 0..16, high nibbles
/// 16..32.
fn decode_q4_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = (i32::from(q & 0x0f) - 8) as f32 * d;
        out[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

/// `d`, `m`, then nibbles as in Q4_0 but unbiased: `x = q·d + m`.
fn decode_q4_1(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = f32::from(q & 0x0f) * d + m;
        out[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// The fifth bits of a Q5 block's 32 values: bit `j` of `qh` belongs to element `j`.
fn fifth_bits(qh: &[u8]) -> u32 {
    u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]])
}

/// `d`, 32 fifth bits, 16 bytes of nibbles; values biased by 16.
fn decode_q5_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = fifth_bits(&b[2..6]);
    let qs = &b[6..22];
    for (j, &q) in qs.iter().enumerate() {
        let lo = u32::from(q & 0x0f) | (((qh >> j) & 1) << 4);
        let hi = u32::from(q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        out[j] = (lo as i32 - 16) as f32 * d;
        out[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

/// `d`, `m`, 32 fifth bits, 16 bytes of nibbles: `x = q·d + m`.
fn decode_q5_1(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = fifth_bits(&b[4..8]);
    let qs = &b[8..24];
    for (j, &q) in qs.iter().enumerate() {
        let lo = u32::from(q & 0x0f) | (((qh >> j) & 1) << 4);
        let hi = u32::from(q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        out[j] = lo as f32 * d + m;
        out[j + 16] = hi as f32 * d + m;
    }
}

/// `d`, then 32 signed bytes.
fn decode_q8_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, packed in 12
/// bytes: sub-blocks 0..4 in the low six bits of bytes 0..8, sub-blocks 4..8 split between the
/// nibbles of bytes 8..12 and the top two bits of bytes 0..8.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// `d`, `dmin`, 12 bytes of scales, 128 bytes of nibbles: eight sub-blocks of 32, each
/// `x = d·scale·q − dmin·min`. Each 32 bytes of nibbles hold two sub-blocks (low, then high).
fn decode_q4_k(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, y)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (s1, m1) = scale_min_k4(2 * chunk, scales);
        let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0x0f) - m1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// As Q4_K plus a fifth bit per element from 32 bytes of `qh`: element `l` of sub-block `s`
/// takes bit `s` of `qh[l]`.
fn decode_q5_k(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (chunk, (q, y)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (s1, m1) = scale_min_k4(2 * chunk, scales);
        let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        let (bit1, bit2) = (2 * chunk, 2 * chunk + 1);
        for l in 0..32 {
            let h1 = (qh[l] >> bit1) & 1;
            let h2 = (qh[l] >> bit2) & 1;
            y[l] = d1 * f32::from((q[l] & 0x0f) | (h1 << 4)) - m1;
            y[l + 32] = d2 * f32::from((q[l] >> 4) | (h2 << 4)) - m2;
        }
    }
}

/// 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed 8-bit scales (one per 16
/// elements), `d`; values biased by 32. Each half (128 elements) uses 64 low-nibble bytes and 32
/// high bytes: four runs of 32 elements take the low/high nibble of the first/second 32 bytes
/// and successive bit pairs of `qh`.
fn decode_q6_k(b: &[u8], out: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &sc_all[8 * half..8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (run, &q) in q.iter().enumerate() {
                let scale = f32::from(sc[is + 2 * run] as i8);
                y[l + 32 * run] = d * scale * (i32::from(q) - 32) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_is_scale_times_signed_bytes() {
        let mut block = Vec::from(f16_bytes(0.5));
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &block, &mut out).unwrap();
        for (i, &x) in out.iter().enumerate() {
            assert_eq!(x, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_nibbles_are_biased_by_eight_low_half_first() {
        let mut block = Vec::from(f16_bytes(2.0));
        // Low nibble j, high nibble 15 - j.
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &block, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
        }
    }

    #[test]
    fn q4_1_adds_the_minimum() {
        let mut block = Vec::from(f16_bytes(0.25));
        block.extend(f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| j | (j << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &block, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.0);
            assert_eq!(out[j + 16], out[j]);
        }
    }

    #[test]
    fn q5_0_takes_the_fifth_bit_from_qh() {
        let mut block = Vec::from(f16_bytes(1.0));
        // Fifth bit set for elements 0 and 16 + 1 only.
        block.extend(((1u32 << 0) | (1u32 << 17)).to_le_bytes());
        block.extend([0u8; 16]);
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q5_0, &block, &mut out).unwrap();
        assert_eq!(out[0], 0.0);
        assert_eq!(out[17], 0.0);
        assert_eq!(out[1], -16.0);
        assert_eq!(out[16], -16.0);
    }

    #[test]
    fn wrong_lengths_and_partial_blocks_are_errors() {
        let mut out = [0f32; 32];
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out),
            Err(DequantError::Length { expected: 34, .. })
        ));
        let mut out = [0f32; 31];
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out),
            Err(DequantError::PartialBlock { .. })
        ));
        let mut out = [0f32; 256];
        assert_eq!(
            dequantize(GgmlType::Q2K, &[0u8; 84], &mut out),
            Err(DequantError::Unsupported("Q2_K"))
        );
    }

    #[test]
    fn ids_round_trip() {
        for id in 0..64 {
            if let Some(ty) = GgmlType::from_id(id) {
                assert_eq!(ty.id(), id, "{}", ty.name());
            }
        }
    }
}
