//! The GGUF reader against a file written by llama.cpp's own Python writer (gguf-py), with
//! dequantized values computed by gguf-py's independent implementation
//! (`tests/fixtures/gguf/make_quants.py`), and against malformed files: every defect yields a
//! typed error, never a panic or an allocation sized by what the file claims.

use std::path::PathBuf;

use marengo_export::gguf::{Array, FormatError, GgmlType, GgufFile, GgufIndex, Value, dequant};
use marengo_testkit::fixtures;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn fixture_path() -> PathBuf {
    fixtures().join("gguf/quants.gguf")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture_path()).unwrap()
}

#[test]
fn metadata_of_every_value_type_is_read() {
    let file = GgufFile::open(&fixture_path()).unwrap();
    let index = file.index();
    assert_eq!(index.version, 3);
    assert_eq!(index.alignment, 64);
    let get = |k: &str| index.get(k).unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!(get("test.u8"), &Value::U8(200));
    assert_eq!(get("test.i8"), &Value::I8(-100));
    assert_eq!(get("test.u16"), &Value::U16(60000));
    assert_eq!(get("test.i16"), &Value::I16(-30000));
    assert_eq!(get("test.u32"), &Value::U32(4_000_000_000));
    assert_eq!(get("test.i32"), &Value::I32(-2_000_000_000));
    assert_eq!(get("test.f32"), &Value::F32(0.15625));
    assert_eq!(get("test.u64"), &Value::U64((1 << 63) + 5));
    assert_eq!(get("test.i64"), &Value::I64(-(1 << 62)));
    assert_eq!(get("test.f64"), &Value::F64(-1.0e300));
    assert_eq!(get("test.bool"), &Value::Bool(true));
    assert_eq!(get("test.string").as_str(), Some("Grüße, 世界 🌍"));
    assert_eq!(
        get("test.array_i32"),
        &Value::Array(Array::I32(vec![1, -2, 3]))
    );
    assert_eq!(
        get("test.array_string"),
        &Value::Array(Array::String(vec!["a".into(), "".into(), "ü b".into()]))
    );
    assert_eq!(
        get("test.array_nested"),
        &Value::Array(Array::Array(vec![
            Array::I32(vec![1, 2]),
            Array::I32(vec![3])
        ]))
    );
    assert_eq!(get("general.architecture").as_str(), Some("marengo-test"));
    for t in &index.tensors {
        assert_eq!(t.start % 64, 0, "{} is not aligned", t.name);
    }
}

#[test]
fn dequantization_matches_gguf_py() {
    let file = GgufFile::open(&fixture_path()).unwrap();
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
    let mut checked = Vec::new();
    for ty in types {
        let name = ty.name().to_lowercase();
        let quant = file.info(&format!("quant.{name}")).unwrap();
        assert_eq!(quant.ty, ty);
        let expected = file
            .dequantize(file.info(&format!("expected.{name}")).unwrap())
            .unwrap();
        let got = file.dequantize(quant).unwrap();
        assert_eq!(got.len(), expected.len());
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: all-zero reference proves nothing");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (g - e).abs() <= 1e-6 * scale,
                "{name}[{i}]: got {g}, gguf-py {e}"
            );
        }
        checked.push(name);
    }
    let bf16 = file.dequantize(file.info("plain.bf16").unwrap()).unwrap();
    let expected = file
        .dequantize(file.info("expected.bf16").unwrap())
        .unwrap();
    assert_eq!(bf16, expected);
    let f16 = file.info("plain.f16").unwrap();
    assert_eq!(f16.shape(), vec![3, 8]);
    let f16 = file.dequantize(f16).unwrap();
    let expected = file.dequantize(file.info("expected.f16").unwrap()).unwrap();
    assert_eq!(f16, expected);
    assert_eq!(checked.len(), types.len());
}

/// A GGUF byte stream built by hand, for defects a real writer never produces.
struct Builder(Vec<u8>);

impl Builder {
    fn new(version: u32, tensors: u64, kvs: u64) -> Self {
        let mut b = Builder(b"GGUF".to_vec());
        b.u32(version).u64(tensors).u64(kvs);
        b
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad_to(&mut self, alignment: usize, data: usize) -> Vec<u8> {
        let mut out = self.0.clone();
        out.resize(out.len().div_ceil(alignment) * alignment + data, 0);
        out
    }
}

fn parse_err(bytes: &[u8]) -> FormatError {
    GgufIndex::parse(bytes).expect_err("malformed input must be refused")
}

#[test]
fn a_minimal_hand_written_file_is_read() {
    let bytes = Builder::new(2, 1, 1)
        .kv_u32("general.alignment", 16)
        .tensor("w", &[32, 2], 8, 0)
        .pad_to(16, 2 * 34);
    let index = GgufIndex::parse(&bytes).unwrap();
    assert_eq!(index.version, 2);
    let w = index.tensor("w").unwrap();
    assert_eq!((w.ty, w.len, w.shape()), (GgmlType::Q8_0, 68, vec![2, 32]));
    assert_eq!(w.start % 16, 0);
}

#[test]
fn header_defects_are_named() {
    assert!(matches!(parse_err(b"GGU"), FormatError::Truncated { .. }));
    assert!(matches!(
        parse_err(b"LLAMA\0\0\0\0\0"),
        FormatError::BadMagic { .. }
    ));
    assert_eq!(
        parse_err(&Builder::new(1, 0, 0).0),
        FormatError::UnsupportedVersion(1)
    );
    // Big-endian files read as an absurd version.
    assert!(matches!(
        parse_err(&Builder::new(3u32.swap_bytes(), 0, 0).0),
        FormatError::UnsupportedVersion(_)
    ));
}

#[test]
fn counts_and_lengths_beyond_the_file_are_refused_before_allocating() {
    let err = parse_err(&Builder::new(3, u64::MAX, 0).0);
    assert!(err.to_string().contains("tensor infos"), "{err}");
    let err = parse_err(&Builder::new(3, 0, 1 << 60).0);
    assert!(err.to_string().contains("metadata"), "{err}");
    // A key claiming 2^62 bytes.
    let mut b = Builder::new(3, 0, 1);
    b.u64(1 << 62).u64(0);
    let err = parse_err(&b.0);
    assert!(matches!(err, FormatError::Truncated { needed, .. } if needed == 1 << 62));
    // An array of 2^61 u64s, and of 2^60 strings.
    let mut b = Builder::new(3, 0, 1);
    b.str("k").u32(9).u32(10).u64(1 << 61);
    assert!(matches!(parse_err(&b.0), FormatError::Truncated { .. }));
    let mut b = Builder::new(3, 0, 1);
    b.str("k").u32(9).u32(8).u64(1 << 60);
    assert!(matches!(parse_err(&b.0), FormatError::Truncated { .. }));
}

#[test]
fn metadata_defects_are_named() {
    let mut b = Builder::new(3, 0, 1);
    b.str("k").u32(13).u32(0);
    assert_eq!(
        parse_err(&b.0),
        FormatError::UnknownValueType {
            key: "k".into(),
            type_id: 13
        }
    );
    let mut b = Builder::new(3, 0, 2);
    b.kv_u32("k", 1).kv_u32("k", 2);
    assert_eq!(parse_err(&b.0), FormatError::DuplicateKey("k".into()));
    let mut b = Builder::new(3, 0, 1);
    b.str("k").u32(8).u64(2);
    b.0.extend([0xff, 0xfe]);
    assert!(matches!(parse_err(&b.0), FormatError::InvalidUtf8 { .. }));
    // Arrays of arrays of arrays of arrays.
    let mut b = Builder::new(3, 0, 1);
    b.str("deep").u32(9);
    for _ in 0..4 {
        b.u32(9).u64(1);
    }
    b.u32(4).u64(0);
    assert_eq!(
        parse_err(&b.0),
        FormatError::NestedTooDeep { key: "deep".into() }
    );
    let mut b = Builder::new(3, 0, 1);
    b.kv_u32("general.alignment", 48);
    assert_eq!(parse_err(&b.0), FormatError::BadAlignment(48));
}

#[test]
fn tensor_defects_are_named() {
    let one = |dims: &[u64], ty: u32, offset: u64, data: usize| {
        Builder::new(3, 1, 0)
            .tensor("t", dims, ty, offset)
            .pad_to(32, data)
    };
    assert!(matches!(
        parse_err(&one(&[1, 1, 1, 1, 1], 0, 0, 4)),
        FormatError::TooManyDims { n_dims: 5, .. }
    ));
    assert!(matches!(
        parse_err(&one(&[4], 4, 0, 64)),
        FormatError::UnknownTensorType { type_id: 4, .. }
    ));
    // 33 elements are not whole Q8_0 blocks.
    assert!(matches!(
        parse_err(&one(&[33], 8, 0, 64)),
        FormatError::BadShape { .. }
    ));
    // Element count overflowing u64.
    assert!(matches!(
        parse_err(&one(&[u64::MAX, 3], 0, 0, 64)),
        FormatError::BadShape { .. }
    ));
    assert!(matches!(
        parse_err(&one(&[4], 0, 8, 64)),
        FormatError::Misaligned { offset: 8, .. }
    ));
    let err = parse_err(&one(&[32], 0, 0, 127));
    assert!(matches!(err, FormatError::OutOfBounds { .. }), "{err}");
    assert!(err.to_string().contains("\"t\""), "{err}");
    assert!(matches!(
        parse_err(&one(&[4], 0, u64::MAX - 31, 64)),
        FormatError::OutOfBounds { .. }
    ));
    let two = Builder::new(3, 2, 0)
        .tensor("t", &[4], 0, 0)
        .tensor("t", &[4], 0, 32)
        .pad_to(32, 64);
    assert_eq!(parse_err(&two), FormatError::DuplicateTensor("t".into()));
}

#[test]
fn empty_and_missing_files_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = GgufFile::open(&empty)
        .err()
        .expect("an empty file is not GGUF");
    assert!(err.to_string().contains("empty.gguf"), "{err}");
    let err = GgufFile::open(&dir.path().join("absent.gguf"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("absent.gguf"), "{err}");
}

#[test]
fn every_truncation_of_a_real_file_is_an_error() {
    let bytes = fixture_bytes();
    let index = GgufIndex::parse(&bytes).unwrap();
    let last_tensor_end = index.tensors.iter().map(|t| t.start + t.len).max().unwrap();
    for len in 0..last_tensor_end {
        assert!(
            GgufIndex::parse(&bytes[..len]).is_err(),
            "prefix of {len} bytes"
        );
    }
}

#[test]
fn unsupported_types_fail_on_read_not_on_open() {
    let bytes = Builder::new(3, 1, 0)
        .tensor("iq", &[256], 16, 0)
        .pad_to(32, 66);
    let index = GgufIndex::parse(&bytes).unwrap();
    let t = index.tensor("iq").unwrap();
    let mut out = vec![0f32; t.elements()];
    let err = dequant::dequantize(t.ty, &bytes[t.start..t.start + t.len], &mut out).unwrap_err();
    assert!(err.to_string().contains("IQ2_XXS"), "{err}");
}

/// Parses `bytes`; when they parse, decodes every tensor. Nothing may panic, and every tensor
/// the index accepts must lie inside the input.
fn parse_and_read(bytes: &[u8]) {
    let Ok(index) = GgufIndex::parse(bytes) else {
        return;
    };
    for t in &index.tensors {
        assert!(
            t.start + t.len <= bytes.len(),
            "{} escapes the file",
            t.name
        );
        if t.ty.is_dequantizable() && t.elements() <= 1 << 20 {
            let mut out = vec![0f32; t.elements()];
            dequant::dequantize(t.ty, &bytes[t.start..t.start + t.len], &mut out)
                .expect("an indexed tensor has exactly its bytes");
        }
    }
}

/// Deterministic in CI (fixed seed, a few hundred cases); `PROPTEST_CASES=N` runs more and
/// `PROPTEST_RNG_SEED=S` explores elsewhere, for bounded fuzzing sessions by hand.
fn fuzz_config() -> Config {
    fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }
    Config {
        cases: env("PROPTEST_CASES").unwrap_or(512),
        rng_seed: RngSeed::Fixed(env("PROPTEST_RNG_SEED").unwrap_or(0x6767_7566)),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Values that break naive length arithmetic.
fn nasty_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 31),
        Just(1 << 32),
        Just(1 << 63),
        Just(i64::MAX as u64),
        0u64..100_000,
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(fuzz_config())]

    /// Random mutations of the real fixture: byte flips, overwritten 64-bit fields (lengths,
    /// counts, offsets, dimensions) and truncation.
    #[test]
    fn mutated_files_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        words in prop::collection::vec((any::<prop::sample::Index>(), nasty_u64()), 0..3),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = fixture_bytes();
        // Most structure is in the header: aim there.
        let header = GgufIndex::parse(&bytes).unwrap().data_start;
        for (at, v) in flips {
            bytes[at.index(header)] ^= v;
        }
        for (at, v) in words {
            let at = at.index(header - 8);
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        parse_and_read(&bytes);
    }

    /// Arbitrary bytes after a valid magic and version.
    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = Builder::new(3, 0, 0).0[..8].to_vec();
        bytes.extend(body);
        parse_and_read(&bytes);
    }
}
