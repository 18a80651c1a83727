//! A directory that appears at its target complete or not at all.
//!
//! Bundles and merged checkpoints are both built this way, so that an export that fails or is
//! interrupted never leaves something at the target that looks like a finished directory:
//! everything is written into a hidden directory next to the target (`.NAME.partial-XXXX`, on
//! the same file system, so that the last step is a rename), which is removed when the
//! [`AtomicDir`] is dropped without being committed. [`AtomicDir::commit`] makes the contents
//! durable before the rename and the rename durable after it, so that after a power cut the
//! target holds either the old directory or the whole new one.
//!
//! A process that is killed cannot remove its staging directory; what it leaves is hidden, and
//! named after the target so that it can be recognised.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Why the directory could not be staged or put in place.
#[derive(Debug, thiserror::Error)]
pub enum AtomicDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not empty (pass --force to replace it)")]
    NotEmpty { path: PathBuf },
    #[error("{path} exists and is not a directory (pass --force to replace it)")]
    NotDir { path: PathBuf },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AtomicDirError + '_ {
    move |source| AtomicDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A directory being filled next to its target.
pub struct AtomicDir {
    target: PathBuf,
    parent: PathBuf,
    force: bool,
    staging: tempfile::TempDir,
}

impl AtomicDir {
    /// Creates the staging directory next to `target` (and the parents it needs). An existing
    /// empty directory at `target` is filled; anything else there is refused unless `force`,
    /// and then replaced only when the new directory is committed.
    pub fn create(target: &Path, force: bool) -> Result<Self, AtomicDirError> {
        if target.exists() && !force {
            if !target.is_dir() {
                return Err(AtomicDirError::NotDir {
                    path: target.to_owned(),
                });
            }
            let non_empty = std::fs::read_dir(target)
                .map_err(io_error(target))?
                .next()
                .is_some();
            if non_empty {
                return Err(AtomicDirError::NotEmpty {
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
            .unwrap_or_else(|| "out".into());
        std::fs::create_dir_all(&parent).map_err(io_error(&parent))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .map_err(io_error(&parent))?;
        Ok(AtomicDir {
            target: target.to_owned(),
            parent,
            force,
            staging,
        })
    }

    /// Where the contents are written until the commit.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// Syncs every file of the staging directory and the directory itself, renames it to the
    /// target and syncs the parent. A replaced target is moved aside first and deleted only
    /// once the new directory is in place; if the rename fails, it is put back.
    pub fn commit(self) -> Result<PathBuf, AtomicDirError> {
        sync_dir_and_files(self.staging.path())?;
        let mut aside = None;
        if self.target.exists() {
            if self.force {
                let old = self.staging.path().with_extension("replaced");
                std::fs::rename(&self.target, &old).map_err(io_error(&self.target))?;
                aside = Some(old);
            } else {
                // Checked empty at creation; rename cannot replace a directory otherwise.
                std::fs::remove_dir(&self.target).map_err(io_error(&self.target))?;
            }
        }
        let staging = self.staging.keep();
        if let Err(source) = std::fs::rename(&staging, &self.target) {
            // Best effort to leave things as they were before reporting the failure.
            let _ = std::fs::remove_dir_all(&staging);
            if let Some(old) = &aside {
                let _ = std::fs::rename(old, &self.target);
            }
            return Err(AtomicDirError::Io {
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
        File::open(&self.parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.parent))?;
        Ok(self.target)
    }
}

/// fsync of every regular file directly in `dir`, then of `dir`: the files' data and the
/// directory's entries reach the disk before the rename that publishes them.
fn sync_dir_and_files(dir: &Path) -> Result<(), AtomicDirError> {
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        if path.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_error(&path))?;
        }
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn stage(target: &Path, force: bool, file: &str) -> Result<PathBuf, AtomicDirError> {
        let dir = AtomicDir::create(target, force)?;
        std::fs::write(dir.path().join(file), file).unwrap();
        dir.commit()
    }

    #[test]
    fn contents_appear_only_on_commit() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let dir = AtomicDir::create(&target, false).unwrap();
        std::fs::write(dir.path().join("a"), b"a").unwrap();
        let staging = entries(root.path());
        assert_eq!(staging.len(), 1);
        assert!(staging[0].starts_with(".out.partial-"), "{staging:?}");
        assert!(!target.exists());
        assert_eq!(dir.commit().unwrap(), target);
        assert_eq!(entries(root.path()), ["out"]);
        assert_eq!(entries(&target), ["a"]);
    }

    #[test]
    fn an_uncommitted_directory_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = AtomicDir::create(&root.path().join("out"), false).unwrap();
        std::fs::write(dir.path().join("a"), b"a").unwrap();
        drop(dir);
        assert!(entries(root.path()).is_empty());
    }

    #[test]
    fn an_existing_target_is_replaced_only_with_force() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        stage(&target, false, "old").unwrap();
        let refused = stage(&target, false, "new").unwrap_err();
        assert!(
            matches!(refused, AtomicDirError::NotEmpty { .. }),
            "{refused}"
        );
        assert_eq!(entries(&target), ["old"]);
        stage(&target, true, "new").unwrap();
        assert_eq!(entries(&target), ["new"]);
        assert_eq!(entries(root.path()), ["out"]);
    }

    #[test]
    fn an_empty_directory_is_filled_and_a_file_needs_force() {
        let root = tempfile::tempdir().unwrap();
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        stage(&empty, false, "a").unwrap();
        assert_eq!(entries(&empty), ["a"]);

        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let refused = stage(&file, false, "a").unwrap_err();
        assert!(
            matches!(refused, AtomicDirError::NotDir { .. }),
            "{refused}"
        );
        stage(&file, true, "a").unwrap();
        assert_eq!(entries(&file), ["a"]);
    }
}
