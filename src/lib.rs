//! marengo: offline, on-device text generation.
//!
//! The crate is layered so that each piece can be read alone (see `ARCHITECTURE.md`):
//! the bundle format is shared with the exporter; everything that runs a model sits behind
//! the `engine` feature so that `marengo-export` builds without tract.

pub mod bundle;
pub mod memory;
pub mod onnx_proto;

#[cfg(feature = "engine")]
pub mod chat;
#[cfg(feature = "engine")]
pub mod config;
#[cfg(feature = "engine")]
pub mod dbus;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod kernels;
#[cfg(feature = "engine")]
pub mod model;
#[cfg(feature = "engine")]
pub mod sampler;
#[cfg(feature = "engine")]
pub mod scheduler;
#[cfg(feature = "engine")]
pub mod serve;
#[cfg(feature = "engine")]
pub mod session;
#[cfg(feature = "engine")]
pub mod systemd;
#[cfg(feature = "engine")]
pub mod tokenizer;
