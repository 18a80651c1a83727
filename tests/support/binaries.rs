//! Where the integration tests find the workspace's other programs, `marengo-export` and
//! `marengoctl` (they belong to other packages, so Cargo gives no `CARGO_BIN_EXE_` for them);
//! shared by the test binaries (included with `#[path]`, since each test is its own crate).

#![allow(dead_code)] // Each test binary uses one of the programs or the other.

use std::path::{Path, PathBuf};

/// The workspace's exporter. `MARENGO_EXPORT` overrides it: the aarch64 run under qemu-user
/// uses the host's exporter, since the bundle it writes is the same.
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

/// A program of the workspace, built next to the test binary by `cargo test --workspace`.
fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the workspace's tests (`cargo test --workspace`), which build it",
        path.display()
    );
    path
}
