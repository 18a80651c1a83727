//! `marengod generate`: one generation in the foreground, like llama-cli. Its flags and the
//! `--stats` JSON line are an interface that scripts and checks rely on: keep them stable.
//! Its defaults are those of every entry point ([`marengo_client::defaults`]): it samples;
//! `--temperature 0` is greedy.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use marengo::chat::Message;
use marengo::constraint::ConstraintSpec;
use marengo::engine::{Engine, EngineOptions};
use marengo::memory::MemoryUsage;
use marengo::request::{Prompt, RequestError, RequestOptions};
use marengo::sampler::ranges;
use marengo_client::constraint_args::ConstraintArgs;
use marengo_client::defaults;

#[derive(clap::Args)]
pub struct Args {
    /// The bundle directory (made by `marengo-export convert`).
    #[arg(long)]
    bundle: PathBuf,
    /// The prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated, fed as they are (no BOS added).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long, conflicts_with = "prompt_ids")]
    chat: bool,
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_TOKENS,
          value_parser = clap::value_parser!(u32).range(1..),
          help = "Most tokens to generate, 1 or more; the context's end also ends the text")]
    max_tokens: u32,
    #[arg(long, value_name = "T", default_value_t = defaults::TEMPERATURE, help = format!(
        "Temperature: 0 is greedy (a repeatable answer), higher is more random ({})",
        ranges::TEMPERATURE.words
    ))]
    temperature: f64,
    #[arg(long, value_name = "K", default_value_t = defaults::TOP_K,
          help = "Sample among the K most likely tokens; 0 keeps all")]
    top_k: u32,
    #[arg(long, value_name = "P", default_value_t = defaults::TOP_P, help = format!(
        "Nucleus sampling: the most likely tokens whose probabilities reach P; 1 keeps all ({})",
        ranges::TOP_P.words
    ))]
    top_p: f64,
    #[arg(long, value_name = "P", default_value_t = defaults::MIN_P, help = format!(
        "Drop tokens less likely than P times the most likely one; 0 keeps all ({})",
        ranges::MIN_P.words
    ))]
    min_p: f64,
    #[arg(long, value_name = "R", default_value_t = defaults::REPEAT_PENALTY, help = format!(
        "Penalty on the last 64 tokens (prompt included); 1 is off ({})",
        ranges::REPEAT_PENALTY.words
    ))]
    repeat_penalty: f64,
    /// Seed of the sampler, 0 to 2^64-1, for a repeatable sampled text [default: drawn at
    /// random].
    #[arg(long, value_name = "SEED")]
    seed: Option<u64>,
    /// End the text before this string; may be repeated (at most 16).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    #[command(flatten)]
    constraint: ConstraintArgs,
    /// Kernel threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Tokens, prompt and generated, the conversation may hold, up to the model's maximum
    /// (default: the bundle's own).
    #[arg(long, value_name = "TOKENS")]
    context: Option<usize>,
    /// Check every file's sha256 against the manifest before loading.
    #[arg(long)]
    verify: bool,
    /// Print the generated token ids, space-separated on one line, instead of text.
    #[arg(long)]
    ids: bool,
    /// End with one JSON line of figures.
    #[arg(long)]
    stats: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(marengo::systemd::log_filter("warn"))
        .with_writer(std::io::stderr)
        .init();
    let load_start = Instant::now();
    let options = EngineOptions {
        threads: args.threads,
        verify_hashes: args.verify,
        context: args.context,
        ..EngineOptions::default()
    };
    let engine = Engine::load(&args.bundle, &options)
        .with_context(|| format!("loading {}", args.bundle.display()))?;
    let load_s = load_start.elapsed().as_secs_f64();

    let prompt = match (args.prompt, args.prompt_ids) {
        (_, Some(ids)) => Prompt::Ids(ids),
        (Some(text), None) if args.chat => Prompt::Chat(vec![Message::user(text)]),
        (Some(text), None) => Prompt::Text(text),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let given = args.constraint;
    let constraint = match (given.json_schema, given.regex, given.grammar) {
        (Some(schema), _, _) => Some(ConstraintSpec::JsonSchema(schema)),
        (_, Some(regex), _) => Some(ConstraintSpec::Regex(regex)),
        (_, _, Some(grammar)) => Some(ConstraintSpec::Grammar(grammar)),
        (None, None, None) => None,
    };
    let options = RequestOptions {
        max_tokens: Some(args.max_tokens),
        temperature: Some(args.temperature),
        top_k: Some(args.top_k),
        top_p: Some(args.top_p),
        min_p: Some(args.min_p),
        repeat_penalty: Some(args.repeat_penalty),
        seed: args.seed,
        stop: args.stop,
        constraint,
        model: None,
    };
    let request = engine
        .text()
        .prepare(prompt, options, defaults::MAX_TOKENS)
        .map_err(|e| match e {
            RequestError::NoChatTemplate => anyhow::anyhow!("--chat: {e}"),
            e => e.into(),
        })?;

    let mut conversation = engine.new_conversation()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let outcome = conversation.generate(&request, &|| None, &mut |piece| {
        if args.ids || write_error.is_some() {
            return;
        }
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
            write_error = Some(e);
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    if args.ids {
        let ids: Vec<String> = outcome.tokens.iter().map(u32::to_string).collect();
        writeln!(out, "{}", ids.join(" "))?;
    } else {
        writeln!(out)?;
    }
    if args.stats {
        let memory = MemoryUsage::current().unwrap_or_default();
        let mut stats = serde_json::json!({
            "prompt_tokens": outcome.prompt_tokens,
            "generated_tokens": outcome.generated_tokens,
            "finish_reason": outcome.reason.as_str(),
            "load_s": load_s,
            "prefill_tokens_per_s": outcome.prefill_tokens_per_s,
            "decode_tokens_per_s": outcome.decode_tokens_per_s,
            "anon_rss_bytes": memory.anonymous,
            "file_rss_bytes": memory.file,
        });
        if let Some(seconds) = outcome.constraint_s_per_token {
            stats["constraint_ms_per_token"] = (seconds * 1e3).into();
        }
        writeln!(out, "{stats}")?;
    }
    Ok(ExitCode::SUCCESS)
}
