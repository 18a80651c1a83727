//! The daemon's settings: `/etc/marengo/marengod.toml`, then command-line overrides.
//!
//! Every key is optional in the file so that a packaged default can stay fully commented out;
//! unknown keys are refused, because a misspelt key silently ignored is a setting the operator
//! believes in and does not have.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The defaults of the settings: the one table that the settings file, `marengod serve
/// --help` and the code use. `packaging/marengod.toml` shows them as its commented values; a
/// test checks that it states exactly these.
pub mod defaults {
    /// Key `bus`.
    pub const BUS: &str = "system";
    /// Key `threads`; 0 is one per core.
    pub const THREADS: usize = 0;
    /// Key `queue_capacity`.
    pub const QUEUE_CAPACITY: usize = 16;
    /// Key `max_queued_per_client`.
    pub const MAX_QUEUED_PER_CLIENT: usize = 8;
    /// Key `parallel`: requests generated together, each with its own KV cache slot.
    pub const PARALLEL: usize = 4;
    /// Key `kv_memory_mib`; 0 is half of the machine's memory.
    pub const KV_MEMORY_MIB: u64 = 0;
    /// Key `default_max_tokens`: the `max_tokens` of every entry point.
    pub const DEFAULT_MAX_TOKENS: u32 = marengo_client::defaults::MAX_TOKENS;
    /// Key `idle_unload_secs`; 0 never unloads.
    pub const IDLE_UNLOAD_SECS: u64 = 0;
    /// Key `verify_hashes`.
    pub const VERIFY_HASHES: bool = false;
    /// Key `log_level`.
    pub const LOG_LEVEL: &str = "info";

    /// Every key that has a default, with its value as the settings file writes it.
    pub fn table() -> Vec<(&'static str, toml::Value)> {
        vec![
            ("bus", BUS.into()),
            ("threads", count(THREADS)),
            ("queue_capacity", count(QUEUE_CAPACITY)),
            ("max_queued_per_client", count(MAX_QUEUED_PER_CLIENT)),
            ("parallel", count(PARALLEL)),
            ("kv_memory_mib", count(KV_MEMORY_MIB as usize)),
            ("default_max_tokens", DEFAULT_MAX_TOKENS.into()),
            ("idle_unload_secs", count(IDLE_UNLOAD_SECS as usize)),
            ("verify_hashes", VERIFY_HASHES.into()),
            ("log_level", LOG_LEVEL.into()),
        ]
    }

    fn count(n: usize) -> toml::Value {
        toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// Where the system service looks for its settings when `--config` is not given.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/marengo/marengod.toml";

/// The settings file used without `--config`: the user's own
/// (`$XDG_CONFIG_HOME/marengo/marengod.toml`) for a session-bus daemon, the system one
/// otherwise.
pub fn default_config_path(session: bool) -> PathBuf {
    if session {
        let config_home = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")));
        if let Some(config_home) = config_home {
            return config_home.join("marengo").join("marengod.toml");
        }
    }
    PathBuf::from(SYSTEM_CONFIG_PATH)
}

/// Which message bus the daemon serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusChoice {
    System,
    Session,
    /// A D-Bus address such as `unix:path=/run/marengo/bus` (tests, containers).
    Address(String),
}

/// The settings as written in the TOML file. Field names are the file's keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// A bundle directory to serve as the default model, wherever it is.
    pub bundle: Option<PathBuf>,
    /// The default model's name, among those in the models directories.
    pub model: Option<String>,
    /// Where models are found, in order; see [`crate::models::default_dirs`].
    pub models_dirs: Option<Vec<PathBuf>>,
    /// `"system"` or `"session"`.
    pub bus: Option<String>,
    /// A D-Bus address; takes precedence over `bus`.
    pub address: Option<String>,
    pub threads: Option<usize>,
    /// Requests that may wait, over all clients.
    pub queue_capacity: Option<usize>,
    /// The former name of `queue_capacity`, still read from installed files (with a warning):
    /// it read like the number waiting, which the D-Bus property `QueueLength` reports.
    pub queue_length: Option<usize>,
    pub max_queued_per_client: Option<usize>,
    /// Requests generated together, each with its own KV cache slot.
    pub parallel: Option<usize>,
    /// The most the KV caches of `parallel` requests may hold, in MiB; 0 is half of memory.
    pub kv_memory_mib: Option<u64>,
    pub default_max_tokens: Option<u32>,
    /// Tokens (prompt and generated) a conversation may hold, up to each model's maximum;
    /// unset, each model's bundle says (`context_length`, at most 4096 as exported by
    /// default), so that the KV cache a start reserves does not jump with the maximum.
    pub context: Option<usize>,
    pub idle_unload_secs: Option<u64>,
    pub verify_hashes: Option<bool>,
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` overrides it.
    pub log_level: Option<String>,
}

/// The settings the daemon runs with, every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub bundle: Option<PathBuf>,
    pub model: Option<String>,
    pub models_dirs: Vec<PathBuf>,
    pub bus: BusChoice,
    /// Kernel threads; `None` uses every core.
    pub threads: Option<usize>,
    /// Requests waiting in the queue, over all clients, before `Busy` is answered.
    pub queue_capacity: usize,
    /// Requests one client may have waiting; keeps one client from filling the whole queue.
    pub max_queued_per_client: usize,
    /// Requests generated together (decoded in one pass), each with its own KV cache slot.
    pub parallel: usize,
    /// The most the `parallel` KV caches may come to hold, in bytes.
    pub kv_budget: u64,
    /// `max_tokens` of a request that does not set it.
    pub default_max_tokens: u32,
    /// The context every model runs with; `None` is each bundle's default.
    pub context: Option<usize>,
    /// Unmap the model after this much inactivity; `None` keeps it mapped.
    pub idle_unload_secs: Option<u64>,
    pub verify_hashes: bool,
    pub log_level: String,
    /// Deprecated settings that were used, to be logged once logging is set up.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: key `bus` must be \"system\" or \"session\", not {value:?}")]
    Bus { path: PathBuf, value: String },
    #[error("setting `{key}` must be at least 1")]
    Zero { key: &'static str },
    #[error("setting `log_level` must be error, warn, info, debug or trace, not {0:?}")]
    LogLevel(String),
}

impl ConfigFile {
    /// Reads `path`. A missing file is an empty configuration only when `optional` (the
    /// default path); a file the operator named explicitly must exist.
    pub fn read(path: &Path, optional: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Applies `overrides` (the command line) on top of the file and fills in defaults.
    /// `path` only names the file in error messages.
    pub fn resolve(self, overrides: ConfigFile, path: &Path) -> Result<Config, ConfigError> {
        let bus = match (overrides.address, overrides.bus, self.address, self.bus) {
            (Some(address), ..) => BusChoice::Address(address),
            (None, Some(bus), ..) => parse_bus(&bus, path)?,
            (None, None, Some(address), _) => BusChoice::Address(address),
            (None, None, None, Some(bus)) => parse_bus(&bus, path)?,
            (None, None, None, None) => parse_bus(defaults::BUS, path)?,
        };
        let mut warnings = Vec::new();
        let (queue_capacity_key, queue_capacity) = match (
            overrides.queue_capacity,
            overrides.queue_length,
            self.queue_capacity,
            self.queue_length,
        ) {
            (Some(n), ..) => ("queue_capacity", Some(n)),
            (None, Some(n), ..) => {
                warnings.push(
                    "--queue-length is deprecated: it sets the queue's capacity; use \
                     --queue-capacity"
                        .to_owned(),
                );
                ("queue_length", Some(n))
            }
            (None, None, Some(n), _) => ("queue_capacity", Some(n)),
            (None, None, None, Some(n)) => {
                warnings.push(format!(
                    "{}: key `queue_length` is deprecated: it sets the queue's capacity; \
                     rename it `queue_capacity`",
                    path.display()
                ));
                ("queue_length", Some(n))
            }
            (None, None, None, None) => ("queue_capacity", None),
        };
        let models_dirs = overrides
            .models_dirs
            .or(self.models_dirs)
            .unwrap_or_else(|| crate::models::default_dirs(bus == BusChoice::Session));
        let config = Config {
            bundle: overrides.bundle.or(self.bundle),
            model: overrides.model.or(self.model),
            models_dirs,
            bus,
            threads: Some(
                overrides
                    .threads
                    .or(self.threads)
                    .unwrap_or(defaults::THREADS),
            )
            .filter(|&t| t > 0),
            queue_capacity: queue_capacity.unwrap_or(defaults::QUEUE_CAPACITY),
            max_queued_per_client: overrides
                .max_queued_per_client
                .or(self.max_queued_per_client)
                .unwrap_or(defaults::MAX_QUEUED_PER_CLIENT),
            parallel: overrides
                .parallel
                .or(self.parallel)
                .unwrap_or(defaults::PARALLEL),
            kv_budget: match overrides
                .kv_memory_mib
                .or(self.kv_memory_mib)
                .unwrap_or(defaults::KV_MEMORY_MIB)
            {
                0 => crate::memory::physical_memory().map_or(u64::MAX, |bytes| bytes / 2),
                mib => mib.saturating_mul(1 << 20),
            },
            default_max_tokens: overrides
                .default_max_tokens
                .or(self.default_max_tokens)
                .unwrap_or(defaults::DEFAULT_MAX_TOKENS),
            context: overrides.context.or(self.context),
            idle_unload_secs: Some(
                overrides
                    .idle_unload_secs
                    .or(self.idle_unload_secs)
                    .unwrap_or(defaults::IDLE_UNLOAD_SECS),
            )
            .filter(|&s| s > 0),
            verify_hashes: overrides
                .verify_hashes
                .or(self.verify_hashes)
                .unwrap_or(defaults::VERIFY_HASHES),
            log_level: overrides
                .log_level
                .or(self.log_level)
                .unwrap_or_else(|| defaults::LOG_LEVEL.to_owned()),
            warnings,
        };
        if !["error", "warn", "info", "debug", "trace"].contains(&config.log_level.as_str()) {
            return Err(ConfigError::LogLevel(config.log_level));
        }
        for (key, value) in [
            (queue_capacity_key, config.queue_capacity),
            ("max_queued_per_client", config.max_queued_per_client),
            ("parallel", config.parallel),
            ("default_max_tokens", config.default_max_tokens as usize),
            ("context", config.context.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { key });
            }
        }
        Ok(config)
    }
}

fn parse_bus(value: &str, path: &Path) -> Result<BusChoice, ConfigError> {
    match value {
        "system" => Ok(BusChoice::System),
        "session" => Ok(BusChoice::Session),
        _ => Err(ConfigError::Bus {
            path: path.to_owned(),
            value: value.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn command_line_wins_over_file() {
        let file = parse("bundle = \"/srv/a\"\nbus = \"session\"\nqueue_length = 8\n").unwrap();
        let cli = ConfigFile {
            bundle: Some("/srv/b".into()),
            address: Some("unix:path=/tmp/bus".into()),
            ..Default::default()
        };
        let config = file.resolve(cli, Path::new("f.toml")).unwrap();
        assert_eq!(config.bundle, Some(PathBuf::from("/srv/b")));
        assert_eq!(config.bus, BusChoice::Address("unix:path=/tmp/bus".into()));
        assert_eq!(config.queue_capacity, 8);
        assert_eq!(config.idle_unload_secs, None);
    }

    /// `context` is each model's own unless set; the command line wins; 0 is refused.
    #[test]
    fn context_is_the_bundles_unless_set() {
        let resolve = |file: &str, cli: Option<usize>| {
            let cli = ConfigFile {
                context: cli,
                ..Default::default()
            };
            parse(file).unwrap().resolve(cli, Path::new("f.toml"))
        };
        assert_eq!(resolve("", None).unwrap().context, None);
        assert_eq!(
            resolve("context = 8192\n", None).unwrap().context,
            Some(8192)
        );
        assert_eq!(
            resolve("context = 8192\n", Some(2048)).unwrap().context,
            Some(2048)
        );
        let err = resolve("context = 0\n", None).unwrap_err();
        assert!(err.to_string().contains("`context`"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = parse("bundel = \"/srv/a\"\n").unwrap_err();
        assert!(err.to_string().contains("bundel"), "{err}");
    }

    #[test]
    fn bad_bus_is_refused_and_no_bundle_means_the_models_directories() {
        let err = parse("bus = \"sytem\"\nbundle = \"/a\"\n")
            .unwrap()
            .resolve(ConfigFile::default(), Path::new("f.toml"))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Bus { .. }), "{err}");
        let config = ConfigFile::default()
            .resolve(ConfigFile::default(), Path::new("f.toml"))
            .unwrap();
        assert_eq!(config.bundle, None);
        assert_eq!(
            config.models_dirs,
            crate::models::SYSTEM_MODELS_DIRS.map(PathBuf::from)
        );
    }

    #[test]
    fn zero_capacity_is_refused() {
        let err = parse("bundle = \"/a\"\nqueue_length = 0\n")
            .unwrap()
            .resolve(ConfigFile::default(), Path::new("f.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("queue_length"), "{err}");
    }

    #[test]
    fn queue_length_is_read_as_the_capacity_with_a_warning() {
        let config = parse("bundle = \"/a\"\nqueue_length = 5\n")
            .unwrap()
            .resolve(ConfigFile::default(), Path::new("f.toml"))
            .unwrap();
        assert_eq!(config.queue_capacity, 5);
        assert!(
            config.warnings[0].contains("queue_capacity"),
            "{:?}",
            config.warnings
        );
        let config = parse("bundle = \"/a\"\nqueue_capacity = 6\n")
            .unwrap()
            .resolve(ConfigFile::default(), Path::new("f.toml"))
            .unwrap();
        assert_eq!(config.queue_capacity, 6);
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = parse("bundle = \"/a\"\n")
            .unwrap()
            .resolve(ConfigFile::default(), Path::new("f.toml"))
            .unwrap();
        assert_eq!(config.bus, BusChoice::System);
        assert_eq!(config.threads, None);
        assert_eq!(config.queue_capacity, defaults::QUEUE_CAPACITY);
        assert_eq!(
            config.max_queued_per_client,
            defaults::MAX_QUEUED_PER_CLIENT
        );
        assert_eq!(config.default_max_tokens, defaults::DEFAULT_MAX_TOKENS);
        assert_eq!(config.idle_unload_secs, None);
        assert_eq!(config.verify_hashes, defaults::VERIFY_HASHES);
        assert_eq!(config.log_level, defaults::LOG_LEVEL);
    }

    /// `packaging/marengod.toml` says its commented `#key = value` lines are the defaults.
    #[test]
    fn packaged_settings_file_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/marengod.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let table = defaults::table();
        let mut documented = Vec::new();
        for line in text.lines() {
            let Some(setting) = line.strip_prefix('#') else {
                continue;
            };
            if !setting.starts_with(|c: char| c.is_ascii_lowercase()) {
                continue;
            }
            let parsed: toml::Table = toml::from_str(setting)
                .unwrap_or_else(|e| panic!("{}: {line:?} is not a setting: {e}", path.display()));
            for (key, value) in parsed {
                let default = table
                    .iter()
                    .find(|(k, _)| *k == key)
                    .unwrap_or_else(|| panic!("{line:?}: `{key}` has no default in the table"));
                assert_eq!(&value, &default.1, "{line:?}: the default of `{key}`");
                documented.push(key);
            }
        }
        for (key, _) in &table {
            assert!(
                documented.iter().any(|k| k == key),
                "`{key}` is not in {}",
                path.display()
            );
        }
        // Every default names a key the file may set.
        let keys = table
            .iter()
            .map(|(key, value)| format!("{key} = {value}\n"))
            .collect::<String>();
        parse(&keys).unwrap();
    }

    #[test]
    fn missing_default_file_is_empty_but_named_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        assert!(ConfigFile::read(&path, true).unwrap().bundle.is_none());
        assert!(matches!(
            ConfigFile::read(&path, false),
            Err(ConfigError::Read { .. })
        ));
    }
}
