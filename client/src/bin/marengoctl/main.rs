//! `marengoctl`: the command-line client of marengod, the way `ollama run` is ollama's.

use std::collections::HashMap;
mod chat;
mod docs;

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use marengo_client::constraint_args::ConstraintArgs;
use marengo_client::{BUS_NAME, Llm1Error, Llm1Proxy, defaults};
use zbus::connection::Builder;
use zbus::message::Type as MessageType;
use zbus::{
    Connection, MatchRule, MessageStream, ObjectPath, OwnedObjectPath, OwnedVariant, Variant,
};

const EXIT_CODES: &str = "\
Exit codes:
  0    success (the text may still have ended early: see --stats)
  1    any other failure
  2    bad command line
  3    the service cannot be reached (no daemon, no bus, or the bus policy refuses you)
  4    an option or argument was refused (org.marengo.Llm1.Error.InvalidOption/InvalidArgument)
  5    the prompt does not fit the model's context (ContextOverflow)
  6    the service is busy; retry later (Busy)
  7    the generation failed in the service (Internal, or Finished with reason \"error\")
  8    the service has no model installed (NoModel)
  130  interrupted with Ctrl-C";

/// Shown by --help and in the man page, after the exit codes.
const FILES: &str = "\
Files:
  $XDG_STATE_HOME/marengo/chat_history
       the chat's history (~/.local/state/marengo/chat_history without XDG_STATE_HOME)
  /usr/share/dbus-1/interfaces/org.marengo.Llm1.xml
       the D-Bus interface marengoctl calls

See also: marengod(8), marengo-export(1)";

#[derive(Parser)]
#[command(
    name = "marengoctl",
    version,
    about = "Talk to marengod over D-Bus",
    after_help = EXIT_CODES,
    after_long_help = format!("{EXIT_CODES}\n\n{FILES}")
)]
struct Cli {
    #[command(flatten)]
    bus: BusArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct BusArgs {
    /// The system bus, where the packaged service runs (the default).
    #[arg(long, global = true, conflicts_with_all = ["session", "address"])]
    system: bool,
    /// The user's session bus.
    #[arg(long, global = true, conflicts_with = "address")]
    session: bool,
    /// The bus at this D-Bus address, e.g. unix:path=/run/marengo/bus.
    #[arg(long, global = true, value_name = "ADDRESS")]
    address: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Continue PROMPT and stream the text to stdout.
    Generate {
        /// The prompt, or "-" to read it from stdin.
        prompt: String,
        #[command(flatten)]
        options: GenerationArgs,
    },
    /// Chat with the model.
    ///
    /// On a terminal: type a message, Enter sends it (a final \ or a
    /// """ block goes on on the next line), Up and Down recall earlier messages (kept in
    /// $XDG_STATE_HOME/marengo/chat_history), Ctrl-C stops the answer, Ctrl-D or /bye ends;
    /// /help lists the commands (/set, /system, /clear). Otherwise each stdin line is one
    /// user turn (with the same continuations and commands) and each answer is printed
    /// followed by an empty line. When the conversation outgrows the model's context, its
    /// oldest exchanges are dropped, the system message kept.
    Chat {
        /// A system message to start the conversation with.
        #[arg(long, value_name = "TEXT")]
        system_prompt: Option<String>,
        #[command(flatten)]
        options: GenerationArgs,
    },
    /// Continue PROMPT and print the text once it is whole (the Complete call).
    Complete {
        /// The prompt, or "-" to read it from stdin.
        prompt: String,
        #[command(flatten)]
        options: GenerationArgs,
    },
    /// Show the model and the service's state.
    Status {
        /// As one JSON object, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the installed models: the default first, and which one is loaded.
    #[command(alias = "list", alias = "ps")]
    Models,
    /// Print the token ids of TEXT ("-" for stdin), as Generate feeds them to the model.
    Tokenize { text: String },
    /// Print the text of token IDS ("-" to read them from stdin); special tokens are left out.
    Detokenize {
        #[arg(required = true, num_args = 1.., value_name = "IDS")]
        ids: Vec<String>,
    },
    /// Print SHELL's completion script, e.g. `marengoctl completions bash > marengoctl`.
    Completions {
        #[arg(value_enum)]
        shell: docs::Shell,
    },
    /// Write the man pages (marengoctl.1, marengoctl-chat.1, …) into DIR, as the package
    /// installs them.
    #[command(hide = true)]
    ManPages { dir: std::path::PathBuf },
}

/// Options left out are not sent: the service applies its defaults, the same as
/// `marengod generate`'s ([`defaults`]), which the help states.
#[derive(Args, Clone, Default)]
struct GenerationArgs {
    /// The model, by name (`marengoctl models` lists them) [default: the service's default].
    #[arg(long, short = 'm', value_name = "NAME")]
    model: Option<String>,
    #[arg(long, short = 'n', value_name = "N", help = format!(
        "Most tokens to generate [default: the service's default_max_tokens, {}]",
        defaults::MAX_TOKENS
    ))]
    max_tokens: Option<u32>,
    #[arg(long, short = 't', value_name = "T", help = format!(
        "0 is greedy; higher is more random (0 to 10) [default: {}]",
        defaults::TEMPERATURE
    ))]
    temperature: Option<f64>,
    #[arg(long, value_name = "K", help = format!(
        "Sample among the K most likely tokens; 0 is off [default: {}]",
        defaults::TOP_K
    ))]
    top_k: Option<u32>,
    #[arg(long, value_name = "P", help = format!(
        "Nucleus sampling mass, above 0 and up to 1 [default: {}]",
        defaults::TOP_P
    ))]
    top_p: Option<f64>,
    #[arg(long, value_name = "P", help = format!(
        "Drop tokens less likely than P times the most likely one (0 to 1) [default: {}]",
        defaults::MIN_P
    ))]
    min_p: Option<f64>,
    #[arg(long, value_name = "R", help = format!(
        "Penalty on recently generated tokens, above 0 and up to 10; 1 is off [default: {}]",
        defaults::REPEAT_PENALTY
    ))]
    repeat_penalty: Option<f64>,
    /// Seed, for a repeatable sampled text [default: drawn at random].
    #[arg(long, value_name = "SEED")]
    seed: Option<u64>,
    /// Stop before this text; may be repeated.
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    #[command(flatten)]
    constraint: ConstraintArgs,
    /// Print the request's figures to stderr when it ends.
    #[arg(long)]
    stats: bool,
}

impl GenerationArgs {
    fn options(&self) -> HashMap<&'static str, Variant<'_>> {
        let mut options = HashMap::new();
        if let Some(model) = &self.model {
            options.insert("model", Variant::from(model.as_str()));
        }
        if let Some(n) = self.max_tokens {
            options.insert("max_tokens", Variant::U32(n));
        }
        for (key, value) in [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
        ] {
            if let Some(x) = value {
                options.insert(key, Variant::F64(x));
            }
        }
        if let Some(k) = self.top_k {
            options.insert("top_k", Variant::U32(k));
        }
        if let Some(seed) = self.seed {
            options.insert("seed", Variant::U64(seed));
        }
        if !self.stop.is_empty() {
            options.insert("stop", Variant::from(self.stop.clone()));
        }
        if let Some((key, text)) = self.constraint.option() {
            options.insert(key, Variant::from(text));
        }
        options
    }
}

/// A failure with the exit code scripts see.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("cannot reach {BUS_NAME}: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    ContextOverflow(String),
    #[error("{0}")]
    Busy(String),
    #[error("the generation failed: {0}")]
    Generation(String),
    #[error("{0}")]
    NoModel(String),
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CtlError {
    fn exit_code(&self) -> u8 {
        match self {
            CtlError::Other(_) => 1,
            CtlError::Unreachable(_) => 3,
            CtlError::Refused(_) => 4,
            CtlError::ContextOverflow(_) => 5,
            CtlError::Busy(_) => 6,
            CtlError::Generation(_) => 7,
            CtlError::NoModel(_) => 8,
            CtlError::Interrupted => 130,
        }
    }
}

impl From<Llm1Error> for CtlError {
    fn from(e: Llm1Error) -> Self {
        match e {
            Llm1Error::InvalidOption(m) | Llm1Error::InvalidArgument(m) => CtlError::Refused(m),
            Llm1Error::ContextOverflow(m) => CtlError::ContextOverflow(m),
            Llm1Error::Busy(m) => CtlError::Busy(m),
            Llm1Error::Internal(m) => CtlError::Generation(m),
            Llm1Error::NoModel(m) => CtlError::NoModel(m),
            Llm1Error::NotFound(m) | Llm1Error::AccessDenied(m) => {
                CtlError::Other(anyhow::anyhow!(m))
            }
            Llm1Error::ZBus(e) => e.into(),
        }
    }
}

impl From<zbus::Error> for CtlError {
    fn from(e: zbus::Error) -> Self {
        let unreachable = match &e {
            zbus::Error::MethodError(name, ..) => is_unreachable(name.as_str()),
            zbus::Error::FDO(fdo) => is_unreachable(zbus::DBusError::name(fdo.as_ref()).as_str()),
            zbus::Error::Connection(..) | zbus::Error::InputOutput(_) => true,
            _ => false,
        };
        if unreachable {
            CtlError::Unreachable(e.to_string())
        } else {
            CtlError::Other(e.into())
        }
    }
}

fn is_unreachable(error_name: &str) -> bool {
    [
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.Spawn.Failed",
        "org.freedesktop.DBus.Error.Spawn.ChildExited",
    ]
    .contains(&error_name)
}

/// What to check after a failure a user can fix outside marengoctl, for the bus asked for.
fn hint(error: &CtlError, bus: &BusArgs) -> Option<String> {
    let system = bus.address.is_none() && !bus.session;
    match error {
        CtlError::Unreachable(_) if system => Some(
            "is marengod running? `systemctl status marengod` and `journalctl -u marengod` \
             say why not. Only root and the group `marengo` may call it: `sudo adduser $USER \
             marengo`, then log in again. Or run your own with --session."
                .into(),
        ),
        CtlError::Unreachable(_) if bus.session => Some(
            "is a session daemon running? `systemctl --user status marengod` and \
             `journalctl --user -u marengod` say why not."
                .into(),
        ),
        CtlError::NoModel(_) => Some(
            "a model is a bundle directory NAME under /var/lib/marengo/models or \
             /usr/share/marengo/models (and, for a --session daemon, \
             ~/.local/share/marengo/models); it must be readable by the daemon's user. \
             `marengoctl models` lists what the daemon finds."
                .into(),
        ),
        _ => None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bus = cli.bus.clone();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("marengoctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, CtlError::Interrupted) {
                eprintln!("marengoctl: {e}");
            }
            if let Some(hint) = hint(&e, &bus) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), CtlError> {
    match cli.command {
        Command::Completions { shell } => return Ok(docs::completions(shell)?),
        Command::ManPages { dir } => return Ok(docs::man_pages(&dir)?),
        _ => {}
    }
    let connection = connect(&cli.bus).await?;
    let proxy = Llm1Proxy::new(&connection).await?;
    match cli.command {
        Command::Generate { prompt, options } => {
            let prompt = if prompt == "-" { read_stdin()? } else { prompt };
            generate(&connection, &proxy, &prompt, &options).await
        }
        Command::Chat {
            system_prompt,
            options,
        } => {
            let interactive = std::io::stdin().is_terminal();
            chat::chat(&connection, &proxy, system_prompt, &options, interactive).await
        }
        Command::Complete { prompt, options } => {
            let prompt = if prompt == "-" { read_stdin()? } else { prompt };
            complete(&proxy, &prompt, &options).await
        }
        Command::Status { json } => status(&connection, &proxy, json).await,
        Command::Models => models(&proxy).await,
        Command::Tokenize { text } => {
            let text = if text == "-" { read_stdin()? } else { text };
            let ids = proxy.tokenize(&text).await?;
            let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
            println!("{}", ids.join(" "));
            Ok(())
        }
        Command::Detokenize { ids } => {
            let ids = if ids == ["-"] {
                read_stdin()?
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            } else {
                ids
            };
            let ids = ids
                .iter()
                .map(|id| {
                    id.parse::<u32>()
                        .map_err(|_| CtlError::Refused(format!("{id:?} is not a token id")))
                })
                .collect::<Result<Vec<u32>, CtlError>>()?;
            println!("{}", proxy.detokenize(&ids).await?);
            Ok(())
        }
        // Answered above, without a connection.
        Command::Completions { .. } | Command::ManPages { .. } => Ok(()),
    }
}

async fn connect(bus: &BusArgs) -> Result<Connection, CtlError> {
    let builder = match (&bus.address, bus.session) {
        (Some(address), _) => Builder::address(address.as_str()),
        (None, true) => Builder::session(),
        (None, false) => Builder::system(),
    };
    builder
        .build()
        .await
        .map_err(|e| CtlError::Unreachable(e.to_string()))
}

fn read_stdin() -> Result<String, CtlError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read the prompt from stdin")?;
    Ok(text)
}

/// How a streamed request ended, as its `Finished` signal said.
struct Ending {
    reason: String,
    stats: HashMap<String, OwnedVariant>,
}

/// The `Token` and `Finished` signals sent to this connection, in the order they were sent:
/// one subscription for both, since two streams would lose their relative order.
async fn subscribe(connection: &Connection) -> Result<MessageStream, CtlError> {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(BUS_NAME)
        .interface(BUS_NAME)
        .build()?;
    Ok(MessageStream::for_match_rule(rule, connection, None).await?)
}

/// Streams request `path`'s text to `out` until it finishes. Ctrl-C cancels it; the function
/// then still waits for its `Finished`, so that the service and the client agree it ended.
async fn follow(
    proxy: &Llm1Proxy<'_>,
    signals: &mut MessageStream,
    path: &OwnedObjectPath,
    out: &mut dyn FnMut(&str),
) -> Result<(Ending, bool), CtlError> {
    let mut interrupted = false;
    loop {
        let message = tokio::select! {
            message = signals.next() => message,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                proxy.cancel(path).await?;
                continue;
            }
        };
        let Some(message) = message else {
            return Err(CtlError::Unreachable(
                "the connection to the bus closed".into(),
            ));
        };
        let message = message?;
        let header = message.header();
        let body = message.body();
        match header.member().map(|m| m.as_str()) {
            Some("Token") => {
                let (request, text): (ObjectPath<'_>, String) = body.deserialize()?;
                if request.as_str() == path.as_str() {
                    out(&text);
                }
            }
            Some("Finished") => {
                let (request, reason, stats): (
                    ObjectPath<'_>,
                    String,
                    HashMap<String, OwnedVariant>,
                ) = body.deserialize()?;
                if request.as_str() == path.as_str() {
                    return Ok((Ending { reason, stats }, interrupted));
                }
            }
            _ => {}
        }
    }
}

async fn generate(
    connection: &Connection,
    proxy: &Llm1Proxy<'_>,
    prompt: &str,
    args: &GenerationArgs,
) -> Result<(), CtlError> {
    let mut signals = subscribe(connection).await?;
    let path = proxy.generate(prompt, args.options()).await?;
    let mut stdout = std::io::stdout();
    let mut write = |text: &str| {
        // A closed stdout (e.g. `| head`) ends the program through the next write's error.
        let _ = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush());
    };
    let (ending, interrupted) = follow(proxy, &mut signals, &path, &mut write).await?;
    println!();
    finish(&ending, args.stats, interrupted)
}

/// Reports the end of a request: its stats on request, and a failure as an error.
fn finish(ending: &Ending, stats: bool, interrupted: bool) -> Result<(), CtlError> {
    if stats {
        eprintln!("{}", format_stats(ending));
    }
    if ending.reason == "error" {
        let message = ending
            .stats
            .get("error")
            .and_then(|v| String::try_from(v.clone()).ok())
            .unwrap_or_else(|| "no details".into());
        return Err(CtlError::Generation(message));
    }
    if interrupted {
        return Err(CtlError::Interrupted);
    }
    Ok(())
}

fn format_stats(ending: &Ending) -> String {
    let mut keys: Vec<&String> = ending.stats.keys().collect();
    keys.sort();
    let mut line = format!("reason={}", ending.reason);
    for key in keys {
        if key == "reason" {
            continue;
        }
        line.push_str(&format!(" {key}={}", show(&ending.stats[key])));
    }
    line
}

/// A value as a shell user would type it: numbers bare, strings quoted.
fn show(value: &Variant<'_>) -> String {
    match value {
        Variant::F64(x) => format!("{x:.2}"),
        Variant::U32(n) => n.to_string(),
        Variant::U64(n) => n.to_string(),
        Variant::I64(n) => n.to_string(),
        Variant::Str(s) => format!("{:?}", s.as_str()),
        other => other.to_string(),
    }
}

async fn complete(
    proxy: &Llm1Proxy<'_>,
    prompt: &str,
    args: &GenerationArgs,
) -> Result<(), CtlError> {
    let (text, stats) = proxy.complete(prompt, args.options()).await?;
    println!("{text}");
    if args.stats {
        let reason = stats
            .get("reason")
            .and_then(|v| String::try_from(v.clone()).ok())
            .unwrap_or_default();
        eprintln!("{}", format_stats(&Ending { reason, stats }));
    }
    Ok(())
}

async fn status(
    connection: &Connection,
    proxy: &Llm1Proxy<'_>,
    json: bool,
) -> Result<(), CtlError> {
    let owner = connection
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "GetNameOwner",
            &BUS_NAME,
        )
        .await?;
    let owner: String = owner.body().deserialize()?;
    let (version, model, quantization) = (
        proxy.version().await?,
        proxy.model().await?,
        proxy.quantization().await?,
    );
    let (context_length, queue_length) =
        (proxy.context_length().await?, proxy.queue_length().await?);
    let (state, loaded) = (proxy.state().await?, proxy.loaded_model().await?);
    let capabilities = proxy.capabilities().await?;
    // Absent from a daemon older than the limit: not shown rather than an error.
    let limits: Option<HashMap<String, OwnedVariant>> = capabilities
        .get("limits")
        .and_then(|limits| HashMap::try_from(limits.try_clone().ok()?).ok());
    let limit = |name: &str| -> Option<u32> {
        u32::try_from(limits.as_ref()?.get(name)?.try_clone().ok()?).ok()
    };
    let (parallel, kv_memory_mib) = (limit("parallel"), limit("kv_memory_mib"));
    if json {
        let status = serde_json::json!({
            "service": BUS_NAME,
            "owner": owner,
            "version": version,
            "model": model,
            "quantization": quantization,
            "context_length": context_length,
            "queue_length": queue_length,
            "state": state,
            "loaded_model": loaded,
            "parallel": parallel,
            "kv_memory_mib": kv_memory_mib,
        });
        println!("{status}");
        return Ok(());
    }
    println!("service:        {BUS_NAME} ({owner})");
    println!("version:        {version}");
    println!("model:          {model}");
    println!("quantization:   {quantization}");
    println!("context length: {context_length}");
    println!("queue length:   {queue_length}");
    println!("state:          {state}");
    if let (Some(parallel), Some(kv)) = (parallel, kv_memory_mib) {
        println!("parallel:       {parallel} requests, KV budget {kv} MiB");
    }
    if !loaded.is_empty() {
        println!("loaded model:   {loaded}");
    }
    Ok(())
}

/// The models as `ollama list` and `ollama ps` show them together: one line each, the default
/// first, the resident one marked.
async fn models(proxy: &Llm1Proxy<'_>) -> Result<(), CtlError> {
    let models = proxy.models().await?;
    if models.is_empty() {
        return Err(CtlError::NoModel(
            "the service has no model installed".into(),
        ));
    }
    let default = proxy.model().await?;
    let loaded = proxy.loaded_model().await?;
    let width = models.iter().map(|m| m.0.len()).max().unwrap_or(0).max(4);
    println!(
        "{:width$}  {:14}  {:>7}  {:>9}  STATE",
        "NAME", "QUANTIZATION", "CONTEXT", "SIZE"
    );
    for (name, quantization, context, size) in &models {
        let mut state = Vec::new();
        if *name == default {
            state.push("default");
        }
        if *name == loaded {
            state.push("loaded");
        }
        println!(
            "{name:width$}  {quantization:14}  {context:>7}  {:>9}  {}",
            human_size(*size),
            state.join(", ")
        );
    }
    Ok(())
}

/// Bytes in decimal units, as `ollama list` and `df -H` show sizes.
fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}
