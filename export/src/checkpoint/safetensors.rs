//! safetensors files, single or sharded through `model.safetensors.index.json`.
//!
//! Headers are parsed and checked by the `safetensors` crate when the files are opened; each
//! tensor is then mapped on its own when asked for and unmapped when dropped, so the pages of a
//! 14 GB checkpoint never accumulate in the exporter's resident set. The provenance digest of
//! each file is computed from those same mapped bytes when tensors are read in file order, so a
//! checkpoint is read from disk once, not twice.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ::safetensors::{Dtype, SafeTensorError, SafeTensors};
use marengo_bundle::digest::to_hex;
use memmap2::{Mmap, MmapOptions};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{CheckpointError, SourceDigest, SourceDtype, SourceTensor, TensorBytes};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of one checkpoint directory's safetensors files.
pub struct SafetensorsFiles {
    shards: Vec<Shard>,
    tensors: HashMap<String, Location>,
    order: Vec<String>,
    index: Option<PathBuf>,
}

struct Shard {
    path: PathBuf,
    file: File,
    size: u64,
    /// Digest of the file's first `.1` bytes, advanced as tensors are read in order.
    digest: Mutex<(Sha256, u64)>,
}

struct Location {
    shard: usize,
    dtype: SourceDtype,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

fn malformed(path: &Path, message: String) -> CheckpointError {
    CheckpointError::Malformed {
        path: path.to_owned(),
        message,
    }
}

impl SafetensorsFiles {
    /// Finds and opens `model.safetensors.index.json` and its shards, or `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_error(&index_path))?;
            let index: Index = serde_json::from_str(&text)
                .map_err(|e| malformed(&index_path, format!("not a safetensors index: {e}")))?;
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            let mut shards = Vec::new();
            for name in files {
                let path = dir.join(name);
                if !path.is_file() {
                    let tensor = index
                        .weight_map
                        .iter()
                        .find(|(_, f)| *f == name)
                        .map(|(t, _)| t.clone())
                        .unwrap_or_default();
                    return Err(malformed(
                        &path,
                        format!(
                            "shard is missing (listed in {INDEX_FILE}, e.g. for tensor {tensor})"
                        ),
                    ));
                }
                shards.push(path);
            }
            let mut files = Self::from_shards(shards)?;
            for (tensor, file) in &index.weight_map {
                let in_shard = files
                    .tensors
                    .get(tensor)
                    .is_some_and(|loc| files.shards[loc.shard].path.ends_with(file));
                if !in_shard {
                    return Err(CheckpointError::MissingTensor {
                        tensor: tensor.clone(),
                        file: Some(dir.join(file)),
                    });
                }
            }
            files.index = Some(index_path);
            Ok(files)
        } else {
            let single = dir.join(SINGLE_FILE);
            if !single.is_file() {
                return Err(malformed(
                    dir,
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint directory"),
                ));
            }
            Self::from_shards(vec![single])
        }
    }

    fn from_shards(paths: Vec<PathBuf>) -> Result<Self, CheckpointError> {
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        for (shard_index, path) in paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(io_error(&path))?;
            let size = file.metadata().map_err(io_error(&path))?.len();
            // SAFETY: read-only map of an input file; only the header is read through it.
            let map = unsafe { Mmap::map(&file) }.map_err(io_error(&path))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
                let message = match e {
                    SafeTensorError::MetadataIncompleteBuffer => format!(
                        "truncated or corrupt: the header's tensors do not end at the file's \
                         end ({size} bytes)"
                    ),
                    other => format!("not a valid safetensors file: {other}"),
                };
                malformed(&path, message)
            })?;
            let data_start = 8 + header_len as u64;
            let mut digest = Sha256::new();
            digest.update(&map[..data_start as usize]);

            let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
            infos.sort_by_key(|(_, info)| info.data_offsets.0);
            for (name, info) in infos {
                let dtype = match info.dtype {
                    Dtype::BF16 => SourceDtype::Bf16,
                    Dtype::F16 => SourceDtype::F16,
                    Dtype::F32 => SourceDtype::F32,
                    other => {
                        return Err(CheckpointError::UnsupportedDtype {
                            path: path.clone(),
                            tensor: name,
                            dtype: format!("{other:?}"),
                        });
                    }
                };
                if tensors.contains_key(&name) {
                    return Err(malformed(&path, format!("tensor {name} is in two shards")));
                }
                order.push(name.clone());
                tensors.insert(
                    name,
                    Location {
                        shard: shard_index,
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + info.data_offsets.0 as u64,
                        end: data_start + info.data_offsets.1 as u64,
                    },
                );
            }
            shards.push(Shard {
                path,
                file,
                size,
                digest: Mutex::new((digest, data_start)),
            });
        }
        Ok(SafetensorsFiles {
            shards,
            tensors,
            order,
            index: None,
        })
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    /// The shard a tensor is in, for error messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|loc| self.shards[loc.shard].path.as_path())
    }

    /// A tensor's dtype and shape from the header, without mapping its data: lets a merge
    /// check both parents completely before reading any weight.
    pub fn header_of(&self, name: &str) -> Option<(SourceDtype, &[usize])> {
        self.tensors
            .get(name)
            .map(|loc| (loc.dtype, loc.shape.as_slice()))
    }

    /// Bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|loc| loc.end - loc.start).sum()
    }

    /// Maps one tensor.
    pub fn tensor(&self, name: &str) -> Result<SourceTensor<'_>, CheckpointError> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_owned(),
                file: None,
            })?;
        let shard = &self.shards[loc.shard];
        let len = (loc.end - loc.start) as usize;
        let bytes = if len == 0 {
            TensorBytes::Owned(Vec::new().into())
        } else {
            // SAFETY: read-only map of an input file, dropped with the tensor.
            let map = unsafe {
                MmapOptions::new()
                    .offset(loc.start)
                    .len(len)
                    .map(&shard.file)
            }
            .map_err(io_error(&shard.path))?;
            let mut digest = shard.digest.lock().unwrap_or_else(|e| e.into_inner());
            if digest.1 == loc.start {
                digest.0.update(&map[..]);
                digest.1 = loc.end;
            }
            TensorBytes::Mapped(map)
        };
        Ok(SourceTensor {
            name: name.to_owned(),
            dtype: loc.dtype,
            shape: loc.shape.clone(),
            bytes,
            file: shard.path.clone(),
        })
    }

    /// Digests of the index and every shard; finishes by reading what was not read in order.
    pub fn digests(&self) -> Result<Vec<SourceDigest>, CheckpointError> {
        let mut out = Vec::new();
        if let Some(index) = &self.index {
            out.push(super::file_digest(index)?);
        }
        for shard in &self.shards {
            let (mut digest, done) = {
                let guard = shard.digest.lock().unwrap_or_else(|e| e.into_inner());
                (guard.0.clone(), guard.1)
            };
            if done < shard.size {
                let mut file = &shard.file;
                file.seek(SeekFrom::Start(done))
                    .map_err(io_error(&shard.path))?;
                let mut reader = BufReader::with_capacity(1 << 20, file.take(shard.size - done));
                std::io::copy(&mut reader, &mut digest).map_err(io_error(&shard.path))?;
            }
            out.push(SourceDigest {
                path: shard.path.clone(),
                size: shard.size,
                sha256: to_hex(&digest.finalize()),
            });
        }
        Ok(out)
    }
}
