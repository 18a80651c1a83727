//! `marengo-export`: command-line front end. Errors become `anyhow` only here.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use marengo_export::checkpoint::SourceDtype;
use marengo_export::synth::{SynthOptions, synthesize};

#[derive(Parser)]
#[command(
    version,
    about = "Turns HuggingFace Mistral/Llama checkpoints into marengo bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic random HuggingFace checkpoint for a config.json (tests, benchmarks).
    Synth {
        /// The config.json to synthesize weights for.
        #[arg(long)]
        config: PathBuf,
        /// Checkpoint directory to write (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Storage dtype: bf16, f16 or f32 (default: the config's).
        #[arg(long, value_parser = parse_source_dtype)]
        dtype: Option<SourceDtype>,
        /// Number of safetensors shards.
        #[arg(long, default_value_t = 1)]
        shards: usize,
        /// A tokenizer.json to copy into the checkpoint.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
}

fn parse_source_dtype(value: &str) -> Result<SourceDtype, String> {
    SourceDtype::from_hf_name(value)
        .ok_or_else(|| format!("unknown dtype {value:?} (bf16, f16, f32)"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Synth {
            config,
            out,
            seed,
            dtype,
            shards,
            tokenizer,
        } => synthesize(&SynthOptions {
            config,
            out: out.clone(),
            seed,
            dtype,
            shards,
            tokenizer,
        })
        .with_context(|| format!("synthesizing a checkpoint in {}", out.display())),
    }
}
