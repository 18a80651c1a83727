//! Every implementation against the scalar reference, on exact cases (every code through every
//! operation) and on random matrices of awkward sizes, both scale layouts and several thread
//! counts.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// Allowed error, relative to `Σ |w·x|` of the output in question: f32 summation's error on
/// these rows, plus for [`Isa::Avx512Bf16`]'s matrix-vector product the at most `2^-18 ≈ 3.8e-6`
/// of `x` that its two-part bf16 split drops. Rounding `x` to a single bf16 (`2^-9`) would not
/// pass on the longer rows.
const TOLERANCE: f64 = 1e-5;
/// Allowed error of a matrix product over bf16 pairs ([`parallel::PairPanels`]), relative to
/// `Σ |w·x|`: the input and the scaled weight are each rounded to bf16 (`2^-9` relative), so a
/// product is off by at most about `2^-8` of itself.
const PAIR_TOLERANCE: f64 = 1.0 / 256.0;

struct TestMatrix {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    rows: usize,
    cols: usize,
    block: Option<usize>,
}

impl TestMatrix {
    fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, block: Option<usize>) -> Self {
        Self::from_codes(rng, rows, cols, block, |rng| rng.random())
    }

    fn from_codes(
        rng: &mut ChaCha8Rng,
        rows: usize,
        cols: usize,
        block: Option<usize>,
        mut code: impl FnMut(&mut ChaCha8Rng) -> u8,
    ) -> Self {
        let bytes = (0..rows * cols).map(|_| code(rng)).collect();
        let scales_per_row = block.map_or(1, |block| cols / block);
        let scales = (0..rows * scales_per_row)
            .map(|_| rng.random_range(1e-3..1e-1))
            .collect();
        Self {
            bytes,
            scales,
            rows,
            cols,
            block,
        }
    }

    fn view(&self) -> Fp8Matrix<'_> {
        Fp8Matrix::new(&self.bytes, self.rows, self.cols, &self.scales, self.block)
            .expect("test matrices are well-formed")
    }

    fn weight(&self, row: usize, col: usize) -> f64 {
        let span = self.block.unwrap_or(self.cols);
        let scale = self.scales[row * (self.cols / span) + col / span];
        f64::from(e4m3::value(self.bytes[row * self.cols + col])) * f64::from(scale)
    }

    /// `Σ_k |W[row, k] · x[k]|`, the scale of the rounding error a correct kernel may make.
    fn magnitude(&self, row: usize, x: &[f32]) -> f64 {
        x.iter()
            .enumerate()
            .map(|(col, &x)| (self.weight(row, col) * f64::from(x)).abs())
            .sum()
    }
}

fn random_vector(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Checks `got` against the reference within [`TOLERANCE`] of each output's magnitude; `what`
/// names the case in the failure message.
fn assert_close(what: impl Fn() -> String, isa: Isa, got: &[f32], expected: &Expected) {
    assert_within(what, isa, got, expected, TOLERANCE);
}

/// [`assert_close`] within `tolerance` of each output's magnitude.
fn assert_within(
    what: impl Fn() -> String,
    isa: Isa,
    got: &[f32],
    expected: &Expected,
    tolerance: f64,
) {
    assert_eq!(got.len(), expected.values.len());
    for (index, ((&got, &want), &magnitude)) in got
        .iter()
        .zip(&expected.values)
        .zip(&expected.magnitudes)
        .enumerate()
    {
        let error = (f64::from(got) - f64::from(want)).abs();
        assert!(
            error <= tolerance * magnitude,
            "{isa:?} {} output {index}: got {got}, reference {want}, error {error:e} > \
             {tolerance:e} × {magnitude:e}",
            what()
        );
    }
}

/// The reference product of a matrix with `[m, cols]` inputs, and each output's `Σ |w·x|`.
struct Expected {
    values: Vec<f32>,
    magnitudes: Vec<f64>,
}

impl Expected {
    fn new(matrix: &TestMatrix, x: &[f32]) -> Self {
        let w = matrix.view();
        let m = x.len() / w.cols();
        let mut values = vec![0.0; m * w.rows()];
        w.matmul_with(Isa::Scalar, x, &mut values)
            .expect("reference matmul");
        let magnitudes = x
            .chunks_exact(w.cols())
            .flat_map(|x| (0..w.rows()).map(|row| matrix.magnitude(row, x)))
            .collect();
        Self { values, magnitudes }
    }
}

fn vector_isas() -> Vec<Isa> {
    let isas: Vec<Isa> = available_isas()
        .into_iter()
        .filter(|&isa| isa != Isa::Scalar)
        .collect();
    assert!(isas.contains(&Isa::Portable));
    isas
}

fn pool(threads: usize) -> super::Pool {
    super::Pool::new(threads)
}

/// Block sizes worth testing for a row length: none, the smallest, the common one, the whole row.
fn layouts(cols: usize) -> Vec<Option<usize>> {
    let mut layouts = vec![None];
    for block in [16, 32, cols] {
        if block.is_multiple_of(BLOCK_GRANULE)
            && cols.is_multiple_of(block)
            && !layouts.contains(&Some(block))
        {
            layouts.push(Some(block));
        }
    }
    layouts
}

/// Every vector implementation's matrix-vector product against the reference.
fn check_matvec(matrix: &TestMatrix, x: &[f32]) {
    let w = matrix.view();
    let expected = Expected::new(matrix, x);
    for isa in vector_isas() {
        let mut got = vec![f32::NAN; w.rows()];
        w.matvec_with(isa, x, &mut got).expect("matvec");
        let what = || format!("matvec {}×{} {:?}", w.rows(), w.cols(), w.block());
        assert_close(what, isa, &got, &expected);
    }
}

/// Every vector implementation's matrix product against the reference.
fn check_matmul(matrix: &TestMatrix, x: &[f32]) {
    let w = matrix.view();
    let m = x.len() / w.cols();
    let expected = Expected::new(matrix, x);
    for isa in vector_isas() {
        let mut got = vec![f32::NAN; m * w.rows()];
        w.matmul_with(isa, x, &mut got).expect("matmul");
        let what = || format!("matmul {m}×{}×{} {:?}", w.rows(), w.cols(), w.block());
        let backend = isa.backend().expect("available").expect("a vector backend");
        let tolerance = match backend.pairs {
            Some(_) if m > parallel::SMALL_BATCH => PAIR_TOLERANCE,
            _ => TOLERANCE,
        };
        assert_within(what, isa, &got, &expected, tolerance);
    }
}

/// `W[n, k] = code (n + k) mod 256` with exactly representable scales: against one-hot inputs
/// every operation must reproduce every code's value exactly, subnormals and ±448 included.
#[test]
fn every_code_is_exact_through_every_operation() {
    let size = 256;
    let bytes: Vec<u8> = (0..size * size)
        .map(|i| ((i / size + i % size) % 256) as u8)
        .collect();
    let per_row: Vec<f32> = (0..size).map(|n| 2f32.powi(n as i32 % 9 - 4)).collect();
    let per_block: Vec<f32> = (0..size * size / 16)
        .map(|i| 2f32.powi(i as i32 % 7 - 3))
        .collect();
    let identity: Vec<f32> = (0..size * size)
        .map(|i| f32::from(i / size == i % size))
        .collect();
    let all_rows: Vec<usize> = (0..size).collect();
    for (scales, block) in [(&per_row, None), (&per_block, Some(16))] {
        let w = Fp8Matrix::new(&bytes, size, size, scales, block).expect("well-formed");
        let value = |n: usize, k: usize| {
            let span = block.unwrap_or(size);
            e4m3::value(bytes[n * size + k]) * scales[n * (size / span) + k / span]
        };
        for isa in available_isas() {
            let mut y = vec![f32::NAN; size];
            for k in [0, 1, 7, 0x7e, 0x81, 0xfe, 255] {
                w.matvec_with(isa, &identity[k * size..(k + 1) * size], &mut y)
                    .expect("matvec");
                for (n, &y) in y.iter().enumerate() {
                    assert_eq!(
                        y,
                        value(n, k),
                        "{isa:?} matvec {block:?} code {:#04x}",
                        bytes[n * size + k]
                    );
                }
            }
            let mut product = vec![f32::NAN; size * size];
            w.matmul_with(isa, &identity, &mut product).expect("matmul");
            let mut rows = vec![f32::NAN; size * size];
            w.gather_rows_with(isa, &all_rows, &mut rows)
                .expect("gather");
            for n in 0..size {
                for k in 0..size {
                    let code = bytes[n * size + k];
                    let want = value(n, k);
                    assert_eq!(
                        product[k * size + n],
                        want,
                        "{isa:?} matmul {block:?} code {code:#04x}"
                    );
                    assert_eq!(
                        rows[n * size + k].to_bits(),
                        want.to_bits(),
                        "{isa:?} gather {block:?} code {code:#04x}"
                    );
                }
            }
        }
    }
}

#[test]
fn matvec_matches_reference_on_awkward_sizes() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for cols in [1, 7, 16, 33, 48, 64, 4097] {
        for rows in [1, 3, 65] {
            for block in layouts(cols) {
                let matrix = TestMatrix::random(&mut rng, rows, cols, block);
                check_matvec(&matrix, &random_vector(&mut rng, cols));
            }
        }
    }
}

/// Inputs from `2^-30` to `2^30` of either sign: the bf16 split of `x` must keep its low
/// mantissa bits at every exponent.
#[test]
fn matvec_matches_reference_on_inputs_of_every_magnitude() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let matrix = TestMatrix::random(&mut rng, 37, 1000, None);
    let x: Vec<f32> = (0..1000)
        .map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-30..=30)))
        .collect();
    check_matvec(&matrix, &x);
}

#[test]
fn extreme_codes_match_reference() {
    // Only zeros, subnormals and ±448: the codes whose decoding most often goes wrong.
    let codes: Vec<u8> = [0x00, 0x80, 0x7e, 0xfe]
        .into_iter()
        .chain(0x01..=0x07)
        .chain(0x81..=0x87)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for block in [None, Some(32)] {
        let matrix = TestMatrix::from_codes(&mut rng, 37, 96, block, |rng| {
            codes[rng.random_range(0..codes.len())]
        });
        let x = random_vector(&mut rng, 6 * 96);
        check_matvec(&matrix, &x[..96]);
        check_matmul(&matrix, &x);
    }
}

#[test]
fn matmul_matches_reference_for_every_token_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Every count to 17, and both sides of one and two tiles of the widest tile (24 tokens).
    let every = Vec::from_iter((1..=17).chain([23, 24, 25, 47, 48, 49]));
    // Long rows cost the reference (and qemu) dearly: a few token counts cover their tiles.
    let some = vec![1, 2, 6, 7, 17];
    for (rows, cols, counts) in [
        (1, 7, &every),
        (3, 33, &every),
        (17, 64, &every),
        (33, 300, &every),
        (65, 4097, &some),
    ] {
        for block in layouts(cols) {
            let matrix = TestMatrix::random(&mut rng, rows, cols, block);
            for &m in counts {
                check_matmul(&matrix, &random_vector(&mut rng, m * cols));
            }
        }
    }
}

/// Every vector implementation's small-batch product against the reference, whatever the
/// threshold at which `matmul` takes it.
fn check_small_batch(matrix: &TestMatrix, x: &[f32]) {
    let w = matrix.view();
    let m = x.len() / w.cols();
    let expected = Expected::new(matrix, x);
    for isa in vector_isas() {
        let backend = isa.backend().expect("available").expect("a vector backend");
        let mut got = vec![f32::NAN; m * w.rows()];
        parallel::matmul_small(backend, &w, x, m, &mut got);
        let what = || format!("small batch {m}×{}×{} {:?}", w.rows(), w.cols(), w.block());
        assert_close(what, isa, &got, &expected);
    }
}

#[test]
fn small_batches_match_reference_for_every_token_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    // Row counts around the row groups (2 and 4) and columns around the steps (16 to 64).
    for (rows, cols) in [(1, 7), (3, 48), (5, 64), (7, 100), (13, 272)] {
        for block in layouts(cols) {
            let matrix = TestMatrix::random(&mut rng, rows, cols, block);
            for m in 1..=17 {
                check_small_batch(&matrix, &random_vector(&mut rng, m * cols));
            }
        }
    }
}

#[test]
fn small_batches_split_across_threads_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for block in [None, Some(16), Some(64)] {
        // Enough weights to be split, in chunks that do not divide the rows.
        let matrix = TestMatrix::random(&mut rng, 301, 320, block);
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                for m in [2, 5, 9, 16] {
                    check_small_batch(&matrix, &random_vector(&mut rng, m * 320));
                }
            });
        }
    }
}

#[test]
fn matmul_matches_reference_past_one_token_block() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let matrix = TestMatrix::random(&mut rng, 21, 272, Some(16));
    check_matmul(&matrix, &random_vector(&mut rng, 250 * 272));
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for block in [None, Some(32)] {
        let matrix = TestMatrix::random(&mut rng, 301, 512, block);
        let x = random_vector(&mut rng, 5 * 512);
        for threads in [1, 2, 3, 4] {
            pool(threads).install(|| {
                check_matvec(&matrix, &x[..512]);
                check_matmul(&matrix, &x);
            });
        }
    }
}

#[test]
fn gather_rows_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for block in layouts(48) {
        let matrix = TestMatrix::random(&mut rng, 10, 48, block);
        let w = matrix.view();
        let rows = [9, 0, 3, 3];
        let mut want = vec![0.0; rows.len() * 48];
        w.gather_rows_with(Isa::Scalar, &rows, &mut want)
            .expect("reference gather");
        for isa in vector_isas() {
            let mut got = vec![f32::NAN; rows.len() * 48];
            w.gather_rows_with(isa, &rows, &mut got).expect("gather");
            assert_eq!(got, want, "{isa:?} {block:?}");
        }
    }
}

/// Matrices of a layer's q/k/v shape, large enough to be split across threads: each output is
/// the single matrix's product, bit for bit, at every thread count.
#[test]
fn matvec_many_equals_one_matvec_per_matrix() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let cols = 160;
    for block in [None, Some(32)] {
        let matrices: Vec<TestMatrix> = [576, 192, 200]
            .into_iter()
            .map(|rows| TestMatrix::random(&mut rng, rows, cols, block))
            .collect();
        let views: Vec<Fp8Matrix> = matrices.iter().map(TestMatrix::view).collect();
        let x = random_vector(&mut rng, cols);
        for isa in available_isas() {
            let single: Vec<Vec<f32>> = views
                .iter()
                .map(|w| {
                    let mut y = vec![f32::NAN; w.rows()];
                    w.matvec_with(isa, &x, &mut y).expect("matvec");
                    y
                })
                .collect();
            for threads in [1, 2, 3] {
                let mut got: Vec<Vec<f32>> =
                    views.iter().map(|w| vec![f32::NAN; w.rows()]).collect();
                let mut outputs: Vec<&mut [f32]> = got.iter_mut().map(Vec::as_mut_slice).collect();
                pool(threads).install(|| {
                    Fp8Matrix::matvec_many_with(isa, &views, &x, &mut outputs).expect("matvec_many")
                });
                assert_eq!(got, single, "{isa:?} {threads} threads {block:?}");
            }
        }
    }
}

#[test]
fn bad_operands_are_refused() {
    let matrix = TestMatrix::random(&mut ChaCha8Rng::seed_from_u64(7), 4, 32, None);
    let w = matrix.view();
    let mut y = vec![0.0; 4];
    assert_eq!(
        w.matvec(&[0.0; 31], &mut y).unwrap_err(),
        KernelError::Operand {
            operand: "matvec input",
            expected: 32,
            actual: 31
        }
    );
    assert_eq!(
        w.matmul(&[0.0; 64], &mut y).unwrap_err(),
        KernelError::Operand {
            operand: "matmul output",
            expected: 8,
            actual: 4
        }
    );
    assert_eq!(
        Fp8Matrix::matvec_many(&[w, w], &[0.0; 32], &mut [&mut y]).unwrap_err(),
        KernelError::Operand {
            operand: "matvec_many outputs",
            expected: 2,
            actual: 1
        }
    );
    assert_eq!(
        w.gather_rows(&[4], &mut [0.0; 32]).unwrap_err(),
        KernelError::RowOutOfRange { row: 4, rows: 4 }
    );
    let missing = Isa::ALL
        .into_iter()
        .find(|isa| !isa.is_available())
        .expect("one ISA is foreign");
    assert_eq!(
        w.matvec_with(missing, &[0.0; 32], &mut y).unwrap_err(),
        KernelError::IsaUnavailable(missing)
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_widest_x86_path_the_cpu_has_is_chosen() {
    let has_avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let has_avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    let has_bf16 = is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512bf16");
    let want = match (has_avx2, has_avx512, has_bf16) {
        (true, true, true) => Isa::Avx512Bf16,
        (true, true, false) => Isa::Avx512,
        (true, false, _) => Isa::Avx2,
        (false, _, _) => Isa::Portable,
    };
    assert_eq!(Isa::best(), want);
}

#[cfg(target_arch = "aarch64")]
#[test]
fn neon_is_chosen_on_aarch64() {
    assert_eq!(Isa::best(), Isa::Neon);
    assert!(available_isas().contains(&Isa::Neon));
}

/// Every test of the kernels (FP8 and attention) runs each implementation this CPU has and passes
/// whichever those are, so this one says which were covered and why the others were not.
/// `test.sh` runs it with `--nocapture`, so that CI's log shows it for each architecture.
#[test]
fn report_the_isas_covered() {
    let (covered, missed): (Vec<Isa>, Vec<Isa>) =
        Isa::ALL.into_iter().partition(|isa| isa.is_available());
    let missed: Vec<String> = missed
        .into_iter()
        .map(|isa| format!("{isa:?} ({})", why_unavailable(isa)))
        .collect();
    eprintln!(
        "kernels tested on {} with {covered:?}; not tested: {}",
        std::env::consts::ARCH,
        if missed.is_empty() {
            "none".to_string()
        } else {
            missed.join(", ")
        }
    );
    assert_eq!(covered, available_isas());
    assert!(covered.contains(&Isa::best()));
}

fn why_unavailable(isa: Isa) -> &'static str {
    match (isa, cfg!(target_arch = "x86_64")) {
        (Isa::Scalar | Isa::Portable, _) => unreachable!("{isa:?} runs everywhere"),
        (Isa::Avx2, true) => "this CPU lacks AVX2, FMA or F16C",
        (Isa::Avx512, true) => "this CPU lacks AVX-512F, AVX-512BW or AVX2",
        (Isa::Avx512Bf16, true) => "this CPU lacks AVX-512 VBMI or BF16, or what Avx512 needs",
        (Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16, false) => "x86_64 only",
        (Isa::Neon, _) => "aarch64 only",
    }
}
