//! `marengod perplexity`: how well a bundle predicts a text, and how far it strays from a
//! reference bundle (the same model in f32), scored as llama-perplexity scores it
//! ([`marengo::perplexity`]). Its flags and the `--json` line are an interface that scripts
//! and checks rely on: keep them stable.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use marengo::engine::{Engine, EngineOptions};
use marengo::model::Logits;
use marengo::perplexity::{Report, evaluate};

#[derive(clap::Args)]
pub struct Args {
    /// The bundle to score.
    #[arg(long)]
    bundle: PathBuf,
    /// The text, UTF-8.
    #[arg(long)]
    file: PathBuf,
    /// A bundle of the same model to compare with (its f32 export): adds the KL divergence of
    /// the next-token distributions, the top-1 agreement and the reference's perplexity.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Tokens per window, which is also the context the models run with, up to their maximum
    /// (default: the bundle's context length); the second half of each window is scored.
    #[arg(long)]
    context: Option<usize>,
    /// Kernel threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(marengo::systemd::log_filter("warn"))
        .with_writer(std::io::stderr)
        .init();
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let options = EngineOptions {
        threads: args.threads,
        logits: Logits::EveryPosition,
        context: args.context,
        ..EngineOptions::default()
    };
    let load = |dir: &PathBuf| {
        Engine::load(dir, &options).with_context(|| format!("loading {}", dir.display()))
    };
    let model = load(&args.bundle)?;
    let reference = args.reference.as_ref().map(load).transpose()?;
    let report = evaluate(&model, reference.as_deref(), &text, args.context)
        .with_context(|| format!("scoring {}", args.file.display()))?;

    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", json(&report))?;
    } else {
        print_text(&mut out, &args, &model, reference.as_deref(), &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn json(report: &Report) -> serde_json::Value {
    let mut line = serde_json::json!({
        "tokens": report.tokens,
        "window": report.windows.len,
        "windows": report.windows.count,
        "scored_positions": report.windows.scored_positions(),
        "perplexity": report.perplexity,
    });
    if let Some(reference) = &report.reference {
        line["reference"] = serde_json::json!({
            "perplexity": reference.perplexity,
            "kl_mean": reference.kl_mean,
            "kl_max": reference.kl_max,
            "top1_agreement_percent": reference.top1_agreement_percent,
        });
    }
    line
}

fn print_text(
    out: &mut impl Write,
    args: &Args,
    model: &Engine,
    reference: Option<&Engine>,
    report: &Report,
) -> std::io::Result<()> {
    let windows = &report.windows;
    writeln!(
        out,
        "text: {}, {} tokens; {} windows of {}, the second half of each scored ({} positions)",
        args.file.display(),
        report.tokens,
        windows.count,
        windows.len,
        windows.scored_positions()
    )?;
    writeln!(
        out,
        "bundle: {} ({})",
        args.bundle.display(),
        model.quantization()
    )?;
    writeln!(out, "perplexity: {:.4}", report.perplexity)?;
    if let (Some(dir), Some(engine), Some(figures)) =
        (&args.reference, reference, &report.reference)
    {
        writeln!(
            out,
            "reference: {} ({})",
            dir.display(),
            engine.quantization()
        )?;
        writeln!(out, "reference perplexity: {:.4}", figures.perplexity)?;
        writeln!(
            out,
            "KL divergence (reference || bundle), nats: mean {:.6}, max {:.6}",
            figures.kl_mean, figures.kl_max
        )?;
        writeln!(
            out,
            "top-1 agreement: {:.2} %",
            figures.top1_agreement_percent
        )?;
    }
    Ok(())
}
