//! The defaults of a request's options, the same for every entry point: a D-Bus request that
//! leaves an option out, `marengoctl` without the flag and `marengod generate` without it all
//! get these. The daemon's sampler is built from them and its `Capabilities` property states
//! them; they live here so that `marengoctl --help` can state them without linking model code.
//!
//! They sample, as llama.cpp's and ollama's defaults do: greedy decoding on small models falls
//! into loops within a few sentences, and app developers porting from those tools get the same
//! behaviour for the same options. A repeatable answer is one option away: `temperature` 0
//! (greedy) or a `seed`.

/// `temperature`: 0 is greedy.
pub const TEMPERATURE: f64 = 0.8;
/// `top_k`: 0 keeps all tokens.
pub const TOP_K: u32 = 40;
/// `top_p`: 1 keeps all tokens.
pub const TOP_P: f64 = 0.95;
/// `min_p`: 0 keeps all tokens.
pub const MIN_P: f64 = 0.05;
/// `repeat_penalty`: 1 is off.
pub const REPEAT_PENALTY: f64 = 1.0;
/// `max_tokens` when the daemon's settings do not change it (key `default_max_tokens`).
pub const MAX_TOKENS: u32 = 512;
