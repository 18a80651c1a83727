//! onnxruntime as the second engine: greedy generation from a bundle by
//! `tests/python/ort_generate.py` in the project's venv, shared by the tests that compare
//! marengo with it (included with `#[path]`, since each test is its own crate, next to
//! `support/command.rs` as `mod command`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::run;

/// What onnxruntime generated: the greedy tokens and, row by row, the `[steps, vocab]` logits
/// each was taken from.
pub struct OrtGreedy {
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
}

/// `steps` greedy tokens after `prompt`; `threads` 0 leaves onnxruntime its default.
pub fn ort_greedy(bundle: &Path, prompt: &[u32], steps: usize, threads: usize) -> OrtGreedy {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = repo.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/python-venv.sh",
        python.display()
    );
    let scratch = tempfile::tempdir().expect("scratch dir");
    let logits_file: PathBuf = scratch.path().join("ort-greedy-logits.f32");
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut command = Command::new(python);
    command
        .arg(repo.join("tests/python/ort_generate.py"))
        .arg("--bundle")
        .arg(bundle)
        .arg("--prompt-ids")
        .arg(ids.join(","))
        .arg("--max-new-tokens")
        .arg(steps.to_string())
        .arg("--greedy-logits-out")
        .arg(&logits_file)
        .arg("--threads")
        .arg(threads.to_string());
    let report: serde_json::Value =
        serde_json::from_str(&run(&mut command)).expect("ort_generate.py prints JSON");
    let tokens = report["greedy"]
        .as_array()
        .expect("greedy")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    let logits = std::fs::read(&logits_file)
        .expect("ort logits")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    OrtGreedy { tokens, logits }
}
