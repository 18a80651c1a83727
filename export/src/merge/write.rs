//! Writes a merge as a HuggingFace checkpoint directory: sharded safetensors with their index,
//! the base's `config.json` (layer count and dtype updated as mergekit updates them), the
//! base's tokenizer and generation files, and the merge config as `mergekit_config.yml`.
//!
//! Tensors are merged and written one at a time, straight into their shard: shard boundaries
//! and every offset are known from the plan before the first tensor is merged. Like a bundle,
//! the directory is built next to the target and renamed into place ([`AtomicDir`]), so a
//! failed merge never leaves a half-written checkpoint where one is expected.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::source::{MergeError, MergedCheckpoint, PlannedTensor};
use crate::atomic_dir::AtomicDir;
use crate::checkpoint::{CheckpointSource, SourceDtype};
use crate::hf_writer::{CheckpointWriter, ShardTensor};
use crate::progress::Progress;

/// HuggingFace's default largest shard.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io {
        path: path.to_owned(),
        source,
    }
}

impl ShardTensor for PlannedTensor {
    fn name(&self) -> &str {
        &self.name
    }

    fn dtype(&self) -> SourceDtype {
        self.out
    }

    fn shape(&self) -> &[usize] {
        &self.shape
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

/// Writes the merged checkpoint to `out` (atomically); returns its path.
pub fn write_checkpoint(
    merge: &MergedCheckpoint,
    out: &Path,
    force: bool,
    shard_bytes: u64,
) -> Result<PathBuf, MergeError> {
    let target = AtomicDir::create(out, force)?;
    let writer = CheckpointWriter::new(target.path());
    let shards = shard_plan(merge.planned(), shard_bytes.max(1));
    let total: u64 = merge.planned().iter().map(PlannedTensor::out_bytes).sum();
    let progress = Progress::new(total, "merging");
    writer.write_shards(shards, |tensor| {
        let (bytes, _) = merge.merge_tensor(tensor)?;
        progress.advance(bytes.len() as u64);
        Ok::<_, MergeError>(bytes)
    })?;
    progress.finish();

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
    writer.write_json("config.json", &config)?;
    writer.copy_tokenizer_files(base_dir)?;
    writer.copy_file("mergekit_config.yml", &merge_config.file)?;
    Ok(target.commit()?)
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
}
