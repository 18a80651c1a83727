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
//! page aligned, with a length matching its shape, that the architecture is one the graph can
//! be built for ([`Architecture::validate`](manifest::Architecture::validate)), and that the
//! tensor table is exactly the one [`layout::stored_tensors`] lists for that architecture and
//! quantization. The engine then binds its weights from that table ([`Bundle::tensor`],
//! [`Bundle::external_tensor`]), never from offsets it has not seen checked. Full SHA-256 verification reads every byte, so it is a separate, explicit step
//! ([`Bundle::verify_hashes`]).

pub mod architecture;
pub mod digest;
pub mod graph;
pub mod layout;
pub mod manifest;
pub mod onnx;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use architecture::ArchitectureError;
use layout::{QuantizationError, stored_tensors};
use manifest::{
    FORMAT, FORMAT_VERSION, GRAPH_FILE, MANIFEST_FILE, Manifest, TENSOR_ALIGNMENT, TOKENIZER_FILE,
    TensorEntry, WEIGHTS_FILE,
};
use onnx::{DataType, ExternalDataError, ExternalLocation};

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
    Architecture(#[from] ArchitectureError),
    #[error("quantization: {0}")]
    Quantization(#[from] QuantizationError),
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

    /// A tensor's byte range in the mapped file (bounds were checked by [`Bundle::open`]).
    pub fn tensor_range(&self, name: &str) -> Option<Range<usize>> {
        let entry = self.tensor(name)?;
        let start = usize::try_from(entry.offset).ok()?;
        let end = start.checked_add(usize::try_from(entry.length).ok()?)?;
        (end <= self.weights.len()).then_some(start..end)
    }

    /// A tensor's bytes in the mapped file (bounds were checked by [`Bundle::open`]).
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensor_range(name).map(|range| &self.weights[range])
    }

    /// The table entry of the graph's initializer `name`, stored outside the graph as its
    /// `external_data` entries (key, value) say, once graph and table agree on the file, the
    /// offset, the length, the element type (`data_type`, ONNX's numbering) and the shape.
    ///
    /// `model.onnx` repeats the table's placements, and whatever reads initializers from it
    /// (tract does, for the f32 ones) would trust them; a graph that disagrees with the table
    /// `open` checked is refused here, naming the tensor.
    pub fn external_tensor<'a>(
        &self,
        name: &str,
        data_type: i32,
        dims: &[i64],
        external_data: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<&TensorEntry, ExternalDataError> {
        let entry = self
            .tensor(name)
            .ok_or_else(|| ExternalDataError::NotInTable {
                tensor: name.to_owned(),
            })?;
        let graph = ExternalLocation::from_entries(name, external_data)?;
        let disagrees = |what, graph: String, table: String| ExternalDataError::Disagrees {
            tensor: name.to_owned(),
            what,
            graph,
            table,
        };
        if graph.location != WEIGHTS_FILE {
            return Err(disagrees(
                "location",
                format!("{:?}", graph.location),
                format!("{WEIGHTS_FILE:?}"),
            ));
        }
        if graph.offset != entry.offset {
            return Err(disagrees(
                "offset",
                graph.offset.to_string(),
                entry.offset.to_string(),
            ));
        }
        if graph.length != Some(entry.length) {
            let length = graph.length.map_or("none".into(), |l| l.to_string());
            return Err(disagrees("length", length, entry.length.to_string()));
        }
        let table_type = DataType::from(entry.dtype);
        if data_type != table_type as i32 {
            return Err(disagrees(
                "data_type",
                data_type.to_string(),
                format!("{} ({:?})", table_type as i32, entry.dtype),
            ));
        }
        if !dims
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .eq(entry.shape.iter().map(|&d| Some(d)))
        {
            return Err(disagrees(
                "shape",
                format!("{dims:?}"),
                format!("{:?}", entry.shape),
            ));
        }
        Ok(entry)
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
    manifest.architecture.validate()?;
    let stored = stored_tensors(&manifest.architecture, &manifest.quantization)?;
    let mut expected_names = BTreeSet::new();
    for (tensor, scale_of) in stored.all() {
        let entry = index
            .get(&tensor.name)
            .map(|&i| &manifest.tensors[i])
            .ok_or_else(|| BundleError::MissingTensor {
                tensor: tensor.name.clone(),
            })?;
        if entry.dtype != tensor.dtype || entry.shape != tensor.shape {
            return Err(BundleError::tensor(
                &entry.name,
                format!(
                    "is {:?} {:?}; the architecture calls for {:?} {:?}",
                    entry.dtype, entry.shape, tensor.dtype, tensor.shape
                ),
            ));
        }
        if let Some(of) = scale_of
            && entry.scale_of.as_deref() != Some(of)
        {
            return Err(BundleError::tensor(
                &entry.name,
                format!("scale_of should name {of}"),
            ));
        }
        expected_names.insert(tensor.name.as_str());
    }
    if let Some(extra) = manifest
        .tensors
        .iter()
        .find(|t| !expected_names.contains(t.name.as_str()))
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
