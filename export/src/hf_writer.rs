//! Writes HuggingFace checkpoint directories: safetensors shards with their index,
//! `config.json`, and the tokenizer and generation files, as `transformers` and the exporter's
//! own readers expect them. Random checkpoints ([`crate::synth`]) and merges
//! ([`crate::merge`]) are written through it.
//!
//! Tensors are written one at a time, straight into their shard: every shard's header (and so
//! every offset) is known from the tensors' dtypes and shapes before the first byte of data is
//! asked for, so peak memory is one tensor whatever the model size. Tensors are laid out in the
//! order given, which readers keep (the converter writes a bundle's tensors in its source's file
//! order); the header is the `safetensors` crate's, so a shard in [`safetensors_order`] is byte
//! for byte what `safetensors::serialize` makes of the same tensors.
//!
//! The writer fills a directory and does not sync it: a caller that needs the checkpoint to
//! appear whole gives it an [`crate::atomic_dir::AtomicDir`].

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use serde_json::{Value, json};

use crate::checkpoint::SourceDtype;

/// The files of a model directory that travel with its weights (mergekit's list): tokenizer,
/// chat template and generation settings.
pub const TOKENIZER_FILES: [&str; 10] = [
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

/// Why a checkpoint file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HfWriteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Header {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> HfWriteError + '_ {
    move |source| HfWriteError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the writer needs to know of a tensor before its data: name, stored dtype and shape.
pub trait ShardTensor {
    fn name(&self) -> &str;
    fn dtype(&self) -> SourceDtype;
    fn shape(&self) -> &[usize];

    /// Size of its data in bytes.
    fn byte_len(&self) -> usize {
        self.shape().iter().product::<usize>() * self.dtype().size()
    }
}

impl<T: ShardTensor> ShardTensor for &T {
    fn name(&self) -> &str {
        (*self).name()
    }
    fn dtype(&self) -> SourceDtype {
        (*self).dtype()
    }
    fn shape(&self) -> &[usize] {
        (*self).shape()
    }
}

fn safetensors_dtype(dtype: SourceDtype) -> Dtype {
    match dtype {
        SourceDtype::Bf16 => Dtype::BF16,
        SourceDtype::F16 => Dtype::F16,
        SourceDtype::F32 => Dtype::F32,
    }
}

/// A HuggingFace checkpoint directory being filled.
pub struct CheckpointWriter {
    dir: PathBuf,
}

impl CheckpointWriter {
    /// Writes into `dir`, which must exist.
    pub fn new(dir: &Path) -> Self {
        CheckpointWriter {
            dir: dir.to_owned(),
        }
    }

    /// Writes `shards` as `model.safetensors` (one shard) or `model-0000i-of-0000n.safetensors`
    /// with `model.safetensors.index.json`, asking `data` for each tensor's little-endian bytes
    /// when it is written.
    pub fn write_shards<T, E>(
        &self,
        shards: Vec<Vec<T>>,
        mut data: impl FnMut(&T) -> Result<Vec<u8>, E>,
    ) -> Result<(), E>
    where
        T: ShardTensor,
        E: From<HfWriteError>,
    {
        let count = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0usize;
        for (index, shard) in shards.into_iter().enumerate() {
            let name = if count == 1 {
                "model.safetensors".to_owned()
            } else {
                format!("model-{:05}-of-{count:05}.safetensors", index + 1)
            };
            let path = self.dir.join(&name);
            tracing::info!(file = %path.display(), tensors = shard.len(), "writing shard");
            let header = shard_header(&shard).map_err(|source| HfWriteError::Header {
                path: path.clone(),
                source,
            })?;
            let file = File::create(&path).map_err(io_error(&path))?;
            let mut writer = BufWriter::with_capacity(8 << 20, file);
            writer
                .write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|()| writer.write_all(&header))
                .map_err(io_error(&path))?;
            for tensor in &shard {
                let bytes = data(tensor)?;
                writer.write_all(&bytes).map_err(io_error(&path))?;
                total_size += tensor.byte_len();
                weight_map.insert(tensor.name().to_owned(), name.clone());
            }
            writer.flush().map_err(io_error(&path))?;
        }
        if count > 1 {
            let index =
                json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
            self.write_json("model.safetensors.index.json", &index)?;
        }
        Ok(())
    }

    /// Writes `config.json` as given.
    pub fn write_config(&self, text: &str) -> Result<(), HfWriteError> {
        self.write_file("config.json", text.as_bytes())
    }

    /// Writes `value` as the pretty JSON file `name` (as `transformers` writes them).
    pub fn write_json(&self, name: &str, value: &Value) -> Result<(), HfWriteError> {
        let path = self.dir.join(name);
        let text = serde_json::to_string_pretty(value).map_err(|e| HfWriteError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        self.write_file(name, (text + "\n").as_bytes())
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), HfWriteError> {
        let path = self.dir.join(name);
        std::fs::write(&path, bytes).map_err(io_error(&path))
    }

    /// Copies `from` into the checkpoint as `name`.
    pub fn copy_file(&self, name: &str, from: &Path) -> Result<(), HfWriteError> {
        std::fs::copy(from, self.dir.join(name)).map_err(io_error(from))?;
        Ok(())
    }

    /// Copies those of [`TOKENIZER_FILES`] that `model_dir` has.
    pub fn copy_tokenizer_files(&self, model_dir: &Path) -> Result<(), HfWriteError> {
        for name in TOKENIZER_FILES {
            let from = model_dir.join(name);
            if from.is_file() {
                self.copy_file(name, &from)?;
            }
        }
        Ok(())
    }
}

/// Sorts a shard's tensors as the `safetensors` crate lays them out: by dtype alignment, largest
/// first, then by name.
pub fn safetensors_order<T: ShardTensor>(shard: &mut [T]) {
    shard.sort_by(|a, b| {
        safetensors_dtype(b.dtype())
            .cmp(&safetensors_dtype(a.dtype()))
            .then_with(|| a.name().cmp(b.name()))
    });
}

/// The safetensors header of a shard whose tensors are in file order, padded with spaces so
/// that data starts 8-aligned.
fn shard_header<T: ShardTensor>(tensors: &[T]) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|tensor| {
            let end = offset + tensor.byte_len();
            let info = TensorInfo {
                dtype: safetensors_dtype(tensor.dtype()),
                shape: tensor.shape().to_vec(),
                data_offsets: (offset, end),
            };
            offset = end;
            (tensor.name().to_owned(), info)
        })
        .collect();
    let format = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let metadata = Metadata::new(Some(format), infos)?;
    let mut header = serde_json::to_string(&metadata)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use safetensors::View;

    use super::*;

    struct Tensor {
        name: String,
        dtype: SourceDtype,
        shape: Vec<usize>,
    }

    impl Tensor {
        fn new(name: &str, dtype: SourceDtype, shape: &[usize]) -> Self {
            Tensor {
                name: name.into(),
                dtype,
                shape: shape.to_vec(),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let seed = self.name.len() as u8;
            (0..self.byte_len()).map(|i| seed ^ i as u8).collect()
        }
    }

    impl ShardTensor for Tensor {
        fn name(&self) -> &str {
            &self.name
        }
        fn dtype(&self) -> SourceDtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
    }

    impl View for &Tensor {
        fn dtype(&self) -> Dtype {
            safetensors_dtype(self.dtype)
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Owned(self.bytes())
        }
        fn data_len(&self) -> usize {
            self.byte_len()
        }
    }

    #[test]
    fn a_shard_is_what_the_safetensors_crate_writes() {
        let tensors = [
            Tensor::new("model.norm.weight", SourceDtype::Bf16, &[3]),
            Tensor::new("lm_head.weight", SourceDtype::F32, &[2, 3]),
            Tensor::new("a", SourceDtype::Bf16, &[5]),
            Tensor::new("b", SourceDtype::F16, &[1]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let writer = CheckpointWriter::new(dir.path());
        let mut shard: Vec<&Tensor> = tensors.iter().collect();
        safetensors_order(&mut shard);
        writer
            .write_shards(vec![shard], |t| Ok::<_, HfWriteError>(t.bytes()))
            .unwrap();
        let ours = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let theirs =
            safetensors::serialize(tensors.iter().map(|t| (t.name.clone(), t)), Some(metadata))
                .unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn tensors_keep_the_given_order() {
        let tensors = [
            Tensor::new("z", SourceDtype::F32, &[2]),
            Tensor::new("a", SourceDtype::F32, &[3]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let writer = CheckpointWriter::new(dir.path());
        writer
            .write_shards(vec![tensors.iter().collect()], |t| {
                Ok::<_, HfWriteError>(t.bytes())
            })
            .unwrap();
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let offsets = |name: &str| metadata.info(name).unwrap().data_offsets;
        assert_eq!(offsets("z"), (0, 8));
        assert_eq!(offsets("a"), (8, 20));
    }

    #[test]
    fn header_pads_to_eight_bytes() {
        let tensors = [Tensor::new("a", SourceDtype::Bf16, &[3])];
        let header = shard_header(&tensors).unwrap();
        assert_eq!(header.len() % 8, 0);
        let parsed: Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(parsed["a"]["data_offsets"], json!([0, 6]));
    }

    #[test]
    fn several_shards_get_an_index() {
        let tensors = [
            Tensor::new("x", SourceDtype::F32, &[2]),
            Tensor::new("y", SourceDtype::F32, &[3]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let writer = CheckpointWriter::new(dir.path());
        let shards = vec![vec![&tensors[0]], vec![&tensors[1]]];
        writer
            .write_shards(shards, |t| Ok::<_, HfWriteError>(t.bytes()))
            .unwrap();
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            index,
            json!({
                "metadata": { "total_size": 20 },
                "weight_map": {
                    "x": "model-00001-of-00002.safetensors",
                    "y": "model-00002-of-00002.safetensors",
                },
            })
        );
    }
}
