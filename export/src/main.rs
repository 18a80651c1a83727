//! `marengo-export`: command-line front end. Errors become `anyhow` only here.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use marengo_bundle::manifest::QuantKind;
use marengo_export::checkpoint::gguf::GgufCheckpoint;
use marengo_export::checkpoint::hf_dir::HfCheckpoint;
use marengo_export::checkpoint::{CheckpointSource, SourceDtype, WithChatTemplate};
use marengo_export::convert::{ConvertOptions, convert};
use marengo_export::inspect::inspect;
use marengo_export::install;
use marengo_export::merge::{DEFAULT_SHARD_BYTES, MergedCheckpoint, write_checkpoint};
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

/// Storage of the linear layers, the embedding and the LM head.
#[derive(Clone, Copy, ValueEnum)]
enum ExportDtype {
    /// FP8 E4M3FN with f32 scales (the default).
    Fp8,
    /// Unquantized f16.
    F16,
    /// Unquantized f32: the reference path.
    F32,
}

/// How an FP8 bundle stores the LM head.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HeadEncoding {
    /// The weight and its rounding error, two FP8 tensors summed (the default).
    Residual,
    /// One FP8 tensor, like every other weight.
    Single,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a checkpoint into a bundle directory (written atomically).
    Convert {
        /// HuggingFace checkpoint directory: config.json, safetensors, tokenizer.json.
        #[arg(required_unless_present_any = ["gguf", "merge"], conflicts_with_all = ["gguf", "merge"])]
        checkpoint: Option<PathBuf>,
        /// Read a GGUF file instead of a checkpoint directory.
        #[arg(long, conflicts_with = "merge")]
        gguf: Option<PathBuf>,
        /// Convert the SLERP merge a mergekit YAML describes, without writing the merged
        /// checkpoint (tensors are merged as the converter reads them).
        #[arg(long, value_name = "YAML")]
        merge: Option<PathBuf>,
        /// Bundle directory to create.
        #[arg(long, required_unless_present = "install", conflicts_with = "install")]
        out: Option<PathBuf>,
        /// Install the bundle as the model NAME where marengod finds it: in
        /// /var/lib/marengo/models as root, else in $XDG_DATA_HOME/marengo/models (a session
        /// daemon's); `marengoctl models` then lists it.
        #[arg(long, value_name = "NAME")]
        install: Option<String>,
        /// With --install: the models directory to install into.
        #[arg(long, value_name = "DIR", requires = "install")]
        models_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "fp8")]
        dtype: ExportDtype,
        /// FP8: one scale per N input elements instead of one per output channel.
        #[arg(long, value_name = "N")]
        block: Option<usize>,
        /// FP8: how the LM head is stored. `residual` adds a second FP8 tensor holding the
        /// first one's rounding error (the logits come out as exact as with 8-bit integers, for
        /// one more byte per head weight); `single` stores it like every other weight.
        #[arg(long, value_enum, default_value = "residual")]
        head: HeadEncoding,
        /// The context a run has unless it chooses one (`marengod --context`, up to
        /// max_position_embeddings, which the bundle always covers) [default:
        /// max_position_embeddings, at most 4096].
        #[arg(long, value_name = "N")]
        context_length: Option<usize>,
        /// The model's Jinja chat template, in place of the checkpoint's own (for a GGUF
        /// written without tokenizer.chat_template: without a template, the bundle serves
        /// Generate and refuses Chat).
        #[arg(long, value_name = "FILE")]
        chat_template: Option<PathBuf>,
        /// Replace OUT if it exists and is not empty.
        #[arg(long)]
        force: bool,
        /// Log each tensor with its quantization error (relative RMS).
        #[arg(long)]
        verbose: bool,
    },
    /// SLERP-merge two checkpoints as a mergekit YAML describes, into a HuggingFace checkpoint.
    Merge {
        /// The merge config (mergekit's YAML: merge_method slerp, base_model, models or
        /// slices, parameters.t, dtype, out_dtype). Relative model paths are taken from the
        /// YAML's directory.
        #[arg(long, value_name = "YAML")]
        config: PathBuf,
        /// Checkpoint directory to create (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Largest safetensors shard, in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SHARD_BYTES)]
        shard_size: u64,
        /// Replace OUT if it exists and is not empty.
        #[arg(long)]
        force: bool,
        /// Log each tensor's t and coefficients.
        #[arg(long)]
        verbose: bool,
    },
    /// Print a bundle's manifest and tensor table.
    Inspect {
        bundle: PathBuf,
        /// Also check the sha256 of every file.
        #[arg(long)]
        verify: bool,
    },
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

fn init_logging(verbose: bool, merge: bool) {
    let default = match (verbose, merge) {
        (true, true) => "info,marengo_export::merge=debug",
        (true, false) => "info",
        (false, _) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let verbose = matches!(
        cli.command,
        Command::Convert { verbose: true, .. } | Command::Merge { verbose: true, .. }
    );
    let merging = matches!(
        cli.command,
        Command::Convert { merge: Some(_), .. } | Command::Merge { .. }
    );
    init_logging(verbose, merging);
    match cli.command {
        Command::Convert {
            checkpoint,
            gguf,
            merge,
            out,
            install,
            models_dir,
            dtype,
            block,
            head,
            context_length,
            chat_template,
            force,
            verbose: _,
        } => {
            let source: Box<dyn CheckpointSource> = match (checkpoint, gguf, merge) {
                (_, Some(file), _) => Box::new(
                    GgufCheckpoint::open(&file)
                        .with_context(|| format!("reading {}", file.display()))?,
                ),
                (_, _, Some(yaml)) => Box::new(
                    MergedCheckpoint::open(&yaml)
                        .with_context(|| format!("preparing the merge {}", yaml.display()))?,
                ),
                (Some(dir), None, None) => Box::new(
                    HfCheckpoint::open(&dir)
                        .with_context(|| format!("reading checkpoint {}", dir.display()))?,
                ),
                (None, None, None) => {
                    anyhow::bail!("give a CHECKPOINT_DIR, --gguf FILE or --merge YAML")
                }
            };
            let out = match (out, &install) {
                (Some(out), _) => out,
                (None, Some(name)) => install::target(name, models_dir.as_deref())?,
                (None, None) => anyhow::bail!("give --out DIR or --install NAME"),
            };
            let opts = ConvertOptions {
                out: out.clone(),
                kind: match dtype {
                    ExportDtype::Fp8 => QuantKind::Fp8E4m3fn,
                    ExportDtype::F16 => QuantKind::F16,
                    ExportDtype::F32 => QuantKind::F32,
                },
                block,
                head_residual: head == HeadEncoding::Residual,
                context_length,
                force,
                command_line: std::env::args().collect(),
            };
            let with_template = chat_template
                .map(|file| WithChatTemplate::new(source.as_ref(), file))
                .transpose()?;
            let source: &dyn CheckpointSource = match &with_template {
                Some(with_template) => with_template,
                None => source.as_ref(),
            };
            convert(source, &opts).with_context(|| format!("exporting to {}", out.display()))?;
            if install.is_some() {
                install::make_readable(&out)?;
                eprintln!("installed {}", out.display());
            }
            Ok(())
        }
        Command::Merge {
            config,
            out,
            shard_size,
            force,
            verbose: _,
        } => {
            let merge = MergedCheckpoint::open(&config)
                .with_context(|| format!("preparing the merge {}", config.display()))?;
            write_checkpoint(&merge, &out, force, shard_size)
                .with_context(|| format!("merging into {}", out.display()))?;
            Ok(())
        }
        Command::Inspect { bundle, verify } => {
            inspect(&bundle, verify, &mut std::io::stdout().lock())
                .with_context(|| format!("inspecting {}", bundle.display()))
        }
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
