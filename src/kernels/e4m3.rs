//! The FP8 E4M3FN number format, defined twice: once from its specification (the reference the
//! fast paths are tested against) and once as the bit rearrangement the fast paths use.
//!
//! E4M3FN: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities; exponent 0 holds
//! subnormals `m/8 · 2^-6`, and the all-ones pattern `S.1111.111` is NaN, giving a finite range of
//! ±448.
//!
//! NaN codes (`0x7f`, `0xff`): exporters never write them, and checking 7 GB of mapped weights
//! for them at load would defeat lazy mapping, so every kernel decodes them as the finite value
//! the bit pattern would have without the NaN rule, ±480. The reference does the same, so a NaN
//! code changes no result between kernels.

use half::f16;

/// The fast decode yields `e4m3 · 2^-8`; kernels multiply their scales by this to compensate.
pub(crate) const F16_RESCALE: f32 = 256.0;

/// The value of an E4M3FN code, computed from the format's definition (NaN codes as ±480, see the
/// module documentation).
pub fn value(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0x0f);
    let mantissa = f32::from(code & 0x07);
    let magnitude = if exponent == 0 {
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    sign * magnitude
}

/// The f16 bit pattern whose value is `value(code) · 2^-8`: the E4M3 exponent and mantissa fields
/// slot into f16's wider fields unchanged, and the exponent bias difference (15 - 7) is the 2^-8.
/// E4M3 subnormals land on f16 subnormals, which every f16→f32 conversion turns into normal f32s.
#[inline(always)]
pub(crate) const fn f16_bits(code: u8) -> u16 {
    let code = code as u16;
    ((code & 0x80) << 8) | ((code & 0x7f) << 7)
}

/// The bf16 bit pattern of `value(code)`, which bf16 holds exactly: 8 exponent bits cover E4M3's
/// range, subnormals included, as normal numbers (rebias 127 - 7 = 120), and its 7 mantissa
/// bits hold E4M3's 3.
pub(crate) const fn bf16_bits(code: u8) -> u16 {
    let sign = ((code & 0x80) as u16) << 8;
    let exponent = ((code >> 3) & 0x0f) as u16;
    let mantissa = (code & 0x07) as u16;
    let magnitude = if exponent != 0 {
        ((exponent + 120) << 7) | (mantissa << 4)
    } else if mantissa == 0 {
        0
    } else {
        // `mantissa · 2^-9`, normalized: its leading bit becomes the implicit one.
        let lead = 15 - mantissa.leading_zeros() as u16;
        ((118 + lead) << 7) | ((mantissa ^ (1 << lead)) << (7 - lead))
    };
    sign | magnitude
}

/// `value(code) · 2^-8` for every code, for kernels without a hardware f16 conversion.
pub(crate) static SCALED_VALUES: [f32; 256] = {
    let mut table = [0.0; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = f16::from_bits(f16_bits(code as u8)).to_f32_const();
        code += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_rearrangement_matches_definition_for_every_code() {
        for code in 0..=255u8 {
            let fast = f16::from_bits(f16_bits(code)).to_f32() * F16_RESCALE;
            assert_eq!(fast.to_bits(), value(code).to_bits(), "code {code:#04x}");
            assert_eq!(SCALED_VALUES[usize::from(code)] * F16_RESCALE, value(code));
            let bf16 = half::bf16::from_bits(bf16_bits(code)).to_f32();
            assert_eq!(bf16.to_bits(), value(code).to_bits(), "bf16 {code:#04x}");
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(value(0x00), 0.0);
        assert_eq!(value(0x80).to_bits(), (-0.0f32).to_bits());
        assert_eq!(value(0x7e), 448.0);
        assert_eq!(value(0xfe), -448.0);
        assert_eq!(value(0x01), 2f32.powi(-9));
        assert_eq!(value(0x87), -7.0 * 2f32.powi(-9));
        assert_eq!(value(0x08), 2f32.powi(-6));
        assert_eq!(value(0x38), 1.0);
        assert_eq!(value(0x7f), 480.0);
        assert_eq!(value(0xff), -480.0);
    }
}
