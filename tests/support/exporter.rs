//! Where the integration tests find the real `marengo-export` binary, shared by every test
//! binary that makes bundles (included with `#[path]`, since each test is its own crate).

use std::path::{Path, PathBuf};

/// The workspace's exporter, built next to the test binary by `cargo test --workspace`.
/// `MARENGO_EXPORT` overrides it: the aarch64 run under qemu-user uses the host's exporter,
/// since the bundle it writes is the same.
pub fn marengo_export() -> PathBuf {
    if let Some(path) = std::env::var_os("MARENGO_EXPORT") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let export = profile_dir.join("marengo-export");
    assert!(
        export.is_file(),
        "{} is missing: run the workspace's tests (`cargo test --workspace`), which build it",
        export.display()
    );
    export
}
