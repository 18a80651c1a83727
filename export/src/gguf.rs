//! GGUF, llama.cpp's single-file checkpoint format: a header, typed metadata (hyperparameters,
//! the tokenizer, the chat template) and block-quantized tensors.
//!
//! The file is memory-mapped and parsed once into an index ([`reader`]); tensors are dequantized
//! to f32 one at a time ([`dequant`]), so reading a model costs one tensor of memory beyond the
//! page cache. Everything a file claims about itself (counts, lengths, shapes, offsets) is checked
//! against its size before it sizes an allocation: a malformed or hostile file yields a
//! [`GgufError`] naming what is wrong, never a panic. [`tokenizer`] rebuilds a HuggingFace
//! `tokenizer.json` from the tokenizer metadata, and [`pretokenizer`] translates llama.cpp's
//! pre-tokenizer names into the splitting rules they stand for.
//!
//! Format reference: the GGUF specification in the ggml repository (`docs/gguf.md`).

pub mod dequant;
pub mod pretokenizer;
pub mod reader;
pub mod tokenizer;
pub mod value;

pub use dequant::{DequantError, GgmlType};
pub use reader::{FormatError, GgufError, GgufFile, GgufIndex, TensorInfo};
pub use value::{Array, Value};
