//! The bundle format: a directory with `model.onnx`, `model.weights`, `tokenizer.json` and
//! `bundle.json`. See `ARCHITECTURE.md` for the layout.

pub mod manifest;
