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

/// A fresh, empty directory `name` for one test, under `target/tmp/` (`target/<triple>/tmp/`
/// in a cross build): it outlives the test for a look after a failure, and is emptied when the
/// test runs again. Kept short on purpose: the D-Bus tests put Unix sockets in it, whose paths
/// may not exceed 107 bytes. Test binaries run one after another, so names need only be unique
/// within one binary. Readable by other users (the system-bus test runs the daemon as another
/// user).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = profile_dir()
        .parent()
        .expect("a profile directory has a parent")
        .join("tmp")
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Where the test data fetched from package registries is cached (`.ci/*.sh` fill it):
/// `MARENGO_CACHE`, else `$XDG_CACHE_HOME/marengo`, else `~/.cache/marengo`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MARENGO_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("marengo")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/marengo")))
        .expect("neither MARENGO_CACHE, XDG_CACHE_HOME nor HOME is set")
}
