//! The tiny bundle most tests run: a Mistral-shaped model (`tests/fixtures/tiny/mistral-gqa`)
//! with random weights, the real Mistral tokenizer and its chat template, made by the real
//! exporter. Its text is gibberish but deterministic under greedy sampling.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::command::run;
use crate::exporter::{convert, tiny_checkpoint};
use crate::paths::{fixtures, scratch_dir};

/// How a bundle stores its linear weights, as `marengo-export convert` is asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// FP8 E4M3 with one scale per output channel (the exporter's default).
    Fp8,
    /// FP8 E4M3 with one scale per block of this many input features.
    Fp8Block(u32),
    /// Unquantized f32, the reference the FP8 kinds are measured against.
    F32,
}

impl Kind {
    /// The `marengo-export convert` flags that make this kind.
    pub fn convert_args(self) -> Vec<String> {
        match self {
            Kind::Fp8 => Vec::new(),
            Kind::Fp8Block(block) => vec!["--block".into(), block.to_string()],
            Kind::F32 => vec!["--dtype".into(), "f32".into()],
        }
    }

    /// Converts `checkpoint` into a bundle of this kind at `out`.
    #[track_caller]
    pub fn convert(self, checkpoint: &Path, out: &Path) {
        let args = self.convert_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        convert(checkpoint, out, &args);
    }
}

/// The kind as the tests label it: `fp8`, `fp8-block32`, `f32`.
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Fp8 => f.write_str("fp8"),
            Kind::Fp8Block(block) => write!(f, "fp8-block{block}"),
            Kind::F32 => f.write_str("f32"),
        }
    }
}

/// The tiny bundle of `kind`, made once per test binary (the tests of one binary share it and
/// must not change it), world-readable for the daemon run as another user.
pub fn tiny_bundle(kind: Kind) -> &'static Path {
    static BUNDLES: Mutex<Option<HashMap<Kind, &'static Path>>> = Mutex::new(None);
    let mut bundles = BUNDLES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let bundles = bundles.get_or_insert_with(HashMap::new);
    if let Some(bundle) = bundles.get(&kind) {
        return bundle;
    }
    let bundle: &'static Path = Box::leak(make_tiny_bundle(kind).into_boxed_path());
    bundles.insert(kind, bundle);
    bundle
}

#[track_caller]
fn make_tiny_bundle(kind: Kind) -> PathBuf {
    let dir = scratch_dir(&format!("tiny-bundle-{kind}"));
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("mistral-gqa", &checkpoint, &["--seed", "11"]);
    let template = fixtures().join("mistral-7b-v0.1/tokenizer_config.json");
    std::fs::copy(&template, checkpoint.join("tokenizer_config.json"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", template.display()));
    let bundle = dir.join("bundle");
    kind.convert(&checkpoint, &bundle);
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(&dir));
    bundle
}
