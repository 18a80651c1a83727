//! Writes a merge as a HuggingFace checkpoint directory: sharded safetensors with their index,
//! the base's `config.json` (layer count and dtype updated as mergekit updates them), the
//! base's tokenizer and generation files, and the merge config as `mergekit_config.yml`.
//!
//! Tensors are merged and written one at a time, straight into their shard: shard boundaries
//! and every offset are known from the plan before the first tensor is merged. Like a bundle,
//! the directory is built next to the target and renamed into place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::source::{MergeError, MergedCheckpoint, PlannedTensor};
use crate::checkpoint::{CheckpointSource, SourceDtype};
use crate::progress::Progress;

/// Files of the base model that travel with the merge (mergekit's list).
const TOKENIZER_FILES: [&str; 10] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "vocab.json",
];

/// HuggingFace's default largest shard.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io {
        path: path.to_owned(),
        source,
    }
}

fn safetensors_dtype(dtype: SourceDtype) -> &'static str {
    match dtype {
        SourceDtype::Bf16 => "BF16",
        SourceDtype::F16 => "F16",
        SourceDtype::F32 => "F32",
    }
}

/// Splits the tensors, in order, into shards of at most `max_bytes` (a larger tensor gets a
/// shard of its own).
fn shard_plan(tensors: &[PlannedTensor], max_bytes: u64) -> Vec<Vec<&PlannedTensor>> {
    let mut shards: Vec<Vec<&PlannedTensor>> = vec![Vec::new()];
    let mut size = 0;
    for tensor in tensors {
        let bytes = tensor.out_bytes();
        if size > 0 && size + bytes > max_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(tensor);
        }
    }
    shards
}

/// The safetensors header of one shard, padded with spaces so that data starts 8-aligned.
fn shard_header(tensors: &[&PlannedTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    for tensor in tensors {
        let end = offset + tensor.out_bytes();
        header.insert(
            tensor.name.clone(),
            json!({
                "dtype": safetensors_dtype(tensor.out),
                "shape": tensor.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    text
}

/// Writes the merged checkpoint to `out` (atomically); returns its path.
pub fn write_checkpoint(
    merge: &MergedCheckpoint,
    out: &Path,
    force: bool,
    shard_bytes: u64,
) -> Result<PathBuf, MergeError> {
    let target = TargetDir::create(out, force)?;
    let dir = target.path().to_owned();
    let shards = shard_plan(merge.planned(), shard_bytes.max(1));
    let total: u64 = merge.planned().iter().map(PlannedTensor::out_bytes).sum();
    let progress = Progress::new(total, "merging");
    let mut weight_map = BTreeMap::new();
    for (index, shard) in shards.iter().enumerate() {
        let name = if shards.len() == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", index + 1, shards.len())
        };
        let path = dir.join(&name);
        let file = File::create(&path).map_err(io_error(&path))?;
        let mut writer = BufWriter::with_capacity(8 << 20, file);
        let header = shard_header(shard);
        writer
            .write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| writer.write_all(&header))
            .map_err(io_error(&path))?;
        for tensor in shard {
            let (bytes, _) = merge.merge_tensor(tensor)?;
            writer.write_all(&bytes).map_err(io_error(&path))?;
            progress.advance(bytes.len() as u64);
            weight_map.insert(tensor.name.clone(), name.clone());
        }
        let file = writer.into_inner().map_err(|e| MergeError::Io {
            path: path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_error(&path))?;
    }
    progress.finish();
    if shards.len() > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }

    let base_dir = merge.base().dir();
    let config_path = base_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| MergeError::Io {
        path: config_path.clone(),
        source: e.into(),
    })?;
    let merge_config = merge.merge_config();
    config["num_hidden_layers"] = json!(merge.config().architecture.num_layers);
    if let Some(dtype) = merge_config.out_dtype.or(merge_config.dtype) {
        // mergekit sets torch_dtype; transformers 5 configs call it dtype.
        let key = if config.get("dtype").is_some() {
            "dtype"
        } else {
            "torch_dtype"
        };
        config[key] = json!(dtype.hf_name());
    }
    write_json(&dir.join("config.json"), &config)?;
    for name in TOKENIZER_FILES {
        let from = base_dir.join(name);
        if from.is_file() {
            let to = dir.join(name);
            std::fs::copy(&from, &to).map_err(io_error(&from))?;
        }
    }
    let yaml = dir.join("mergekit_config.yml");
    std::fs::copy(&merge_config.file, &yaml).map_err(io_error(&merge_config.file))?;
    target.commit()
}

fn write_json(path: &Path, value: &Value) -> Result<(), MergeError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| MergeError::Io {
        path: path.to_owned(),
        source: e.into(),
    })?;
    std::fs::write(path, text + "\n").map_err(io_error(path))
}

/// A checkpoint directory built in a hidden temporary directory next to its target and renamed
/// into place, so a failed merge never leaves a half-written checkpoint where one is expected.
struct TargetDir {
    target: PathBuf,
    force: bool,
    temp: tempfile::TempDir,
}

impl TargetDir {
    fn create(target: &Path, force: bool) -> Result<Self, MergeError> {
        if target.exists() {
            let non_empty = !target.is_dir()
                || std::fs::read_dir(target)
                    .map_err(io_error(target))?
                    .next()
                    .is_some();
            if non_empty && !force {
                return Err(MergeError::Io {
                    path: target.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists and is not an empty directory (pass --force to replace it)",
                    ),
                });
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_error(&parent))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "merge".into());
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .map_err(io_error(&parent))?;
        Ok(TargetDir {
            target: target.to_owned(),
            force,
            temp,
        })
    }

    fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Renames the finished directory to the target; a replaced one is moved aside first and
    /// deleted once the new one is in place.
    fn commit(self) -> Result<PathBuf, MergeError> {
        let mut aside = None;
        if self.target.exists() {
            if self.force {
                let old = self.temp.path().with_extension("replaced");
                std::fs::rename(&self.target, &old).map_err(io_error(&self.target))?;
                aside = Some(old);
            } else {
                // Checked empty at creation; rename cannot replace a directory otherwise.
                std::fs::remove_dir(&self.target).map_err(io_error(&self.target))?;
            }
        }
        let temp = self.temp.keep();
        if let Err(source) = std::fs::rename(&temp, &self.target) {
            let _ = std::fs::remove_dir_all(&temp);
            if let Some(old) = &aside {
                let _ = std::fs::rename(old, &self.target);
            }
            return Err(MergeError::Io {
                path: self.target,
                source,
            });
        }
        if let Some(old) = aside {
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(io_error(&old))?;
        }
        Ok(self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(name: &str, elements: usize) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            base_name: name.into(),
            other_name: name.into(),
            shape: vec![elements],
            t: 0.5,
            base_dtype: SourceDtype::Bf16,
            other_dtype: SourceDtype::Bf16,
            work: SourceDtype::Bf16,
            out: SourceDtype::Bf16,
        }
    }

    #[test]
    fn shards_respect_the_limit_and_keep_the_order() {
        let tensors: Vec<_> = (0..5).map(|i| planned(&format!("t{i}"), 100)).collect();
        let shards = shard_plan(&tensors, 450);
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        let big = [planned("big", 1000), planned("small", 1)];
        assert_eq!(shard_plan(&big, 10).len(), 2);
    }

    #[test]
    fn header_pads_to_eight_bytes() {
        let tensors = [planned("a", 3)];
        let refs: Vec<&PlannedTensor> = tensors.iter().collect();
        let header = shard_header(&refs);
        assert_eq!(header.len() % 8, 0);
        let parsed: Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(parsed["a"]["data_offsets"], json!([0, 6]));
    }
}
