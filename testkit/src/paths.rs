//! Where a test finds the repository and its fixtures, and where it writes.

use std::path::{Path, PathBuf};

/// The repository root, the workspace that holds `testkit/`.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent directory")
}

/// The committed fixtures, `tests/fixtures/`.
pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// The directory of the test binary's build profile (`target/<profile>`, or
/// `target/<triple>/<profile>` in a cross build), where cargo also puts the workspace's programs.
pub(crate) fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf()
}

/// The running test binary's name without cargo's hash (`client_disconnect_cancels`).
pub(crate) fn test_binary() -> String {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "test".into());
    match stem.rsplit_once('-') {
        Some((name, _hash)) => name.to_owned(),
        None => stem,
    }
}

/// A fresh, empty directory `name` for one test, under `target/<profile>/tmp/<test binary>/`:
/// it outlives the test for a look after a failure, and is emptied when the test runs again.
/// Readable by other users (the system-bus test runs the daemon as another user).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = profile_dir().join("tmp").join(test_binary()).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}
