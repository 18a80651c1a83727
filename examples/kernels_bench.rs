//! Speed of the FP8 kernels on Mistral-7B-sized matrices, next to the machine's memory read
//! bandwidth: a decode step is bound by that bandwidth, so the fraction is the figure of merit.
//!
//! `cargo run --release --example kernels_bench [-- --isa portable --threads 1,2]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use marengo::kernels::{Fp8Matrix, Isa, Pool, available_isas, measure_read_bandwidth};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
struct Args {
    /// Implementation to measure (scalar, portable, avx2, avx512, avx512bf16, neon); the fastest available by default.
    #[arg(long)]
    isa: Option<String>,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Output channels × reduction length of the matrices to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096x4096,14336x4096,4096x14336,32000x4096"
    )]
    shapes: Vec<String>,
    /// Token counts for the matrix products.
    #[arg(long, value_delimiter = ',', default_value = "64,512")]
    tokens: Vec<usize>,
    /// Reuse one copy of each matrix, so that small ones are read from the caches: the kernel's
    /// own speed, without memory's limit.
    #[arg(long)]
    in_cache: bool,
}

/// Weights streamed per matrix-vector measurement: far above any last-level cache, so each
/// product reads its weights from DRAM as a decode step of a 7B model does.
const STREAM_BYTES: usize = 1 << 30;
/// Minimum measuring time per figure.
const MEASURE: Duration = Duration::from_millis(1500);
const GB: f64 = 1e9;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let isa = match args.isa.as_deref() {
        None => Isa::best(),
        Some(name) => *Isa::ALL
            .iter()
            .find(|isa| format!("{isa:?}").eq_ignore_ascii_case(name))
            .with_context(|| format!("unknown --isa {name}"))?,
    };
    if !isa.is_available() {
        bail!(
            "{isa:?} is not available here (available: {:?})",
            available_isas()
        );
    }
    let shapes = args
        .shapes
        .iter()
        .map(|shape| {
            let (rows, cols) = shape
                .split_once('x')
                .with_context(|| format!("shape {shape}: want NxK"))?;
            Ok((rows.parse()?, cols.parse()?))
        })
        .collect::<anyhow::Result<Vec<(usize, usize)>>>()?;

    println!("kernels: {isa:?} (available: {:?})", available_isas());
    for &threads in &args.threads {
        Pool::new(threads).install(|| run(isa, threads, &shapes, &args.tokens, args.in_cache))?;
    }
    Ok(())
}

fn run(
    isa: Isa,
    threads: usize,
    shapes: &[(usize, usize)],
    tokens: &[usize],
    in_cache: bool,
) -> anyhow::Result<()> {
    let bandwidth = measure_read_bandwidth(1 << 30) / GB;
    println!(
        "\n{threads} thread(s): memory read bandwidth {bandwidth:.1} GB/s (sum of a 1 GiB buffer)"
    );
    print!("{:>12} {:>13} {:>9}", "N×K", "matvec GB/s", "of read");
    for m in tokens {
        print!(" {:>17}", format!("matmul M={m} GFLOP/s"));
    }
    println!();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for &(rows, cols) in shapes {
        let bytes = rows * cols;
        let copies = if in_cache {
            1
        } else {
            STREAM_BYTES.div_ceil(bytes).max(1)
        };
        let mut weights = vec![0u8; copies * bytes];
        rng.fill_bytes(&mut weights);
        let scales: Vec<f32> = (0..rows).map(|_| rng.random_range(1e-3..1e-2)).collect();
        let matrices = weights
            .chunks_exact(bytes)
            .map(|bytes| Fp8Matrix::new(bytes, rows, cols, &scales, None))
            .collect::<Result<Vec<_>, _>>()?;
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut y = vec![0.0; rows];

        let mut products = 0;
        let seconds = measure(|| {
            matrices[products % copies].matvec_with(isa, &x, &mut y)?;
            products += 1;
            black_box(&y);
            Ok(())
        })?;
        let matvec = bytes as f64 / seconds / GB;
        print!(
            "{:>12} {matvec:>13.2} {:>9.3}",
            format!("{rows}×{cols}"),
            matvec / bandwidth
        );

        for &m in tokens {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut y = vec![0.0; m * rows];
            let mut products = 0;
            let seconds = measure(|| {
                matrices[products % copies].matmul_with(isa, &x, &mut y)?;
                products += 1;
                Ok(())
            })?;
            let flops = 2.0 * (m * rows * cols) as f64;
            print!(" {:>17.1}", flops / seconds / GB);
        }
        println!();
    }
    Ok(())
}

/// Runs `step` once to warm up, then again until [`MEASURE`] has passed; returns the fastest
/// step's seconds. On a shared machine the mean mostly measures the other processes: the
/// fastest of many short steps is the one no other process interrupted.
fn measure(mut step: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    step()?;
    let start = Instant::now();
    let mut fastest = f64::INFINITY;
    while start.elapsed() < MEASURE {
        let begun = Instant::now();
        step()?;
        fastest = fastest.min(begun.elapsed().as_secs_f64());
    }
    Ok(fastest)
}
