//! Where the tests find the workspace's programs. Cargo gives `CARGO_BIN_EXE_<name>` only to
//! the tests of the package that has the binary, so they are found next to the test binary,
//! where `cargo test` builds them (`cargo test --workspace` builds all three).

use std::path::PathBuf;

use crate::paths::profile_dir;

/// The exporter. `MARENGO_EXPORT` overrides it: the aarch64 run under qemu-user uses the host's
/// exporter, since the bundle it writes is the same.
pub fn marengo_export() -> PathBuf {
    if let Some(path) = std::env::var_os("MARENGO_EXPORT") {
        return PathBuf::from(path);
    }
    workspace_binary("marengo-export")
}

/// The command-line client (package marengo-client).
pub fn marengoctl() -> PathBuf {
    workspace_binary("marengoctl")
}

/// The daemon (package marengo).
pub fn marengod() -> PathBuf {
    workspace_binary("marengod")
}

#[track_caller]
fn workspace_binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it (`cargo build --release -p marengo-export -p marengo-client \
         --bins`) or run the workspace's tests (`cargo test --workspace`), which build it",
        path.display()
    );
    path
}
