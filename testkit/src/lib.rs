//! What marengo's integration tests share, as one crate that tests depend on like any other
//! (each integration test is its own crate, so shared code included by path would be compiled
//! into every test binary and half of it flagged as dead).
//!
//! - [`run`]: a helper program run to the end, failing the test with its command line and
//!   standard error.
//! - [`repo_root`], [`fixtures`], [`scratch_dir`]: where the repository, its committed fixtures
//!   and a test's own fresh directory are.
//! - [`binaries`]: the workspace's programs (`marengo-export`, `marengoctl`, `marengod`).
//! - [`exporter`]: `marengo-export` driven as the tests drive it (synth, convert, tiny
//!   checkpoints); [`tiny_bundle`]: a tiny bundle of a given [`Kind`], made once per test binary.
//! - [`onnxruntime`]: the second engine (the project's Python venv) and its files.
//! - [`smollm2_bundle`]: SmolLM2-135M-Instruct as an FP8 bundle, made once per test binary.
//! - [`argmax`], [`max_abs_diff`]: comparing logits, NaN included.
//! - [`files`]: digests and listings of files a test wrote.
//! - [`example_clients`]: the clients of `examples/clients/` (Python, GJS, C) as commands.
//! - `dbus` (feature `dbus`): a private `dbus-daemon`, the real `marengod` on it and a client
//!   that collects a request's stream.

pub mod binaries;
mod command;
#[cfg(feature = "dbus")]
pub mod dbus;
pub mod example_clients;
pub mod exporter;
pub mod files;
mod logits;
pub mod onnxruntime;
mod paths;
mod smollm2;
mod tiny;

pub use command::{run, run_fails};
pub use logits::{argmax, max_abs_diff};
pub use paths::{cache_dir, fixtures, repo_root, scratch_dir};
pub use smollm2::{smollm2_bundle, smollm2_gguf};
pub use tiny::{Kind, tiny_bundle};
