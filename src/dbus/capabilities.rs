//! The `Capabilities` property: what this daemon accepts and offers, so that a client written
//! for a newer daemon can adapt to an older one instead of learning from refusals. Its options
//! are [`OPTIONS`], the table the parser reads; nothing here is written twice.

use std::collections::HashMap;

use zbus::{OwnedVariant, Variant};

use super::options::{MAX_STOP_STRINGS, OPTIONS, OptionSpec};

/// Optional abilities a client may test for, beyond the methods every version has.
pub const FEATURES: &[&str] = &["stream", "cancel", "stop", "seed"];

/// Constrained decoding: the names of its options (`json_schema`, `regex`, `grammar`), each
/// listed once its option is in [`OPTIONS`].
pub const STRUCTURED_OUTPUT_FEATURES: &[&str] = &["json_schema", "regex", "grammar"];

/// The figures of this daemon that bound a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tokens of prompt and answer together.
    pub context_length: u32,
    /// `max_tokens` of a request that does not set it.
    pub default_max_tokens: u32,
    pub queue_capacity: u32,
    pub max_queued_per_client: u32,
    /// Requests generated together, each in its own KV cache slot.
    pub parallel: u32,
    /// The most the slots' KV caches may hold, in MiB.
    pub kv_memory_mib: u32,
}

/// The property's value: `options` (name → type, default, bounds, description, example),
/// `limits` and `features`. `has_chat_template` adds the feature `chat`: without a template
/// `Chat` is refused.
pub fn capabilities(limits: &Limits, has_chat_template: bool) -> HashMap<String, OwnedVariant> {
    let options: HashMap<String, Variant<'static>> = OPTIONS
        .iter()
        .map(|spec| {
            (
                spec.name.to_owned(),
                option(spec, limits.default_max_tokens),
            )
        })
        .collect();
    let figures = HashMap::from([
        ("context_length", limits.context_length),
        // A prompt takes at least one position of the context.
        ("max_tokens", limits.context_length.saturating_sub(1)),
        ("queue_capacity", limits.queue_capacity),
        ("max_queued_per_client", limits.max_queued_per_client),
        ("parallel", limits.parallel),
        ("kv_memory_mib", limits.kv_memory_mib),
        (
            "max_stop_strings",
            u32::try_from(MAX_STOP_STRINGS).unwrap_or(u32::MAX),
        ),
    ]);
    let mut features: Vec<&str> = FEATURES
        .iter()
        .chain(STRUCTURED_OUTPUT_FEATURES)
        .copied()
        .collect();
    if has_chat_template {
        features.push("chat");
    }
    HashMap::from([
        ("options".to_owned(), owned(Variant::from(options))),
        ("limits".to_owned(), owned(Variant::from(figures))),
        ("features".to_owned(), owned(Variant::from(features))),
    ])
}

fn option(spec: &OptionSpec, default_max_tokens: u32) -> Variant<'static> {
    let mut fields = HashMap::from([
        ("type", Variant::from(spec.signature)),
        ("description", Variant::from(spec.description)),
        ("example", spec.example.to_variant()),
    ]);
    if let Some(default) = (spec.default)(default_max_tokens) {
        fields.insert("default", default.to_variant());
    }
    if let Some(bounds) = spec.bounds {
        fields.insert("minimum", bounds.min.to_variant());
        fields.insert("maximum", bounds.max.to_variant());
        fields.insert("minimum_excluded", Variant::from(bounds.min_excluded));
        fields.insert("range", Variant::from(bounds.words));
    }
    Variant::from(fields)
}

/// Only file descriptors fail to convert, and there are none here.
fn owned(value: Variant<'static>) -> OwnedVariant {
    OwnedVariant::try_from(value).expect("a value without file descriptors converts")
}
