//! Weight encodings of a bundle: FP8 E4M3FN with f32 scales (per output channel, or per block
//! of `block` inputs), f16, or f32, and the relative RMS error each introduces.
//!
//! FP8 values are rounded to nearest, ties to even, and saturate at ±448: E4M3FN has no
//! infinity, and its only NaN code (0x7F/0xFF) is never produced. A row (or block) that is all
//! zeros gets scale 1 rather than 0, so that dequantization never divides by or multiplies into
//! anything odd.

use std::sync::LazyLock;

use half::f16;
use rayon::prelude::*;

use crate::checkpoint::SourceDtype;

/// Largest finite E4M3FN magnitude.
pub const FP8_MAX: f32 = 448.0;

/// Encodes one f32 as E4M3FN (round to nearest even, saturating). NaN saturates too, so
/// that no input can produce the NaN code.
pub fn fp8_e4m3fn_encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() || a >= FP8_MAX {
        return sign | 0x7E;
    }
    if a < 2f32.powi(-6) {
        // Subnormal range: code = round(a / 2^-9); 8 lands exactly on the smallest normal 0x08.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exponent = (bits >> 23) as i32 - 127 + 7;
    let mantissa = bits & 0x7F_FFFF;
    let kept = mantissa >> 20;
    let rest = mantissa & 0xF_FFFF;
    let round_up = rest > 0x8_0000 || (rest == 0x8_0000 && kept & 1 == 1);
    // A mantissa carry correctly bumps the exponent.
    let code = ((exponent as u32) << 3) + kept + u32::from(round_up);
    sign | code.min(0x7E) as u8
}

/// Decodes one E4M3FN byte (0x7F/0xFF are NaN).
pub fn fp8_e4m3fn_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0x0F);
    let mantissa = f32::from(code & 0x07);
    if code & 0x7F == 0x7F {
        f32::NAN
    } else if exponent == 0 {
        sign * mantissa * 2f32.powi(-9)
    } else {
        sign * (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    }
}

/// How to store a quantizable (linear or embedding) weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// FP8 with one scale per output row, or per `block` inputs of a row.
    Fp8 {
        block: Option<usize>,
    },
    F16,
    F32,
}

/// A weight as it goes into the bundle.
#[derive(Debug)]
pub struct Encoded {
    /// Little-endian element bytes, row-major, same shape as the input.
    pub data: Vec<u8>,
    /// FP8 only: `[rows]` or `[rows, cols / block]` f32 scales.
    pub scales: Option<Vec<f32>>,
    /// ‖decoded − original‖₂ / ‖original‖₂ (0 for an all-zero tensor).
    pub rel_rms_error: f64,
}

/// Why a weight cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("tensor {tensor}: non-finite value {value} at row {row}, column {col}")]
    NonFinite {
        tensor: String,
        row: usize,
        col: usize,
        value: f32,
    },
    #[error("tensor {tensor}: --block {block} does not divide its {cols} input features")]
    Block {
        tensor: String,
        block: usize,
        cols: usize,
    },
    #[error("tensor {tensor}: value {value} at row {row} overflows f16 (export with f32 or fp8)")]
    F16Overflow {
        tensor: String,
        row: usize,
        value: f32,
    },
}

/// Rows processed per parallel task: enough to amortize scheduling, few enough to balance.
const ROWS_PER_TASK: usize = 16;

/// Encodes a `[rows, cols]` weight stored as `dtype` bytes.
pub fn encode(
    tensor: &str,
    dtype: SourceDtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    encoding: Encoding,
) -> Result<Encoded, QuantError> {
    let width = match encoding {
        Encoding::Fp8 { .. } => 1,
        Encoding::F16 => 2,
        Encoding::F32 => 4,
    };
    let groups_per_row = match encoding {
        Encoding::Fp8 { block: Some(block) } => {
            if block == 0 || !cols.is_multiple_of(block) {
                return Err(QuantError::Block {
                    tensor: tensor.to_owned(),
                    block,
                    cols,
                });
            }
            cols / block
        }
        Encoding::Fp8 { block: None } => 1,
        Encoding::F16 | Encoding::F32 => 0,
    };
    let mut data = vec![0u8; rows * cols * width];
    // Unquantized encodings carry one unused slot per row so that rows and scales zip evenly.
    let scale_slots = groups_per_row.max(1);
    let mut scales = vec![0f32; rows * scale_slots];
    let in_row = cols * dtype.size();

    // Each task returns (squared error, squared norm) over its rows.
    let sums = data
        .par_chunks_mut(ROWS_PER_TASK * cols * width)
        .zip(scales.par_chunks_mut(ROWS_PER_TASK * scale_slots))
        .enumerate()
        .map(|(task, (out, task_scales))| {
            let first_row = task * ROWS_PER_TASK;
            let mut values = vec![0f32; cols];
            let (mut err, mut norm) = (0f64, 0f64);
            for (r, out_row) in out.chunks_mut(cols * width).enumerate() {
                let row = first_row + r;
                dtype.widen_into(&bytes[row * in_row..(row + 1) * in_row], &mut values);
                if let Some(col) = values.iter().position(|v| !v.is_finite()) {
                    return Err(QuantError::NonFinite {
                        tensor: tensor.to_owned(),
                        row,
                        col,
                        value: values[col],
                    });
                }
                norm += values
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>();
                err += match encoding {
                    Encoding::Fp8 { .. } => {
                        let row_scales =
                            &mut task_scales[r * groups_per_row..(r + 1) * groups_per_row];
                        fp8_row(&values, out_row, row_scales)
                    }
                    Encoding::F16 => f16_row(tensor, row, &values, out_row)?,
                    Encoding::F32 => {
                        for (o, v) in out_row.chunks_exact_mut(4).zip(&values) {
                            o.copy_from_slice(&v.to_le_bytes());
                        }
                        0.0
                    }
                };
            }
            Ok((err, norm))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (err, norm) = sums
        .into_iter()
        .fold((0.0, 0.0), |(e, n), (de, dn)| (e + de, n + dn));
    Ok(Encoded {
        data,
        scales: matches!(encoding, Encoding::Fp8 { .. }).then_some(scales),
        rel_rms_error: if norm > 0.0 { (err / norm).sqrt() } else { 0.0 },
    })
}

/// The rounding error of `first` (an FP8 encoding of the `[rows, cols]` weight in `bytes`),
/// itself encoded in FP8 with the same scale layout, so that `first + residual` stands for the
/// weight (see `Quantization::head_residual`). Its `rel_rms_error` is that of the sum,
/// relative to the weight.
pub fn fp8_residual(
    tensor: &str,
    dtype: SourceDtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    first: &Encoded,
    block: Option<usize>,
) -> Result<Encoded, QuantError> {
    let scales = first
        .scales
        .as_deref()
        .expect("a residual is taken of an FP8 encoding");
    let groups_per_row = scales.len() / rows;
    let group = cols / groups_per_row;
    let in_row = cols * dtype.size();
    let decoded = &*FP8_VALUES;
    let mut residual = vec![0u8; rows * cols * 4];
    residual
        .par_chunks_mut(cols * 4)
        .enumerate()
        .for_each(|(row, out)| {
            let mut values = vec![0f32; cols];
            dtype.widen_into(&bytes[row * in_row..(row + 1) * in_row], &mut values);
            let codes = &first.data[row * cols..(row + 1) * cols];
            let row_scales = &scales[row * groups_per_row..(row + 1) * groups_per_row];
            for (col, (o, v)) in out.chunks_exact_mut(4).zip(values).enumerate() {
                let back = decoded[usize::from(codes[col])] * row_scales[col / group];
                o.copy_from_slice(&(v - back).to_le_bytes());
            }
        });
    let mut second = encode(
        tensor,
        SourceDtype::F32,
        &residual,
        rows,
        cols,
        Encoding::Fp8 { block },
    )?;
    // ‖r − r̂‖/‖w‖ = (‖r − r̂‖/‖r‖) · (‖r‖/‖w‖), and ‖r‖/‖w‖ is the first encoding's error.
    second.rel_rms_error *= first.rel_rms_error;
    Ok(second)
}

/// Every code's value, so that measuring the error costs a load rather than a decode.
static FP8_VALUES: LazyLock<[f32; 256]> =
    LazyLock::new(|| std::array::from_fn(|code| fp8_e4m3fn_decode(code as u8)));

/// Quantizes one row, split into `scales.len()` equal groups; returns the squared error.
fn fp8_row(values: &[f32], out: &mut [u8], scales: &mut [f32]) -> f64 {
    let decoded = &*FP8_VALUES;
    let group = values.len() / scales.len();
    let mut err = 0f64;
    for ((vals, codes), scale) in values
        .chunks(group)
        .zip(out.chunks_mut(group))
        .zip(scales.iter_mut())
    {
        let absmax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        *scale = if absmax > 0.0 { absmax / FP8_MAX } else { 1.0 };
        for (code, &v) in codes.iter_mut().zip(vals) {
            *code = fp8_e4m3fn_encode(v / *scale);
            let back = decoded[usize::from(*code)] * *scale;
            err += f64::from(back - v).powi(2);
        }
    }
    err
}

/// Converts one row to f16; returns the squared error.
fn f16_row(tensor: &str, row: usize, values: &[f32], out: &mut [u8]) -> Result<f64, QuantError> {
    let mut err = 0f64;
    for (o, &v) in out.chunks_exact_mut(2).zip(values) {
        let h = f16::from_f32(v);
        if h.is_infinite() {
            return Err(QuantError::F16Overflow {
                tensor: tensor.to_owned(),
                row,
                value: v,
            });
        }
        o.copy_from_slice(&h.to_le_bytes());
        err += f64::from(h.to_f32() - v).powi(2);
    }
    Ok(err)
}

/// Widens a norm gain (kept f32 in every encoding), refusing non-finite values.
pub fn norm_to_f32(tensor: &str, dtype: SourceDtype, bytes: &[u8]) -> Result<Vec<u8>, QuantError> {
    let mut values = vec![0f32; bytes.len() / dtype.size()];
    dtype.widen_into(bytes, &mut values);
    if let Some(col) = values.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            tensor: tensor.to_owned(),
            row: 0,
            col,
            value: values[col],
        });
    }
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn every_finite_code_round_trips() {
        for code in 0..=255u8 {
            if code & 0x7F == 0x7F {
                continue;
            }
            let value = fp8_e4m3fn_decode(code);
            let back = fp8_e4m3fn_encode(value);
            // -0.0 encodes as 0x80, its own code.
            assert_eq!(back, code, "code {code:#04x} = {value}");
        }
    }

    #[test]
    fn subnormals_are_exact_and_ties_go_to_even() {
        assert_eq!(fp8_e4m3fn_decode(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3fn_decode(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(fp8_e4m3fn_encode(2f32.powi(-10)), 0x00);
        assert_eq!(fp8_e4m3fn_encode(3.0 * 2f32.powi(-10)), 0x02);
        assert_eq!(fp8_e4m3fn_encode(-5.0 * 2f32.powi(-10)), 0x82);
        assert_eq!(fp8_e4m3fn_encode(7.5 * 2f32.powi(-9)), 0x08);
        // 1 + 1/16 lies halfway between 1 (0x38) and 1.125 (0x39): even is 0x38.
        assert_eq!(fp8_e4m3fn_encode(1.0625), 0x38);
        assert_eq!(fp8_e4m3fn_encode(1.1875), 0x3A);
        assert_eq!(fp8_e4m3fn_encode(1e-30), 0x00);
    }

    #[test]
    fn overflow_saturates_and_never_makes_nan() {
        for x in [448.0, 449.0, 464.0, 480.0, 1e9, f32::INFINITY, f32::NAN] {
            assert_eq!(fp8_e4m3fn_encode(x), 0x7E, "{x}");
            assert_eq!(fp8_e4m3fn_encode(-x), 0xFE, "{x}");
        }
        assert_eq!(fp8_e4m3fn_decode(0x7E), 448.0);
        // 447.9 rounds to 448, not past it.
        assert_eq!(fp8_e4m3fn_encode(447.9), 0x7E);
    }

    #[test]
    fn per_channel_scales_map_each_row_absmax_to_448() {
        let w = [
            1.0, -2.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0, -3.0, 1e-3,
        ];
        let enc = encode(
            "w",
            SourceDtype::F32,
            &f32_bytes(&w),
            3,
            4,
            Encoding::Fp8 { block: None },
        )
        .unwrap();
        let scales = enc.scales.unwrap();
        assert_eq!(scales, vec![2.0 / 448.0, 1.0, 3.0 / 448.0]);
        assert_eq!(enc.data[1], 0xFE);
        assert_eq!(&enc.data[4..8], &[0, 0, 0, 0]);
        assert!(enc.rel_rms_error > 0.0 && enc.rel_rms_error < 0.04);
    }

    #[test]
    fn blocks_get_their_own_scales() {
        let w = [1.0, 1.0, 100.0, -100.0];
        let enc = encode(
            "w",
            SourceDtype::F32,
            &f32_bytes(&w),
            1,
            4,
            Encoding::Fp8 { block: Some(2) },
        )
        .unwrap();
        assert_eq!(enc.scales.unwrap(), vec![1.0 / 448.0, 100.0 / 448.0]);
        assert_eq!(enc.data, vec![0x7E, 0x7E, 0x7E, 0xFE]);
        assert_eq!(enc.rel_rms_error, 0.0);
        let err = encode(
            "w",
            SourceDtype::F32,
            &f32_bytes(&w),
            1,
            4,
            Encoding::Fp8 { block: Some(3) },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--block 3"), "{err}");
    }

    #[test]
    fn non_finite_weights_are_located() {
        let w = [1.0, 2.0, 3.0, f32::NAN];
        for encoding in [Encoding::Fp8 { block: None }, Encoding::F16, Encoding::F32] {
            let err = encode("w", SourceDtype::F32, &f32_bytes(&w), 2, 2, encoding).unwrap_err();
            assert_eq!(
                err.to_string(),
                "tensor w: non-finite value NaN at row 1, column 1"
            );
        }
    }

    #[test]
    fn bf16_widening_is_exact_in_f32_and_f16_reports_its_rounding() {
        let bf16: Vec<u8> = [1.0f32, -0.5, 3.0e-3, 7.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let enc = encode("w", SourceDtype::Bf16, &bf16, 2, 2, Encoding::F32).unwrap();
        assert_eq!(enc.rel_rms_error, 0.0);
        let enc = encode(
            "w",
            SourceDtype::F32,
            &f32_bytes(&[0.1; 4]),
            2,
            2,
            Encoding::F16,
        )
        .unwrap();
        assert!(enc.rel_rms_error > 0.0 && enc.rel_rms_error < 1e-3);
        let err = encode(
            "w",
            SourceDtype::F32,
            &f32_bytes(&[1e5; 4]),
            2,
            2,
            Encoding::F16,
        );
        assert!(err.unwrap_err().to_string().contains("overflows f16"));
    }
}
