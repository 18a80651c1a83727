//! marengo: offline, on-device text generation.
//!
//! The crate is layered so that each piece can be read alone (see `ARCHITECTURE.md`). The
//! bundle format it reads is the `marengo-bundle` crate, shared with the exporter.

pub mod memory;

pub mod batch;
pub mod chat;
pub mod config;
pub mod constraint;
pub mod dbus;
pub mod engine;
pub mod kernels;
pub mod model;
pub mod models;
pub mod perplexity;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod serve;
pub mod systemd;
pub mod text;
pub mod tokenizer;
