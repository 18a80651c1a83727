//! marengo-export: turns a HuggingFace Mistral/Llama checkpoint into a marengo bundle.
//!
//! The pipeline is one module per stage: [`checkpoint`] readers hand out one tensor at a time,
//! [`quant`] encodes it, [`writer`] appends it to the bundle being built, [`graph`] describes the
//! network over those tensors, and [`convert`] drives the whole. [`synth`] makes random
//! checkpoints for tests and benchmarks; [`merge`] makes a SLERP merge of two checkpoints, as a
//! checkpoint of its own or as a source for the converter; both write it through
//! [`hf_writer`]. Bundles and merged checkpoints appear at their target whole or not at all
//! ([`atomic_dir`]); [`install`] names the target in marengod's models directories.

pub mod atomic_dir;
pub mod checkpoint;
pub mod convert;
pub mod gguf;
pub mod graph;
pub mod hf_writer;
pub mod inspect;
pub mod install;
pub mod merge;
pub mod progress;
pub mod quant;
pub mod synth;
pub mod writer;
