//! The models a daemon can serve: the bundles in its models directories, by name, and the
//! text side of each one that has been asked for.
//!
//! A model is a subdirectory `NAME` of a models directory that holds a bundle
//! (`NAME/bundle.json`, `NAME/model.onnx`, …). The directories are read again at every lookup,
//! so a bundle installed while the daemon runs (`marengo-export convert --install NAME`, or a
//! copy) is served without a restart. Hidden entries are skipped: an export under way or
//! interrupted is a hidden staging directory (`.NAME.partial-XXXX`) until its final rename, so
//! a half-written model is never listed. On a name two directories hold, the earlier directory
//! wins, which lets an operator's `/var/lib/marengo/models/NAME` shadow a packaged one.
//!
//! The default model — the one a request without the `model` option gets — is the configured
//! `bundle` when there is one, else the configured `model` name, else the first model listed.
//! When there is none the daemon still runs and says so (`State` is `no-model`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use marengo_bundle::manifest::{MANIFEST_FILE, Manifest, QuantKind};
use marengo_bundle::{Bundle, BundleError};

use crate::text::{TextError, TextSide};

/// Where the system daemon finds models, in order: the operator's, then the packaged ones
/// (`marengo-model-*` packages install under `/usr/share/marengo/models`).
pub const SYSTEM_MODELS_DIRS: [&str; 2] = ["/var/lib/marengo/models", "/usr/share/marengo/models"];

/// How to put a model in place, for the messages of a daemon that has none.
pub const INSTALL_HINT: &str = "install one: `apt install marengo-model-smollm2`, or \
    `marengo-export convert … --install NAME`, or copy a bundle directory into a models \
    directory";

/// The models directories of a daemon: for a session daemon the user's own
/// (`$XDG_DATA_HOME/marengo/models`, by default `~/.local/share/marengo/models`) before the
/// system ones, so that a session daemon activated by any client finds the packaged model
/// without a settings file of the user's.
pub fn default_dirs(session: bool) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if session && let Some(data) = user_data_dir() {
        dirs.push(data.join("marengo").join("models"));
    }
    dirs.extend(SYSTEM_MODELS_DIRS.iter().map(PathBuf::from));
    dirs
}

/// `$XDG_DATA_HOME`, or `~/.local/share` when it is unset or not absolute.
pub fn user_data_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
}

/// A model found on disk, described from its manifest alone (nothing mapped).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub dir: PathBuf,
    pub quantization: String,
    /// The context a run gives it: the one chosen (`context`), or the bundle's default.
    pub context_length: usize,
    /// The bundle's files as its manifest lists them, the manifest included.
    pub size_bytes: u64,
    manifest: Manifest,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error(
        "no model is installed (looked in {dirs}); {INSTALL_HINT}",
        dirs = .0.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoModel(Vec<PathBuf>),
    #[error("the default model `{0}` (setting `model`) is not installed; {INSTALL_HINT}")]
    DefaultMissing(String),
    #[error("no model named `{name}` (installed: {installed})")]
    Unknown { name: String, installed: String },
    #[error("cannot load the model {}: {source}", .dir.display())]
    Bundle { dir: PathBuf, source: BundleError },
    #[error("cannot load the model {}: {source}", .dir.display())]
    Text { dir: PathBuf, source: TextError },
}

/// The models directories and the configured default, with the text sides loaded so far.
#[derive(Debug)]
pub struct Models {
    dirs: Vec<PathBuf>,
    /// The configured `bundle`: the default, listed first, wherever it is.
    bundle: Option<PathBuf>,
    /// The configured `model`: the default's name when no `bundle` is set.
    default_name: Option<String>,
    /// The configured `context`; `None` runs each model with its bundle's default.
    context: Option<usize>,
    /// Text sides by bundle directory. A side whose bundle changed on disk is read again, so
    /// a reinstalled model is served as it now is.
    texts: Mutex<HashMap<PathBuf, Arc<TextSide>>>,
}

impl Models {
    pub fn new(dirs: Vec<PathBuf>, bundle: Option<PathBuf>, default_name: Option<String>) -> Self {
        Models {
            dirs,
            bundle,
            default_name,
            context: None,
            texts: Mutex::new(HashMap::new()),
        }
    }

    /// Runs every model with `context` (up to each one's maximum) instead of its default.
    pub fn with_context(self, context: Option<usize>) -> Self {
        Models { context, ..self }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Every model, the default first, then by directory and name.
    pub fn list(&self) -> Vec<ModelInfo> {
        let mut models: Vec<ModelInfo> = self
            .bundle
            .iter()
            .filter_map(|d| describe(d, self.context))
            .collect();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut found: Vec<ModelInfo> = entries
                .filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter_map(|e| describe(&e.path(), self.context))
                .filter(|m| !models.iter().any(|known| known.name == m.name))
                .collect();
            found.sort_by(|a, b| a.name.cmp(&b.name));
            models.extend(found);
        }
        if let Some(name) = self.default_name.as_deref()
            && self.bundle.is_none()
            && let Some(at) = models.iter().position(|m| m.name == name)
        {
            let default = models.remove(at);
            models.insert(0, default);
        }
        models
    }

    /// The model a request without `model` gets.
    pub fn default_model(&self) -> Result<ModelInfo, ModelsError> {
        let models = self.list();
        if let Some(bundle) = &self.bundle {
            return describe(bundle, self.context)
                .ok_or_else(|| ModelsError::NoModel(vec![bundle.clone()]));
        }
        if let Some(name) = &self.default_name {
            return models
                .into_iter()
                .find(|m| &m.name == name)
                .ok_or_else(|| ModelsError::DefaultMissing(name.clone()));
        }
        models
            .into_iter()
            .next()
            .ok_or_else(|| ModelsError::NoModel(self.dirs.clone()))
    }

    /// The model named `name`, or the default when `None`.
    pub fn find(&self, name: Option<&str>) -> Result<ModelInfo, ModelsError> {
        let Some(name) = name else {
            return self.default_model();
        };
        let models = self.list();
        let installed = models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        models
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .ok_or_else(|| ModelsError::Unknown {
                name: name.to_owned(),
                installed: if installed.is_empty() {
                    "none".into()
                } else {
                    installed
                },
            })
    }

    /// The text side of `model`, loaded at its first use and kept. Blocking: it reads the
    /// tokenizer.
    pub fn text(&self, model: &ModelInfo) -> Result<Arc<TextSide>, ModelsError> {
        let mut texts = self.texts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(text) = texts.get(&model.dir)
            && text.manifest() == &model.manifest
        {
            return Ok(Arc::clone(text));
        }
        let bundle = Bundle::open(&model.dir).map_err(|source| ModelsError::Bundle {
            dir: model.dir.clone(),
            source,
        })?;
        let text = Arc::new(TextSide::load(&bundle, self.context).map_err(|source| {
            ModelsError::Text {
                dir: model.dir.clone(),
                source,
            }
        })?);
        texts.insert(model.dir.clone(), Arc::clone(&text));
        Ok(text)
    }

    /// Keeps `text`, loaded with its weights at start, for the model in its directory.
    pub fn remember(&self, text: &Arc<TextSide>) {
        self.texts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(text.dir().to_owned(), Arc::clone(text));
    }
}

/// The model in `dir`, when it holds a readable bundle manifest; anything else (a stray file,
/// a directory that is not a bundle, one the daemon may not read) is not a model. Its context
/// is `context` where the model reaches it; one that does not is listed with its maximum, and
/// refused with both numbers when its text side is loaded.
fn describe(dir: &Path, context: Option<usize>) -> Option<ModelInfo> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            tracing::debug!("{}: not a model: {e}", dir.display());
            return None;
        }
    };
    let manifest: Manifest = match serde_json::from_str(&text) {
        Ok(manifest) => manifest,
        Err(e) => {
            tracing::warn!("{}: not a readable bundle manifest: {e}", path.display());
            return None;
        }
    };
    let name = model_name(dir, &manifest);
    Some(ModelInfo {
        name,
        dir: dir.to_owned(),
        quantization: quantization_name(&manifest),
        context_length: manifest
            .architecture
            .run_context(context)
            .unwrap_or(manifest.architecture.max_context()),
        size_bytes: text.len() as u64 + manifest.files.values().map(|f| f.size).sum::<u64>(),
        manifest,
    })
}

/// `fp8_e4m3fn`, `f16` or `f32` (with the block size when blocked).
pub fn quantization_name(manifest: &Manifest) -> String {
    let q = &manifest.quantization;
    let kind = match q.kind {
        QuantKind::Fp8E4m3fn => "fp8_e4m3fn",
        QuantKind::F16 => "f16",
        QuantKind::F32 => "f32",
    };
    match q.block_size {
        Some(b) => format!("{kind}/block{b}"),
        None => kind.to_string(),
    }
}

/// A model's name: its directory's name as the models directory (or the setting `bundle`)
/// names it — a symbolic link `default -> smollm2` is the model `default`.
pub fn model_name(dir: &Path, manifest: &Manifest) -> String {
    let canonical;
    let named = match dir.file_name() {
        Some(_) => dir,
        None => {
            canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
            &canonical
        }
    };
    match named.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => manifest.architecture.family.clone(),
    }
}
