//! `marengo-export` as the tests drive it: a deterministic random checkpoint from a committed
//! tiny config (`synth`), turned into a bundle (`convert`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries;
use crate::command::{run, run_fails};
use crate::paths::fixtures;

/// Runs `marengo-export ARGS…` and returns its standard output.
#[track_caller]
pub fn marengo_export<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(binaries::marengo_export()).args(args))
}

/// Runs `marengo-export ARGS…` expecting failure; returns its standard error.
#[track_caller]
pub fn marengo_export_fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_fails(Command::new(binaries::marengo_export()).args(args))
}

/// `marengo-export synth --config CONFIG --out OUT EXTRA…`: a deterministic random checkpoint.
#[track_caller]
pub fn synth(config: &Path, out: &Path, extra: &[String]) {
    let mut args = vec![
        "synth".into(),
        "--config".into(),
        config.as_os_str().to_owned(),
        "--out".into(),
        out.as_os_str().to_owned(),
    ];
    args.extend(extra.iter().map(Into::into));
    marengo_export(args);
}

/// `marengo-export convert CHECKPOINT --out BUNDLE EXTRA…`.
#[track_caller]
pub fn convert(checkpoint: &Path, bundle: &Path, extra: &[&str]) {
    let mut args = vec![
        "convert".into(),
        checkpoint.as_os_str().to_owned(),
        "--out".into(),
        bundle.as_os_str().to_owned(),
    ];
    args.extend(extra.iter().map(Into::into));
    marengo_export(args);
}

/// The committed tiny config `tests/fixtures/tiny/<name>/config.json` (`mistral-gqa`,
/// `llama-tied`).
pub fn tiny_config(name: &str) -> PathBuf {
    fixtures().join("tiny").join(name).join("config.json")
}

/// The committed Mistral-7B v0.1 tokenizer, which fits both tiny configs' 32000-token vocab.
pub fn tokenizer_fixture() -> PathBuf {
    fixtures().join("mistral-7b-v0.1/tokenizer.json")
}

/// Synthesizes the tiny checkpoint `name` into `out` with the tokenizer and `extra` synth flags.
#[track_caller]
pub fn tiny_checkpoint(name: &str, out: &Path, extra: &[&str]) {
    let mut args: Vec<String> = vec![
        "--tokenizer".into(),
        tokenizer_fixture().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    synth(&tiny_config(name), out, &args);
}
