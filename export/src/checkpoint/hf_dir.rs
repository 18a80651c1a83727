//! A HuggingFace checkpoint directory: `config.json`, safetensors weights, and the tokenizer
//! side files (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
//! `generation_config.json`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::TokenIds;
use super::safetensors::SafetensorsFiles;
use super::{
    CheckpointError, CheckpointSource, ModelConfig, SourceDigest, SourceDtype, SourceTensor,
    TokenizerFiles, file_digest,
};

const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// Where transformers 4.43 and later save a single chat template; it takes priority over
/// `tokenizer_config.json`'s `chat_template`, as transformers reads them.
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// An opened HuggingFace checkpoint directory.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
    weights: SafetensorsFiles,
}

impl HfCheckpoint {
    /// Reads `config.json` and the safetensors headers.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        if !dir.is_dir() {
            return Err(CheckpointError::Malformed {
                path: dir.to_owned(),
                message: not_a_directory(dir).into(),
            });
        }
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let weights = SafetensorsFiles::open(dir)?;
        Ok(HfCheckpoint {
            dir: dir.to_owned(),
            config,
            weights,
        })
    }

    /// The shard holding a tensor, for error messages.
    pub fn file_of(&self, tensor: &str) -> Option<&Path> {
        self.weights.file_of(tensor)
    }

    /// A tensor's dtype and shape from the safetensors header, without reading it.
    pub fn header_of(&self, tensor: &str) -> Option<(SourceDtype, &[usize])> {
        self.weights.header_of(tensor)
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_text(&self, name: &str) -> Result<Option<String>, CheckpointError> {
        let path = self.dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        std::fs::read_to_string(&path)
            .map(Some)
            .map_err(|source| CheckpointError::Io { path, source })
    }

    fn read_json(&self, name: &str) -> Result<Option<Value>, CheckpointError> {
        let Some(text) = self.read_text(name)? else {
            return Ok(None);
        };
        let path = self.dir.join(name);
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CheckpointError::Malformed {
                path,
                message: format!("not valid JSON: {e}"),
            })
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is the one.
fn chat_template(tokenizer_config: &Value) -> Option<String> {
    match tokenizer_config.get("chat_template")? {
        Value::String(template) => Some(template.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// A special token's text in `tokenizer_config.json`: a string or an AddedToken object.
fn token_text<'a>(tokenizer_config: &'a Value, key: &str) -> Option<&'a str> {
    let value = tokenizer_config.get(key)?;
    value
        .as_str()
        .or_else(|| value.get("content").and_then(Value::as_str))
}

/// The added tokens of `tokenizer.json` marked special, as (text, id).
fn special_tokens(tokenizer: &Value) -> impl Iterator<Item = (&str, u32)> {
    tokenizer
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.get("special").and_then(Value::as_bool) == Some(true))
        .filter_map(|t| {
            let text = t.get("content")?.as_str()?;
            let id = u32::try_from(t.get("id")?.as_u64()?).ok()?;
            Some((text, id))
        })
}

/// The id of a token's text in `tokenizer.json`: added tokens first, then the model vocab.
fn token_id(tokenizer: &Value, text: &str) -> Option<u32> {
    let added = tokenizer
        .get("added_tokens")
        .and_then(Value::as_array)
        .and_then(|tokens| {
            tokens
                .iter()
                .find(|t| t.get("content").and_then(Value::as_str) == Some(text))
                .and_then(|t| t.get("id")?.as_u64())
        });
    let vocab = || tokenizer.get("model")?.get("vocab")?.get(text)?.as_u64();
    added.or_else(vocab).and_then(|id| u32::try_from(id).ok())
}

fn id_field(value: &Value, key: &str) -> Option<Vec<u32>> {
    serde_json::from_value::<TokenIds>(value.get(key)?.clone())
        .ok()
        .map(|ids| ids.to_vec())
}

impl CheckpointSource for HfCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor_names(&self) -> Vec<String> {
        self.weights.names()
    }

    fn tensor(&self, name: &str) -> Result<SourceTensor<'_>, CheckpointError> {
        self.weights.tensor(name)
    }

    fn tokenizer(&self) -> Result<TokenizerFiles, CheckpointError> {
        let tokenizer_path = self.dir.join(TOKENIZER_FILE);
        let tokenizer = self.read_json(TOKENIZER_FILE)?;
        let tokenizer_config = self
            .read_json(TOKENIZER_CONFIG_FILE)?
            .unwrap_or(Value::Null);
        let generation = self
            .read_json(GENERATION_CONFIG_FILE)?
            .unwrap_or(Value::Null);

        // generation_config.json is what transformers' generate() obeys; config.json next,
        // then the tokenizer's own idea of its special tokens.
        let by_text = |key: &str| {
            let text = token_text(&tokenizer_config, key)?;
            token_id(tokenizer.as_ref()?, text)
        };
        let single = |key: &str| id_field(&generation, key).and_then(|ids| ids.first().copied());
        let bos = single("bos_token_id")
            .or(self.config.bos_token_id)
            .or_else(|| by_text("bos_token"));
        let mut eos = id_field(&generation, "eos_token_id")
            .filter(|ids| !ids.is_empty())
            .or_else(|| Some(self.config.eos_token_ids.clone()).filter(|ids| !ids.is_empty()))
            .or_else(|| by_text("eos_token").map(|id| vec![id]))
            .unwrap_or_default();
        // The tokenizer's own EOS first when it is one of them: it is what chat templates print
        // as `eos_token` (Llama 3.2 Instruct lists <|end_of_text|> first, its tokenizer names
        // <|eot_id|>).
        if let Some(position) =
            by_text("eos_token").and_then(|id| eos.iter().position(|&e| e == id))
        {
            eos[..=position].rotate_right(1);
        }
        let eos = super::stop_ids(&eos, tokenizer.iter().flat_map(special_tokens));
        let pad = single("pad_token_id")
            .or(self.config.pad_token_id)
            .or_else(|| by_text("pad_token"));
        let unk = by_text("unk_token").or_else(|| {
            let text = tokenizer
                .as_ref()?
                .get("model")?
                .get("unk_token")?
                .as_str()?;
            token_id(tokenizer.as_ref()?, text)
        });
        Ok(TokenizerFiles {
            tokenizer_json: tokenizer.is_some().then_some(tokenizer_path),
            chat_template: self
                .read_text(CHAT_TEMPLATE_FILE)?
                .or_else(|| chat_template(&tokenizer_config)),
            bos,
            eos,
            pad,
            unk,
        })
    }

    fn digests(&self) -> Result<Vec<SourceDigest>, CheckpointError> {
        let mut out = vec![file_digest(&self.dir.join(CONFIG_FILE))?];
        for side in [
            TOKENIZER_FILE,
            TOKENIZER_CONFIG_FILE,
            CHAT_TEMPLATE_FILE,
            GENERATION_CONFIG_FILE,
        ] {
            let path = self.dir.join(side);
            if path.is_file() {
                out.push(file_digest(&path)?);
            }
        }
        out.extend(self.weights.digests()?);
        Ok(out)
    }

    fn total_tensor_bytes(&self) -> u64 {
        self.weights.total_bytes()
    }
}

/// Why `path` cannot be opened as a checkpoint directory, with the way to give it when it is a
/// file the exporter reads some other way: a GGUF model is a single file, easily passed here.
fn not_a_directory(path: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if is_gguf {
        "a GGUF file, not a checkpoint directory: give it with --gguf"
    } else if path.is_file() {
        "a file, not a checkpoint directory (config.json and *.safetensors)"
    } else {
        "no such checkpoint directory"
    }
}
