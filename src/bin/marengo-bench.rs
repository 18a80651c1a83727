//! `marengo-bench`: how close decoding comes to the machine's memory-bandwidth limit.
//!
//! Decode is a chain of matrix-vector products over every weight, so its ceiling is
//! (bytes of weights read per token) ÷ (memory read bandwidth). The benchmark measures
//! both in the same run, prefill speed and time at one or more prompt lengths, decode speed
//! (at a short and a long position, which shows whether the KV cache is copied per token) and
//! resident memory split into anonymous and file-backed. `bench/side-by-side.sh` runs it
//! interleaved with llama.cpp's own `llama-bench` and prints the ratios.
//!
//! A benchmark prints figures; it asserts nothing.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use marengo::engine::{Engine, EngineOptions, kv_cache_bytes};
use marengo::memory::MemoryUsage;
use marengo_bundle::manifest::Manifest;

#[derive(Parser)]
#[command(
    name = "marengo-bench",
    version,
    about = "Prefill/decode speed against the memory-bandwidth limit"
)]
struct Args {
    /// The bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Prompt lengths for the prefill measurement, each from an empty cache (e.g. 5,32,128,512).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    prompt_tokens: Vec<usize>,
    /// Tokens decoded at each position.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// The short decode position.
    #[arg(long, default_value_t = 100)]
    short_position: usize,
    /// The long decode position (0 skips it).
    #[arg(long, default_value_t = 3000)]
    long_position: usize,
    /// The context to run with, up to the model's maximum (default: the bundle's own).
    #[arg(long, value_name = "TOKENS")]
    context: Option<usize>,
    /// Bytes read to measure the memory read bandwidth.
    #[arg(long, default_value_t = 1 << 30)]
    bandwidth_bytes: usize,
    /// Measurements of each figure, averaged (as llama-bench's `-r`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repetitions: u32,
    /// Numbers of clients decoding together (one forward pass per step for all of them), each
    /// measured at the short position, e.g. 1,2,4; empty skips it.
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// A short prompt and a decode step before measuring, so that the first measurement does
    /// not pay for first-touch page faults on the weights (as llama-bench's warm-up run).
    #[arg(long)]
    warmup: bool,
}

/// One prompt length's prefill, from an empty cache.
struct Prefill {
    tokens: usize,
    seconds: f64,
}

impl Prefill {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let engine = Engine::load(
        &args.bundle,
        &EngineOptions {
            threads: Some(args.threads),
            verify_hashes: false,
            context: args.context,
            ..EngineOptions::default()
        },
    )
    .with_context(|| format!("loading {}", args.bundle.display()))?;
    let load_s = start.elapsed().as_secs_f64();
    let manifest = engine.manifest();
    let vocab = manifest.architecture.vocab_size as u32;
    let context = engine.text().context_length();
    let bytes_per_token = weight_bytes_per_token(manifest);
    let idle = MemoryUsage::current().unwrap_or_default();

    let bandwidth = marengo::kernels::measure_read_bandwidth(args.bandwidth_bytes);

    let mut tokens = Lcg(0x5eed);
    let mut session = engine.new_sequence()?;
    if args.warmup {
        let warm: Vec<u32> = (0..8).map(|_| tokens.next(vocab)).collect();
        session.feed(&warm)?;
        session.feed(&[tokens.next(vocab)])?;
        session.reset()?;
    }
    let mut prefills = Vec::new();
    let (mut after_prefill, mut kv_after_prefill) = (MemoryUsage::default(), 0);
    for &length in &args.prompt_tokens {
        let mut seconds = 0.0;
        for _ in 0..args.repetitions {
            let prompt: Vec<u32> = (0..length).map(|_| tokens.next(vocab)).collect();
            let t = Instant::now();
            session.feed(&prompt)?;
            seconds += t.elapsed().as_secs_f64();
            after_prefill = MemoryUsage::current().unwrap_or_default();
            kv_after_prefill = kv_cache_bytes(&manifest.architecture, length);
            session.reset()?;
        }
        prefills.push(Prefill {
            tokens: length,
            seconds: seconds / f64::from(args.repetitions),
        });
    }
    let prefill = prefills.last().map_or(0.0, Prefill::tokens_per_s);

    if args.long_position > 0 && args.long_position + args.decode_tokens > context {
        bail!(
            "--long-position {} + decode tokens exceed the context of {context}",
            args.long_position
        );
    }
    let (mut decode_short, mut decode_long_sum) = (0.0, 0.0);
    for _ in 0..args.repetitions {
        session.reset()?;
        let warm: Vec<u32> = (0..args.short_position)
            .map(|_| tokens.next(vocab))
            .collect();
        session.feed(&warm)?;
        decode_short += decode(&mut session, &mut tokens, vocab, args.decode_tokens)?;
        if args.long_position > 0 {
            let fill: Vec<u32> = (session.cached().len()..args.long_position)
                .map(|_| tokens.next(vocab))
                .collect();
            session.feed(&fill)?;
            decode_long_sum += decode(&mut session, &mut tokens, vocab, args.decode_tokens)?;
        }
    }
    let decode_short = decode_short / f64::from(args.repetitions);
    let decode_long =
        (args.long_position > 0).then(|| decode_long_sum / f64::from(args.repetitions));
    let together = decode_together(&engine, &args, &mut tokens, vocab)?;
    let memory = MemoryUsage::current().unwrap_or_default();

    let fraction = bytes_per_token as f64 * decode_short / bandwidth;
    println!("bundle                {}", args.bundle.display());
    println!("quantization          {}", engine.quantization());
    println!("threads               {}", args.threads);
    println!("load (start→ready)    {load_s:.3} s");
    println!(
        "weights read / token  {:.1} MB",
        bytes_per_token as f64 / 1e6
    );
    println!("read bandwidth        {:.2} GB/s", bandwidth / 1e9);
    println!(
        "decode ceiling        {:.2} tok/s",
        bandwidth / bytes_per_token as f64
    );
    for p in &prefills {
        println!(
            "prefill               {:.2} tok/s ({} tokens in {:.3} s)",
            p.tokens_per_s(),
            p.tokens,
            p.seconds
        );
    }
    println!(
        "decode @{:<5}         {decode_short:.2} tok/s = {:.3} of bandwidth",
        args.short_position, fraction
    );
    if let Some(long) = decode_long {
        println!("decode @{:<5}         {long:.2} tok/s", args.long_position);
    }
    for t in &together {
        println!(
            "decode {} clients     {:.2} tok/s together, {:.2} tok/s each",
            t.clients,
            t.aggregate,
            t.aggregate / t.clients as f64
        );
    }
    if let Some(t) = together.last().filter(|t| t.clients > 1) {
        println!(
            "first token, {} joins  {:.3} s while {} stream ({:.3} s alone), 32-token prompt",
            t.clients,
            t.join_first_token_s,
            t.clients - 1,
            t.alone_first_token_s
        );
    }
    println!(
        "RSS idle (mapped)     anon {:.1} MiB, file {:.1} MiB",
        mib(idle.anonymous),
        mib(idle.file)
    );
    println!(
        "RSS after prefill     anon {:.1} MiB = KV cache {:.1} MiB + {:.1} MiB",
        mib(after_prefill.anonymous),
        mib(kv_after_prefill),
        mib(after_prefill.anonymous.saturating_sub(kv_after_prefill))
    );
    println!(
        "RSS after run         anon {:.1} MiB, file {:.1} MiB",
        mib(memory.anonymous),
        mib(memory.file)
    );

    let prompts: Vec<serde_json::Value> = prefills
        .iter()
        .map(|p| {
            serde_json::json!({
                "tokens": p.tokens,
                "seconds": p.seconds,
                "tokens_per_s": p.tokens_per_s(),
            })
        })
        .collect();
    let report = serde_json::json!({
        "load_s": load_s,
        "threads": args.threads,
        "weight_bytes_per_token": bytes_per_token,
        "read_bandwidth_bytes_per_s": bandwidth,
        "prefill_tokens_per_s": prefill,
        "prefills": prompts,
        "decode_tokens_per_s": decode_short,
        "decode_position": args.short_position,
        "decode_fraction_of_bandwidth": fraction,
        "decode_long_tokens_per_s": decode_long,
        "decode_long_position": args.long_position,
        "anon_rss_bytes": memory.anonymous,
        "anon_rss_after_prefill_bytes": after_prefill.anonymous,
        "kv_cache_after_prefill_bytes": kv_after_prefill,
        "file_rss_bytes": memory.file,
        "clients": together.iter().map(|t| serde_json::json!({
            "clients": t.clients,
            "aggregate_tokens_per_s": t.aggregate,
            "join_first_token_s": t.join_first_token_s,
            "alone_first_token_s": t.alone_first_token_s,
        })).collect::<Vec<_>>(),
    });
    println!("{report}");
    Ok(())
}

/// Decode of several clients together, at the short position.
struct Together {
    clients: usize,
    /// Tokens per second over all clients.
    aggregate: f64,
    /// The time to the first token of the last client, joining while the others decode:
    /// its prompt and one step of all of them.
    join_first_token_s: f64,
    /// The same prompt and first token with nobody else running.
    alone_first_token_s: f64,
}

fn decode_together(
    engine: &Engine,
    args: &Args,
    tokens: &mut Lcg,
    vocab: u32,
) -> anyhow::Result<Vec<Together>> {
    let Some(&most) = args.clients.iter().max() else {
        return Ok(Vec::new());
    };
    // As many lanes as the most clients, as a daemon started with `parallel` that many.
    let mut lanes = engine.new_lanes(most)?;
    let mut results = Vec::new();
    for &clients in &args.clients {
        let mut aggregate = 0.0;
        let (mut join, mut alone) = (0.0, 0.0);
        for _ in 0..args.repetitions {
            for lane in 0..lanes.count() {
                lanes.reset(lane)?;
            }
            let joining = clients - 1;
            for lane in 0..joining {
                let warm: Vec<u32> = (0..args.short_position)
                    .map(|_| tokens.next(vocab))
                    .collect();
                lanes.feed(lane, &warm)?;
            }
            let prompt: Vec<u32> = (0..32).map(|_| tokens.next(vocab)).collect();
            let t = Instant::now();
            lanes.feed(joining, &prompt)?;
            lanes.step(&[(joining, tokens.next(vocab))])?;
            alone += t.elapsed().as_secs_f64();
            lanes.reset(joining)?;
            let t = Instant::now();
            lanes.feed(joining, &prompt)?;
            let steps: Vec<(usize, u32)> = (0..clients)
                .map(|lane| (lane, tokens.next(vocab)))
                .collect();
            lanes.step(&steps)?;
            join += t.elapsed().as_secs_f64();
            let fill: Vec<u32> = (lanes.cached(joining).len()..args.short_position)
                .map(|_| tokens.next(vocab))
                .collect();
            lanes.feed(joining, &fill)?;
            let t = Instant::now();
            for _ in 0..args.decode_tokens {
                let steps: Vec<(usize, u32)> = (0..clients)
                    .map(|lane| (lane, tokens.next(vocab)))
                    .collect();
                lanes.step(&steps)?;
            }
            aggregate += (clients * args.decode_tokens) as f64 / t.elapsed().as_secs_f64();
        }
        let runs = f64::from(args.repetitions);
        results.push(Together {
            clients,
            aggregate: aggregate / runs,
            join_first_token_s: join / runs,
            alone_first_token_s: alone / runs,
        });
    }
    Ok(results)
}

fn decode(
    session: &mut marengo::sequence::Sequence,
    tokens: &mut Lcg,
    vocab: u32,
    count: usize,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    for _ in 0..count {
        session.feed(&[tokens.next(vocab)])?;
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

/// Bytes a decode step reads: every weight except the embedding table, of which it reads
/// one row (a tied table is read whole as the LM head), and the rotary caches, of which it
/// reads one row.
fn weight_bytes_per_token(manifest: &Manifest) -> u64 {
    let arch = &manifest.architecture;
    manifest
        .tensors
        .iter()
        .map(|t| {
            let is_embedding = t.name.contains("embed_tokens")
                || t.scale_of
                    .as_deref()
                    .is_some_and(|s| s.contains("embed_tokens"));
            let is_rope = t.name.contains("rope")
                || t.name.contains("cos_cache")
                || t.name.contains("sin_cache");
            if (is_embedding && !arch.tie_word_embeddings) || is_rope {
                let rows = t.shape.first().copied().unwrap_or(1).max(1) as u64;
                t.length / rows
            } else {
                t.length
            }
        })
        .sum()
}

/// The keys and values of `positions` tokens, f32, every layer.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A fixed token stream: the benchmark's inputs are the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % u64::from(below)) as u32
    }
}
