//! `marengod serve`: load the bundle, own `org.marengo.Llm1` on a bus, serve until SIGTERM.
//!
//! The order of the start is what systemd's `Type=notify` promises to others: the default
//! model is mapped and the name is owned before `READY=1`, so a client started after the daemon
//! is ready never meets a missing name or a half-loaded model. A failure before that (bad
//! config, bad bundle, name already taken) ends the process with a message naming the cause.
//! No model installed is not a failure: the daemon serves, says `no-model` in its `State`, and
//! answers generation with `NoModel` and how to install one, so that a first-time user's client
//! reaches a daemon that can tell them what is missing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::signal::unix::{SignalKind, signal};
use zbus::Connection;
use zbus::connection::Builder;
use zbus::fdo::DBusProxy;

use crate::config::{BusChoice, Config, ConfigError, ConfigFile, default_config_path, defaults};
use crate::dbus::{BUS_NAME, Llm1, OBJECT_PATH, Streams};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::models::Models;
use crate::scheduler::{Scheduler, SchedulerOptions, StartError};
use crate::systemd;
use crate::text::TextSide;

/// How long a shutdown waits for the running generation to stop and the last `Finished`
/// signals to be sent; systemd is promised an exit within 2 s of SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// How long connecting to the bus and owning the name may take.
const BUS_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the status line is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// Options of `marengod serve`; each overrides the same key of the settings file.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Settings file [default: /etc/marengo/marengod.toml; with --session,
    /// $XDG_CONFIG_HOME/marengo/marengod.toml]. A missing default file means all defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A model bundle directory to serve as the default model (key `bundle`).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// The default model's name in the models directories (key `model`) [default: the first
    /// one found].
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// A directory of models (subdirectories NAME holding a bundle); may be repeated, earlier
    /// ones win (key `models_dirs`) [default: /var/lib/marengo/models, /usr/share/marengo/models;
    /// with --session $XDG_DATA_HOME/marengo/models first].
    #[arg(long = "models-dir", value_name = "DIR")]
    pub models_dirs: Vec<PathBuf>,
    /// Serve on the system bus (the default).
    #[arg(long, conflicts_with_all = ["session", "address"])]
    pub system: bool,
    /// Serve on the user's session bus.
    #[arg(long, conflicts_with = "address")]
    pub session: bool,
    /// Serve on the bus at this D-Bus address, e.g. unix:path=/run/marengo/bus.
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<String>,
    #[arg(long, value_name = "N", help = format!(
        "Generation threads; 0 uses every core (key `threads`, default {})",
        defaults::THREADS
    ))]
    pub threads: Option<usize>,
    #[arg(long, value_name = "N", help = format!(
        "Requests that may wait over all clients before Busy (key `queue_capacity`, default {})",
        defaults::QUEUE_CAPACITY
    ))]
    pub queue_capacity: Option<usize>,
    /// Deprecated name of --queue-capacity.
    #[arg(long, value_name = "N", hide = true, conflicts_with = "queue_capacity")]
    pub queue_length: Option<usize>,
    #[arg(long, value_name = "N", help = format!(
        "Requests one client may have waiting (key `max_queued_per_client`, default {})",
        defaults::MAX_QUEUED_PER_CLIENT
    ))]
    pub max_queued_per_client: Option<usize>,
    #[arg(long, value_name = "N", help = format!(
        "Requests generated together, each with its own KV cache slot (key `parallel`, \
         default {})",
        defaults::PARALLEL
    ))]
    pub parallel: Option<usize>,
    #[arg(long, value_name = "MIB", help = format!(
        "The most the parallel requests' KV caches may hold, in MiB; 0 is half of the \
         machine's memory (key `kv_memory_mib`, default {})",
        defaults::KV_MEMORY_MIB
    ))]
    pub kv_memory_mib: Option<u64>,
    #[arg(long, value_name = "N", help = format!(
        "max_tokens of a request that sets none (key `default_max_tokens`, default {})",
        defaults::DEFAULT_MAX_TOKENS
    ))]
    pub default_max_tokens: Option<u32>,
    /// Tokens, prompt and generated, a conversation may hold, up to each model's maximum
    /// (key `context`; default: each bundle's own, at most 4096 as exported by default).
    #[arg(long, value_name = "TOKENS")]
    pub context: Option<usize>,
    #[arg(long, value_name = "SECONDS", help = format!(
        "Unmap the model's weights after this many idle seconds; 0 never (key \
         `idle_unload_secs`, default {})",
        defaults::IDLE_UNLOAD_SECS
    ))]
    pub idle_unload_secs: Option<u64>,
    /// Check every bundle file's sha256 at load (slow for a 7B model; key `verify_hashes`).
    #[arg(long)]
    pub verify_hashes: bool,
    #[arg(long, value_name = "LEVEL", help = format!(
        "error, warn, info, debug or trace (key `log_level`, default {}); RUST_LOG overrides it",
        defaults::LOG_LEVEL
    ))]
    pub log_level: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot load the bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        // Boxed: the engine's errors carry the bundle's own, which would make every
        // `ServeError` large.
        source: Box<EngineError>,
    },
    #[error("cannot start serving: {0}")]
    Start(StartError),
    #[error("the model loading thread failed: {0}")]
    LoadThread(#[from] tokio::task::JoinError),
    #[error("cannot connect to the {bus}: {source}")]
    Connect { bus: String, source: zbus::Error },
    #[error("cannot own {BUS_NAME} on the {bus}: {source}")]
    Name { bus: String, source: zbus::Error },
    #[error(
        "the {bus} did not let {BUS_NAME} be owned within {seconds} s (does its policy let \
         this user own the name and receive the bus's signals?)"
    )]
    BusTimeout { bus: String, seconds: u64 },
    #[error("the {bus} closed the connection; the running requests were ended")]
    BusClosed { bus: String },
    #[error("D-Bus failure: {0}")]
    Bus(#[from] zbus::Error),
    #[error("cannot start the async runtime or a signal handler: {0}")]
    Runtime(#[from] std::io::Error),
}

impl ServeArgs {
    fn overrides(&self) -> ConfigFile {
        ConfigFile {
            bundle: self.bundle.clone(),
            model: self.model.clone(),
            models_dirs: (!self.models_dirs.is_empty()).then(|| self.models_dirs.clone()),
            bus: if self.system {
                Some("system".into())
            } else if self.session {
                Some("session".into())
            } else {
                None
            },
            address: self.address.clone(),
            threads: self.threads,
            queue_capacity: self.queue_capacity,
            queue_length: self.queue_length,
            max_queued_per_client: self.max_queued_per_client,
            parallel: self.parallel,
            kv_memory_mib: self.kv_memory_mib,
            default_max_tokens: self.default_max_tokens,
            context: self.context,
            idle_unload_secs: self.idle_unload_secs,
            verify_hashes: self.verify_hashes.then_some(true),
            log_level: self.log_level.clone(),
        }
    }
}

/// Reads the settings, sets up logging, and serves until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| default_config_path(args.session));
    let config =
        ConfigFile::read(&path, args.config.is_none())?.resolve(args.overrides(), &path)?;
    systemd::init_logging(&config.log_level);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("marengod-bus")
        .build()?
        .block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), ServeError> {
    // Before anything slow, so that a SIGTERM during the load is not the default (abrupt) end.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let bus = bus_name(&config.bus);
    // A signal during the start ends the process at once: nothing is served yet.
    let started = tokio::select! {
        started = start(&config, &bus) => started?,
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM before the service was ready: exiting");
            return Ok(());
        }
        _ = sigint.recv() => {
            tracing::info!("SIGINT before the service was ready: exiting");
            return Ok(());
        }
    };
    let Started {
        scheduler,
        streams,
        connection,
        mut departures,
    } = started;

    let serving = match scheduler.status().loaded_model {
        Some(model) => format!("serving {model} on the {bus}"),
        None => format!("serving no model on the {bus}"),
    };
    tracing::info!("{serving} as {BUS_NAME}");
    systemd::notify_ready(&serving);
    let status = tokio::spawn(report_status(Arc::clone(&scheduler)));
    let watchdog = systemd::watchdog_interval().map(|every| tokio::spawn(feed_watchdog(every)));

    // The departures stream ends only when the connection does: the bus went away (a
    // session that ended, a restarted system bus). Nobody can reach the service any more,
    // so it stops, with an error for systemd's Restart=on-failure.
    let mut bus_closed = false;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        _ = &mut departures => {
            tracing::error!("the {bus} closed the connection: shutting down");
            bus_closed = true;
        }
    }
    systemd::notify_stopping();
    status.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    let stopping = tokio::task::spawn_blocking(move || scheduler.shutdown());
    let ended = tokio::time::timeout(SHUTDOWN_GRACE, async {
        // A panicked worker was logged by the scheduler; the streams still end below.
        let _ = stopping.await;
        streams.all_ended().await;
    })
    .await;
    if ended.is_err() {
        tracing::warn!("streams still open after {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    departures.abort();
    if bus_closed {
        return Err(ServeError::BusClosed { bus });
    }
    // Queued signals are written before the connection closes.
    connection.graceful_shutdown().await;
    Ok(())
}

/// Everything that runs once the daemon is ready.
struct Started {
    scheduler: Arc<Scheduler>,
    streams: Arc<Streams>,
    connection: Connection,
    departures: tokio::task::JoinHandle<()>,
}

/// Loads the model, connects and owns the name. The bus part is bounded by [`BUS_TIMEOUT`]:
/// a bus that accepts the connection but never answers (or withholds `NameAcquired` under a
/// too strict policy) is a start failure with a message, not a daemon that hangs unready.
async fn start(config: &Config, bus: &str) -> Result<Started, ServeError> {
    systemd::notify_status("loading the model");
    let (scheduler, models) = start_scheduler(config).await?;

    let streams = Arc::new(Streams::default());
    let service = Llm1::new(
        Arc::clone(&scheduler),
        models,
        config.default_max_tokens,
        Arc::clone(&streams),
    );
    let on_bus = async {
        let builder = match &config.bus {
            BusChoice::System => Builder::system(),
            BusChoice::Session => Builder::session(),
            BusChoice::Address(address) => Builder::address(address.as_str()),
        };
        let connection = builder
            .serve_at(OBJECT_PATH, service)
            .build()
            .await
            .map_err(|source| ServeError::Connect {
                bus: bus.to_owned(),
                source,
            })?;
        // Watch departures before owning the name, so that no client can leave unnoticed.
        let departures = watch_departures(&connection, Arc::clone(&scheduler)).await?;
        connection
            .request_name(BUS_NAME)
            .await
            .map_err(|source| ServeError::Name {
                bus: bus.to_owned(),
                source,
            })?;
        Ok::<_, ServeError>((connection, departures))
    };
    let (connection, departures) =
        tokio::time::timeout(BUS_TIMEOUT, on_bus)
            .await
            .map_err(|_| ServeError::BusTimeout {
                bus: bus.to_owned(),
                seconds: BUS_TIMEOUT.as_secs(),
            })??;

    Ok(Started {
        scheduler,
        streams,
        connection,
        departures,
    })
}

/// Loads both sides of the default model and starts the scheduler with its weights side. The
/// text side of each model is kept once read; the weights side is loaded again after an idle
/// unload, or for a request for another model.
async fn start_scheduler(config: &Config) -> Result<(Arc<Scheduler>, Arc<Models>), ServeError> {
    let engine_options = EngineOptions {
        threads: config.threads,
        verify_hashes: config.verify_hashes,
        context: config.context,
        ..EngineOptions::default()
    };
    let options = SchedulerOptions {
        queue_capacity: config.queue_capacity,
        max_queued_per_client: config.max_queued_per_client,
        parallel: config.parallel,
        kv_budget: config.kv_budget,
        idle_unload: config.idle_unload_secs.map(Duration::from_secs),
    };
    let models = Arc::new(
        Models::new(
            config.models_dirs.clone(),
            config.bundle.clone(),
            config.model.clone(),
        )
        .with_context(config.context),
    );
    // A configured bundle must load; the models directories may hold none.
    let default = match &config.bundle {
        Some(dir) => Some(dir.clone()),
        None => {
            let found = Arc::clone(&models);
            match tokio::task::spawn_blocking(move || found.default_model()).await? {
                Ok(model) => Some(model.dir),
                Err(e) => {
                    tracing::warn!("{e}");
                    None
                }
            }
        }
    };
    let engine = match default {
        Some(dir) => {
            tracing::info!(bundle = %dir.display(), "loading the model");
            let (load_path, load_options) = (dir.clone(), engine_options.clone());
            let engine =
                tokio::task::spawn_blocking(move || Engine::load(&load_path, &load_options))
                    .await?
                    .map_err(|source| ServeError::Bundle {
                        path: dir,
                        source: Box::new(source),
                    })?;
            models.remember(engine.text());
            crate::batch::check_kv_budget(&engine, config.parallel, config.kv_budget).map_err(
                |source| ServeError::Bundle {
                    path: engine.text().dir().to_path_buf(),
                    source: Box::new(source),
                },
            )?;
            Some(engine)
        }
        None => None,
    };
    let loader = Box::new(move |text: &Arc<TextSide>| {
        Engine::load_weights(text.dir(), &engine_options, Arc::clone(text))
    });
    let scheduler = Scheduler::start(engine, loader, options).map_err(ServeError::Start)?;
    Ok((Arc::new(scheduler), models))
}

/// Cancels the requests of every client that leaves the bus (the task ends when the
/// connection does). The bus announces each
/// departure as `NameOwnerChanged(unique name, old owner, "")`.
async fn watch_departures(
    connection: &Connection,
    scheduler: Arc<Scheduler>,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let mut changes = DBusProxy::new(connection)
        .await?
        .receive_name_owner_changed()
        .await?;
    Ok(tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            let Ok(args) = change.args() else {
                continue;
            };
            let name = args.name().as_str();
            if name.starts_with(':') && args.new_owner().is_none() {
                scheduler.client_gone(name);
            }
        }
    }))
}

async fn report_status(scheduler: Arc<Scheduler>) {
    let mut last = String::new();
    let mut ticks = tokio::time::interval(STATUS_INTERVAL);
    loop {
        ticks.tick().await;
        let status = scheduler.status();
        let mut line = match status.running {
            0 => format!("{} waiting, idle", status.waiting),
            running => format!("{} waiting, {running} generating", status.waiting),
        };
        if let Some(speed) = status.last_decode_tokens_per_s {
            line.push_str(&format!(", last decode {speed:.1} tokens/s"));
        }
        match &status.loaded_model {
            Some(model) => line.push_str(&format!(", {model} loaded")),
            None => line.push_str(", no model loaded"),
        }
        if line != last {
            systemd::notify_status(&line);
            last = line;
        }
    }
}

async fn feed_watchdog(every: Duration) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        systemd::notify_watchdog();
    }
}

fn bus_name(bus: &BusChoice) -> String {
    match bus {
        BusChoice::System => "system bus".into(),
        BusChoice::Session => "session bus".into(),
        BusChoice::Address(address) => format!("bus at {address}"),
    }
}
