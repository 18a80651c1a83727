//! Builds a bundle directory atomically.
//!
//! Everything is written into a hidden temporary directory next to the target
//! (`.NAME.partial-XXXX`), then renamed into place in one step: an export that fails or is
//! interrupted never leaves something at the target that looks like a bundle. On any error the
//! temporary directory is removed when the writer is dropped. `model.weights` is hashed while it
//! is written, so it is never read back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use marengo_bundle::digest::{sha256_file, to_hex};
use marengo_bundle::manifest::{
    FileEntry, MANIFEST_FILE, Manifest, TENSOR_ALIGNMENT, TensorDtype, TensorEntry, WEIGHTS_FILE,
};
use sha2::{Digest, Sha256};

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

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A bundle under construction.
pub struct BundleWriter {
    target: PathBuf,
    force: bool,
    temp: tempfile::TempDir,
    weights: BufWriter<File>,
    weights_path: PathBuf,
    weights_digest: Sha256,
    weights_len: u64,
    tensors: Vec<TensorEntry>,
    files: Vec<String>,
}

impl BundleWriter {
    /// Prepares a temporary directory next to `target`. Refuses a non-empty `target` unless
    /// `force`.
    pub fn create(target: &Path, force: bool) -> Result<Self, WriteError> {
        if target.exists() {
            if !target.is_dir() {
                return Err(WriteError::TargetNotDir {
                    path: target.to_owned(),
                });
            }
            let non_empty = std::fs::read_dir(target)
                .map_err(io_error(target))?
                .next()
                .is_some();
            if non_empty && !force {
                return Err(WriteError::TargetExists {
                    path: target.to_owned(),
                });
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bundle".into());
        std::fs::create_dir_all(&parent).map_err(io_error(&parent))?;
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .map_err(io_error(&parent))?;
        let weights_path = temp.path().join(WEIGHTS_FILE);
        let file = File::create(&weights_path).map_err(io_error(&weights_path))?;
        Ok(BundleWriter {
            target: target.to_owned(),
            force,
            temp,
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
        let path = self.temp.path().join(name);
        std::fs::write(&path, bytes).map_err(io_error(&path))?;
        self.files.push(name.to_owned());
        Ok(())
    }

    /// Copies a file into the bundle.
    pub fn copy_file(&mut self, name: &str, source: &Path) -> Result<(), WriteError> {
        let path = self.temp.path().join(name);
        std::fs::copy(source, &path).map_err(|e| WriteError::Copy {
            from: source.to_owned(),
            to: path.clone(),
            source: e,
        })?;
        self.files.push(name.to_owned());
        Ok(())
    }

    /// Completes `manifest` with the files and tensors, writes it, syncs, and renames the
    /// directory into place. `manifest.files` and `manifest.tensors` are overwritten.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<PathBuf, WriteError> {
        self.weights.flush().map_err(io_error(&self.weights_path))?;
        self.weights
            .get_ref()
            .sync_all()
            .map_err(io_error(&self.weights_path))?;
        manifest.tensors = std::mem::take(&mut self.tensors);
        manifest.files.clear();
        for name in &self.files {
            let path = self.temp.path().join(name);
            let entry = if name == WEIGHTS_FILE {
                FileEntry {
                    size: self.weights_len,
                    sha256: to_hex(&self.weights_digest.clone().finalize()),
                }
            } else {
                let (size, sha256) = sha256_file(&path).map_err(io_error(&path))?;
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_error(&path))?;
                FileEntry { size, sha256 }
            };
            manifest.files.insert(name.clone(), entry);
        }
        let manifest_path = self.temp.path().join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| WriteError::Io {
            path: manifest_path.clone(),
            source: e.into(),
        })?;
        let mut file = File::create(&manifest_path).map_err(io_error(&manifest_path))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(io_error(&manifest_path))?;
        self.commit()
    }

    /// Moves the finished directory to the target; a replaced bundle is moved aside first and
    /// deleted only once the new one is in place.
    fn commit(self) -> Result<PathBuf, WriteError> {
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
            // Best effort to leave things as they were before reporting the failure.
            let _ = std::fs::remove_dir_all(&temp);
            if let Some(old) = &aside {
                let _ = std::fs::rename(old, &self.target);
            }
            return Err(WriteError::Io {
                path: self.target,
                source,
            });
        }
        if let Some(old) = aside {
            std::fs::remove_dir_all(&old).map_err(io_error(&old))?;
        }
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_error(parent))?;
        }
        Ok(self.target)
    }
}
