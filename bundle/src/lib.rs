//! The bundle format: a directory with `model.onnx`, `model.weights`, `tokenizer.json` and
//! `bundle.json` (see `ARCHITECTURE.md` for the layout).
//!
//! A crate of its own because two programs meet here: `marengo-export` writes bundles through
//! it and `marengod` reads them through it, and neither may know the other. The exporter thus
//! builds without tract, and a change of format is made in one place.
//!
//! [`Bundle::open`] is the only way the daemon gets at a bundle, and it checks everything that
//! is cheap to check before anything trusts an offset: the manifest's format and version, that
//! every file is there with its recorded size, that every tensor lies inside `model.weights`,
//! page aligned, with a length matching its shape, and that the tensor table matches the
//! architecture. Full SHA-256 verification reads every byte, so it is a separate, explicit step
//! ([`Bundle::verify_hashes`]).

pub mod digest;
pub mod layout;
pub mod manifest;
pub mod onnx;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use layout::{
    HEAD_RESIDUAL_SUFFIX, ROPE_COS, ROPE_SIN, Role, SCALE_SUFFIX, expected_tensors, head_tensor,
};
use manifest::{
    FORMAT, FORMAT_VERSION, GRAPH_FILE, MANIFEST_FILE, Manifest, QuantKind, TENSOR_ALIGNMENT,
    TOKENIZER_FILE, TensorDtype, TensorEntry, WEIGHTS_FILE,
};

/// Why a directory is not a usable bundle. Every variant names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid manifest: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: format is {found:?}, not a {FORMAT:?} manifest")]
    NotABundle { path: PathBuf, found: String },
    #[error("{path}: format_version {found} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path}: the manifest does not list {file}")]
    UnlistedFile { path: PathBuf, file: &'static str },
    #[error("{path}: size is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: sha256 is {actual}, the manifest says {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("tensor {tensor}: {problem}")]
    Tensor { tensor: String, problem: String },
    #[error("tensor {tensor} is missing from the manifest")]
    MissingTensor { tensor: String },
    #[error("architecture: {0}")]
    Architecture(String),
}

impl BundleError {
    fn tensor(tensor: &str, problem: String) -> Self {
        BundleError::Tensor {
            tensor: tensor.to_owned(),
            problem,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An opened, structurally checked bundle with its weights mapped.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    weights: Arc<Mmap>,
    index: HashMap<String, usize>,
}

impl Bundle {
    /// Reads and checks the manifest, checks every file's presence and size, and maps
    /// `model.weights` read-only.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, BundleError> {
        let dir = dir.as_ref().to_owned();
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).map_err(io_error(&manifest_path))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| BundleError::Manifest {
                path: manifest_path.clone(),
                source,
            })?;
        if manifest.format != FORMAT {
            return Err(BundleError::NotABundle {
                path: manifest_path,
                found: manifest.format,
            });
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion {
                path: manifest_path,
                found: manifest.format_version,
            });
        }
        for required in [GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
            if !manifest.files.contains_key(required) {
                return Err(BundleError::UnlistedFile {
                    path: manifest_path,
                    file: required,
                });
            }
        }
        for (name, entry) in &manifest.files {
            let path = dir.join(name);
            let actual = std::fs::metadata(&path).map_err(io_error(&path))?.len();
            if actual != entry.size {
                return Err(BundleError::SizeMismatch {
                    path,
                    expected: entry.size,
                    actual,
                });
            }
        }

        let weights_path = dir.join(WEIGHTS_FILE);
        let weights_size = manifest.files[WEIGHTS_FILE].size;
        let index = check_tensor_table(&manifest, weights_size)?;
        check_architecture(&manifest, &index)?;

        let file = File::open(&weights_path).map_err(io_error(&weights_path))?;
        // SAFETY: the map is read-only; a bundle is immutable once renamed into place, and
        // truncation by another process is the same hazard as for any mapped model file.
        let weights = unsafe { Mmap::map(&file) }.map_err(io_error(&weights_path))?;
        if weights.len() as u64 != weights_size {
            return Err(BundleError::SizeMismatch {
                path: weights_path,
                expected: weights_size,
                actual: weights.len() as u64,
            });
        }
        Ok(Bundle {
            dir,
            manifest,
            weights: Arc::new(weights),
            index,
        })
    }

    /// Recomputes the SHA-256 of every file listed in the manifest and compares.
    pub fn verify_hashes(&self) -> Result<(), BundleError> {
        for (name, entry) in &self.manifest.files {
            let path = self.dir.join(name);
            let (_, actual) = digest::sha256_file(&path).map_err(io_error(&path))?;
            if actual != entry.sha256 {
                return Err(BundleError::HashMismatch {
                    path,
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The mapped `model.weights`, shared with whatever reads tensors in place.
    pub fn weights(&self) -> &Arc<Mmap> {
        &self.weights
    }

    /// Path of `model.onnx`.
    pub fn graph_path(&self) -> PathBuf {
        self.dir.join(GRAPH_FILE)
    }

    /// Path of `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER_FILE)
    }

    /// A tensor's manifest entry, by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.manifest.tensors[i])
    }

    /// A tensor's bytes in the mapped file (bounds were checked by [`Bundle::open`]).
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let entry = self.tensor(name)?;
        let start = usize::try_from(entry.offset).ok()?;
        let end = start.checked_add(usize::try_from(entry.length).ok()?)?;
        self.weights.get(start..end)
    }
}

/// Checks every tensor's placement in `model.weights`; returns name → index.
fn check_tensor_table(
    manifest: &Manifest,
    weights_size: u64,
) -> Result<HashMap<String, usize>, BundleError> {
    let mut index = HashMap::new();
    let mut spans = Vec::with_capacity(manifest.tensors.len());
    for (i, t) in manifest.tensors.iter().enumerate() {
        if index.insert(t.name.clone(), i).is_some() {
            return Err(BundleError::tensor(&t.name, "listed twice".into()));
        }
        if !t.offset.is_multiple_of(TENSOR_ALIGNMENT) {
            return Err(BundleError::tensor(
                &t.name,
                format!(
                    "offset {} is not a multiple of {TENSOR_ALIGNMENT}",
                    t.offset
                ),
            ));
        }
        let elements = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let expected = elements.and_then(|n| n.checked_mul(t.dtype.size()));
        if expected != Some(t.length) {
            return Err(BundleError::tensor(
                &t.name,
                format!(
                    "length {} does not match shape {:?} of {:?}",
                    t.length, t.shape, t.dtype
                ),
            ));
        }
        match t.offset.checked_add(t.length) {
            Some(end) if end <= weights_size => spans.push((t.offset, end, i)),
            _ => {
                return Err(BundleError::tensor(
                    &t.name,
                    format!(
                        "bytes {}+{} lie outside {WEIGHTS_FILE} ({weights_size} bytes)",
                        t.offset, t.length
                    ),
                ));
            }
        }
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
        if start < end {
            return Err(BundleError::tensor(
                &manifest.tensors[b].name,
                format!("overlaps tensor {}", manifest.tensors[a].name),
            ));
        }
    }
    Ok(index)
}

/// Checks that the tensor table is the one the architecture and quantization call for, so that
/// the graph builder can trust every shape it reads from the manifest.
fn check_architecture(
    manifest: &Manifest,
    index: &HashMap<String, usize>,
) -> Result<(), BundleError> {
    let arch = &manifest.architecture;
    if arch.num_kv_heads == 0 || !arch.num_heads.is_multiple_of(arch.num_kv_heads) {
        return Err(BundleError::Architecture(format!(
            "num_kv_heads {} does not divide num_heads {}",
            arch.num_kv_heads, arch.num_heads
        )));
    }
    if arch.head_dim == 0 || !arch.head_dim.is_multiple_of(2) || arch.context_length == 0 {
        return Err(BundleError::Architecture(format!(
            "head_dim {} must be even and context_length {} positive",
            arch.head_dim, arch.context_length
        )));
    }
    let quant = &manifest.quantization;
    let stored = match quant.kind {
        QuantKind::Fp8E4m3fn => TensorDtype::Fp8E4m3fn,
        QuantKind::F16 => TensorDtype::F16,
        QuantKind::F32 => TensorDtype::F32,
    };
    let lookup = |name: &str| {
        index
            .get(name)
            .map(|&i| &manifest.tensors[i])
            .ok_or_else(|| BundleError::MissingTensor {
                tensor: name.to_owned(),
            })
    };
    let check = |entry: &TensorEntry, dtype: TensorDtype, shape: &[usize]| {
        if entry.dtype != dtype || entry.shape != shape {
            return Err(BundleError::tensor(
                &entry.name,
                format!(
                    "is {:?} {:?}; the architecture calls for {dtype:?} {shape:?}",
                    entry.dtype, entry.shape
                ),
            ));
        }
        Ok(())
    };

    // An FP8 tensor's scales: per row, or per block of the row.
    let check_scale = |name: &str, shape: &[usize]| -> Result<String, BundleError> {
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let scale = lookup(&scale_name)?;
        let (rows, cols) = (shape[0], shape[1]);
        let scale_shape = match quant.block_size {
            None => vec![rows],
            Some(block) if block > 0 && cols.is_multiple_of(block) => vec![rows, cols / block],
            Some(block) => {
                return Err(BundleError::Architecture(format!(
                    "block_size {block} does not divide {cols} of tensor {name}"
                )));
            }
        };
        check(scale, TensorDtype::F32, &scale_shape)?;
        if scale.scale_of.as_deref() != Some(name) {
            return Err(BundleError::tensor(
                &scale_name,
                format!("scale_of should name {name}"),
            ));
        }
        Ok(scale_name)
    };

    let mut expected_names = BTreeSet::new();
    for tensor in expected_tensors(arch) {
        let entry = lookup(&tensor.name)?;
        expected_names.insert(tensor.name.clone());
        if tensor.role == Role::Norm {
            check(entry, TensorDtype::F32, &tensor.shape)?;
            continue;
        }
        check(entry, stored, &tensor.shape)?;
        if quant.kind == QuantKind::Fp8E4m3fn {
            expected_names.insert(check_scale(&tensor.name, &tensor.shape)?);
        }
    }
    if quant.head_residual {
        if quant.kind != QuantKind::Fp8E4m3fn {
            return Err(BundleError::Architecture(
                "head_residual is only defined for FP8 bundles".into(),
            ));
        }
        let residual = format!("{}{HEAD_RESIDUAL_SUFFIX}", head_tensor(arch));
        let shape = [arch.vocab_size, arch.hidden_size];
        check(lookup(&residual)?, stored, &shape)?;
        expected_names.insert(check_scale(&residual, &shape)?);
        expected_names.insert(residual);
    }
    let rope_shape = [arch.context_length, arch.head_dim / 2];
    for name in [ROPE_COS, ROPE_SIN] {
        check(lookup(name)?, TensorDtype::F32, &rope_shape)?;
        expected_names.insert(name.to_owned());
    }
    if let Some(extra) = manifest
        .tensors
        .iter()
        .find(|t| !expected_names.contains(&t.name))
    {
        return Err(BundleError::tensor(
            &extra.name,
            "is not part of this architecture".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
