//! Builds a bundle directory atomically.
//!
//! The bundle is written into an [`AtomicDir`] next to the target and renamed into place in one
//! step: an export that fails or is interrupted never leaves something at the target that looks
//! like a bundle. `model.weights` is hashed while it is written, so it is never read back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use marengo_bundle::digest::{sha256_file, to_hex};
use marengo_bundle::manifest::{
    FileEntry, MANIFEST_FILE, Manifest, TENSOR_ALIGNMENT, TensorDtype, TensorEntry, WEIGHTS_FILE,
};
use sha2::{Digest, Sha256};

use crate::atomic_dir::{AtomicDir, AtomicDirError};

/// Why the bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("copying {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not empty (pass --force to replace it)")]
    TargetExists { path: PathBuf },
    #[error("{path} exists and is not a directory")]
    TargetNotDir { path: PathBuf },
}

impl From<AtomicDirError> for WriteError {
    fn from(error: AtomicDirError) -> Self {
        match error {
            AtomicDirError::Io { path, source } => WriteError::Io { path, source },
            AtomicDirError::NotEmpty { path } => WriteError::TargetExists { path },
            AtomicDirError::NotDir { path } => WriteError::TargetNotDir { path },
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A bundle under construction.
pub struct BundleWriter {
    dir: AtomicDir,
    weights: BufWriter<File>,
    weights_path: PathBuf,
    weights_digest: Sha256,
    weights_len: u64,
    tensors: Vec<TensorEntry>,
    files: Vec<String>,
}

impl BundleWriter {
    /// Prepares a temporary directory next to `target`. Refuses a non-empty `target` unless
    /// `force`, and anything but a directory even with it.
    pub fn create(target: &Path, force: bool) -> Result<Self, WriteError> {
        if target.exists() && !target.is_dir() {
            return Err(WriteError::TargetNotDir {
                path: target.to_owned(),
            });
        }
        let dir = AtomicDir::create(target, force)?;
        let weights_path = dir.path().join(WEIGHTS_FILE);
        let file = File::create(&weights_path).map_err(io_error(&weights_path))?;
        Ok(BundleWriter {
            dir,
            weights: BufWriter::with_capacity(8 << 20, file),
            weights_path,
            weights_digest: Sha256::new(),
            weights_len: 0,
            tensors: Vec::new(),
            files: vec![WEIGHTS_FILE.to_owned()],
        })
    }

    /// Appends a tensor to `model.weights` at the next aligned offset and records it.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: TensorDtype,
        shape: &[usize],
        bytes: &[u8],
        scale_of: Option<&str>,
        rel_rms_error: Option<f64>,
    ) -> Result<&TensorEntry, WriteError> {
        let offset = self.weights_len.next_multiple_of(TENSOR_ALIGNMENT);
        let padding = vec![0u8; (offset - self.weights_len) as usize];
        self.write_weights(&padding)?;
        self.write_weights(bytes)?;
        self.tensors.push(TensorEntry {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
            offset,
            length: bytes.len() as u64,
            scale_of: scale_of.map(str::to_owned),
            rel_rms_error,
        });
        Ok(&self.tensors[self.tensors.len() - 1])
    }

    fn write_weights(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.weights
            .write_all(bytes)
            .map_err(io_error(&self.weights_path))?;
        self.weights_digest.update(bytes);
        self.weights_len += bytes.len() as u64;
        Ok(())
    }

    /// The tensors written so far, in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Writes a whole file of the bundle.
    pub fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).map_err(io_error(&path))?;
        self.files.push(name.to_owned());
        Ok(())
    }

    /// Copies a file into the bundle.
    pub fn copy_file(&mut self, name: &str, source: &Path) -> Result<(), WriteError> {
        let path = self.dir.path().join(name);
        std::fs::copy(source, &path).map_err(|e| WriteError::Copy {
            from: source.to_owned(),
            to: path.clone(),
            source: e,
        })?;
        self.files.push(name.to_owned());
        Ok(())
    }

    /// Completes `manifest` with the files and tensors, writes it, and commits the directory
    /// (synced, renamed into place). `manifest.files` and `manifest.tensors` are overwritten.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<PathBuf, WriteError> {
        self.weights.flush().map_err(io_error(&self.weights_path))?;
        manifest.tensors = std::mem::take(&mut self.tensors);
        manifest.files.clear();
        for name in &self.files {
            let path = self.dir.path().join(name);
            let entry = if name == WEIGHTS_FILE {
                FileEntry {
                    size: self.weights_len,
                    sha256: to_hex(&self.weights_digest.clone().finalize()),
                }
            } else {
                let (size, sha256) = sha256_file(&path).map_err(io_error(&path))?;
                FileEntry { size, sha256 }
            };
            manifest.files.insert(name.clone(), entry);
        }
        let manifest_path = self.dir.path().join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| WriteError::Io {
            path: manifest_path.clone(),
            source: e.into(),
        })?;
        let mut file = File::create(&manifest_path).map_err(io_error(&manifest_path))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .map_err(io_error(&manifest_path))?;
        Ok(self.dir.commit()?)
    }
}
