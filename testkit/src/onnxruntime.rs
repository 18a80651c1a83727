//! onnxruntime (and the other Python references) as the second engine: scripts of
//! `tests/python/` run with the project's venv (`.venv`, made by `.ci/python-venv.sh`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::run;
use crate::paths::repo_root;

/// The venv's interpreter. A missing venv fails the test: the reference engine is part of what
/// the test checks, so it must never silently pass without it.
#[track_caller]
pub fn venv_python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/python-venv.sh to create the onnxruntime venv the tests need",
        python.display()
    );
    python
}

/// Runs `tests/python/<script> ARGS…` with the venv's interpreter and returns its stdout.
#[track_caller]
pub fn python_script<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let path = repo_root().join("tests/python").join(script);
    run(Command::new(venv_python()).arg(path).args(args))
}

/// Raw little-endian f32 values, as the scripts' `--logits-out` options write them.
#[track_caller]
pub fn read_f32_le(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(
        bytes.len() % 4,
        0,
        "{}: length not a multiple of 4",
        path.display()
    );
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// What onnxruntime generated: the greedy tokens and, row by row, the `[steps, vocab]` logits
/// each was taken from.
pub struct OrtGreedy {
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
}

/// `steps` greedy tokens after `prompt` by `tests/python/ort_generate.py`; `threads` 0 leaves
/// onnxruntime its default.
#[track_caller]
pub fn ort_greedy(bundle: &Path, prompt: &[u32], steps: usize, threads: usize) -> OrtGreedy {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let logits_file = scratch.path().join("ort-greedy-logits.f32");
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut args: Vec<&OsStr> = vec!["--bundle".as_ref(), bundle.as_os_str()];
    let ids = ids.join(",");
    let steps = steps.to_string();
    let threads = threads.to_string();
    args.extend::<[&OsStr; 8]>([
        "--prompt-ids".as_ref(),
        ids.as_ref(),
        "--max-new-tokens".as_ref(),
        steps.as_ref(),
        "--greedy-logits-out".as_ref(),
        logits_file.as_os_str(),
        "--threads".as_ref(),
        threads.as_ref(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&python_script("ort_generate.py", args))
        .expect("ort_generate.py prints JSON");
    let tokens = report["greedy"]
        .as_array()
        .expect("ort_generate.py reports its greedy ids")
        .iter()
        .map(|v| v.as_u64().expect("a token id") as u32)
        .collect();
    OrtGreedy {
        tokens,
        logits: read_f32_le(&logits_file),
    }
}
