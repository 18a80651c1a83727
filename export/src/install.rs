//! `convert --install NAME`: where a bundle goes so that marengod finds it as the model NAME.
//!
//! The directories are the daemon's (`marengod serve --help`): root installs for the system
//! service in `/var/lib/marengo/models`, any other user for their own session daemon in
//! `$XDG_DATA_HOME/marengo/models`. The bundle is written like every export, staged in a hidden
//! directory and renamed into place, and the daemon skips hidden entries: an interrupted
//! install is never listed as a model.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The system daemon's own models directory (packaged models live in `/usr/share`).
pub const SYSTEM_MODELS_DIR: &str = "/var/lib/marengo/models";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "`{0}` cannot name a model: use a non-empty name without `/` that does not start \
         with `.`"
    )]
    BadName(String),
    #[error("neither XDG_DATA_HOME nor HOME is set: pass --models-dir")]
    NoDataHome,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The bundle directory of model `name` in `models_dir`, or in the default models directory of
/// the user running the exporter.
pub fn target(name: &str, models_dir: Option<&Path>) -> Result<PathBuf, InstallError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(InstallError::BadName(name.to_owned()));
    }
    let dir = match models_dir {
        Some(dir) => dir.to_owned(),
        None if is_root() => PathBuf::from(SYSTEM_MODELS_DIR),
        None => user_models_dir().ok_or(InstallError::NoDataHome)?,
    };
    Ok(dir.join(name))
}

/// Lets every user read the installed bundle: the system daemon runs as the user `marengo`,
/// and a staged directory is private to its creator.
pub fn make_readable(bundle: &Path) -> Result<(), InstallError> {
    std::fs::set_permissions(bundle, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        InstallError::Io {
            path: bundle.to_owned(),
            source,
        }
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn user_models_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .map(|data| data.join("marengo").join("models"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_or_hide_are_refused() {
        for name in ["", "a/b", "..", ".hidden"] {
            assert!(matches!(
                target(name, Some(Path::new("/m"))),
                Err(InstallError::BadName(_))
            ));
        }
        assert_eq!(
            target("smollm2", Some(Path::new("/m"))).unwrap(),
            PathBuf::from("/m/smollm2")
        );
    }
}
