//! The `a{sv}` options of `Generate`, `Chat` and `Complete`: one table, [`OPTIONS`], from
//! which the parser, the `Capabilities` property and the unknown-option refusal are all made,
//! so that an option is added by adding its row.
//!
//! D-Bus clients do not agree on integer widths: `gdbus call` turns `<64>` into an `i32`,
//! `busctl` sends whatever signature the user typed, zbus sends the Rust type. Integer options
//! therefore accept every integer type whose value fits, and floating-point options accept
//! integers too (`temperature <1>`); anything else — a string, a boolean, a double where a
//! count is meant — is refused, naming the key, rather than guessed at.

use std::collections::HashMap;

use marengo_client::defaults;
use zbus::{OwnedVariant, Variant};

use super::Llm1Error;
use crate::constraint::ConstraintSpec;
use crate::request::RequestOptions;
use crate::sampler::ranges::{self, Range};

/// The most stop strings a request may carry; each is matched against every new piece of text.
pub const MAX_STOP_STRINGS: usize = 16;

/// A value of the table (a default, a bound, an example), typed as its option is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    U32(u32),
    U64(u64),
    F64(f64),
    Str(&'static str),
    Strs(&'static [&'static str]),
}

impl Value {
    pub fn to_variant(self) -> Variant<'static> {
        match self {
            Value::U32(n) => Variant::U32(n),
            Value::U64(n) => Variant::U64(n),
            Value::F64(x) => Variant::F64(x),
            Value::Str(s) => Variant::from(s),
            Value::Strs(strings) => Variant::from(strings.to_vec()),
        }
    }
}

/// The values an option allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub min: Value,
    /// Whether `min` itself is refused.
    pub min_excluded: bool,
    pub max: Value,
    /// The range in words, as a refusal states it.
    pub words: &'static str,
}

impl Bounds {
    const fn of(range: Range) -> Bounds {
        Bounds {
            min: Value::F64(range.min as f64),
            min_excluded: range.min_excluded,
            max: Value::F64(range.max as f64),
            words: range.words,
        }
    }
}

/// One accepted option.
pub struct OptionSpec {
    pub name: &'static str,
    /// The D-Bus type to send; narrower or wider integers are accepted where they fit.
    pub signature: &'static str,
    pub description: &'static str,
    /// The value a request that leaves the option out gets, given the daemon's
    /// `default_max_tokens`; `None` when leaving it out means something no value says (a seed
    /// drawn at random, no constraint).
    pub default: fn(u32) -> Option<Value>,
    pub bounds: Option<Bounds>,
    /// A value the option accepts, for documentation and for the test that sends every option.
    pub example: Value,
    parse: fn(&str, &Variant<'_>, &mut RequestOptions) -> Result<(), Llm1Error>,
}

/// Every option a request may carry. Structured output adds its rows here.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "model",
        signature: "s",
        description: "The model to run the request on, a name from the Models property; the \
                      default model when left out.",
        default: |_| None,
        bounds: None,
        example: Value::Str("smollm2"),
        parse: |key, value, options| {
            options.model = Some(string(key, value)?);
            Ok(())
        },
    },
    OptionSpec {
        name: "max_tokens",
        signature: "u",
        description: "The most tokens to generate; generation also ends when the context is full.",
        default: |default_max_tokens| Some(Value::U32(default_max_tokens)),
        bounds: Some(Bounds {
            min: Value::U32(1),
            min_excluded: false,
            max: Value::U32(u32::MAX),
            words: "1 to 4294967295",
        }),
        example: Value::U32(16),
        parse: |key, value, options| {
            let n = unsigned(key, value, u32::MAX as u64)? as u32;
            if n == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
            options.max_tokens = Some(n);
            Ok(())
        },
    },
    OptionSpec {
        name: "temperature",
        signature: "d",
        description: "Flattens (above 1) or sharpens (below 1) the distribution; 0 is greedy.",
        default: |_| Some(Value::F64(defaults::TEMPERATURE)),
        bounds: Some(Bounds::of(ranges::TEMPERATURE)),
        example: Value::F64(0.0),
        parse: |key, value, options| {
            options.temperature = Some(float(key, value)?);
            Ok(())
        },
    },
    OptionSpec {
        name: "top_k",
        signature: "u",
        description: "Sample among the K most likely tokens; 0 keeps all.",
        default: |_| Some(Value::U32(defaults::TOP_K)),
        bounds: Some(Bounds {
            min: Value::U32(0),
            min_excluded: false,
            max: Value::U32(u32::MAX),
            words: "0 (off) to 4294967295",
        }),
        example: Value::U32(40),
        parse: |key, value, options| {
            options.top_k = Some(unsigned(key, value, u32::MAX as u64)? as u32);
            Ok(())
        },
    },
    OptionSpec {
        name: "top_p",
        signature: "d",
        description: "Nucleus sampling: the most likely tokens whose probabilities reach P; 1 keeps all.",
        default: |_| Some(Value::F64(defaults::TOP_P)),
        bounds: Some(Bounds::of(ranges::TOP_P)),
        example: Value::F64(0.9),
        parse: |key, value, options| {
            options.top_p = Some(float(key, value)?);
            Ok(())
        },
    },
    OptionSpec {
        name: "min_p",
        signature: "d",
        description: "Drops tokens less likely than P times the most likely one; 0 keeps all.",
        default: |_| Some(Value::F64(defaults::MIN_P)),
        bounds: Some(Bounds::of(ranges::MIN_P)),
        example: Value::F64(0.1),
        parse: |key, value, options| {
            options.min_p = Some(float(key, value)?);
            Ok(())
        },
    },
    OptionSpec {
        name: "repeat_penalty",
        signature: "d",
        description: "Penalizes the last 64 tokens (prompt included); 1 is off.",
        default: |_| Some(Value::F64(defaults::REPEAT_PENALTY)),
        bounds: Some(Bounds::of(ranges::REPEAT_PENALTY)),
        example: Value::F64(1.1),
        parse: |key, value, options| {
            options.repeat_penalty = Some(float(key, value)?);
            Ok(())
        },
    },
    OptionSpec {
        name: "seed",
        signature: "t",
        description: "Seed of the random generator, for a repeatable sampled text; without it \
                      one is drawn at random.",
        default: |_| None,
        bounds: Some(Bounds {
            min: Value::U64(0),
            min_excluded: false,
            max: Value::U64(u64::MAX),
            words: "0 to 18446744073709551615",
        }),
        example: Value::U64(42),
        parse: |key, value, options| {
            options.seed = Some(unsigned(key, value, u64::MAX)?);
            Ok(())
        },
    },
    OptionSpec {
        name: "stop",
        signature: "as",
        description: "Ends the text before the first of these strings (at most 16, none empty).",
        default: |_| Some(Value::Strs(&[])),
        bounds: None,
        example: Value::Strs(&["\n\n"]),
        parse: |key, value, options| {
            options.stop = strings(key, value)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "json_schema",
        signature: "s",
        description: "A JSON schema (as JSON text) the answer must match; the text ends when \
                      the object is complete. At most one of json_schema, regex and grammar.",
        default: |_| None,
        bounds: None,
        example: Value::Str(
            r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}"#,
        ),
        parse: |key, value, options| {
            constrain(options, ConstraintSpec::JsonSchema(string(key, value)?))
        },
    },
    OptionSpec {
        name: "regex",
        signature: "s",
        description: "A regular expression the whole answer must match. At most one of \
                      json_schema, regex and grammar.",
        default: |_| None,
        bounds: None,
        example: Value::Str("(yes|no)"),
        parse: |key, value, options| constrain(options, ConstraintSpec::Regex(string(key, value)?)),
    },
    OptionSpec {
        name: "grammar",
        signature: "s",
        description: "A Lark grammar, as llguidance reads it, the answer must match. At most one \
                      of json_schema, regex and grammar.",
        default: |_| None,
        bounds: None,
        example: Value::Str("start: \"yes\" | \"no\""),
        parse: |key, value, options| {
            constrain(options, ConstraintSpec::Grammar(string(key, value)?))
        },
    },
];

impl RequestOptions {
    /// Parses and type-checks `options` row by row of [`OPTIONS`]. Ranges of the sampling
    /// parameters are the sampler's to decide and are checked where the request is prepared.
    pub fn parse(options: &HashMap<String, OwnedVariant>) -> Result<Self, Llm1Error> {
        let mut parsed = Self::default();
        for (key, value) in options {
            let spec = OPTIONS
                .iter()
                .find(|spec| spec.name == key)
                .ok_or_else(|| unknown(key))?;
            (spec.parse)(key, value, &mut parsed)?;
        }
        Ok(parsed)
    }
}

fn unknown(key: &str) -> Llm1Error {
    let known: Vec<&str> = OPTIONS.iter().map(|spec| spec.name).collect();
    Llm1Error::InvalidOption(format!(
        "unknown option `{key}` (known: {}; the Capabilities property lists them)",
        known.join(", ")
    ))
}

pub(super) fn invalid(key: &str, why: &str) -> Llm1Error {
    Llm1Error::InvalidOption(format!("option `{key}` {why}"))
}

fn wrong_type(key: &str, value: &Variant<'_>, expected: &str) -> Llm1Error {
    invalid(
        key,
        &format!(
            "must be {expected}, not a value of type `{}`",
            value.value_signature()
        ),
    )
}

/// Any integer type, as long as the value is within `0..=max`.
fn unsigned(key: &str, value: &Variant<'_>, max: u64) -> Result<u64, Llm1Error> {
    let n: i128 = match *value {
        Variant::U8(n) => n.into(),
        Variant::U16(n) => n.into(),
        Variant::I16(n) => n.into(),
        Variant::U32(n) => n.into(),
        Variant::I32(n) => n.into(),
        Variant::U64(n) => n.into(),
        Variant::I64(n) => n.into(),
        _ => return Err(wrong_type(key, value, "an unsigned integer (u, t)")),
    };
    if n < 0 || n > i128::from(max) {
        return Err(invalid(key, &format!("is {n}, out of range 0..={max}")));
    }
    Ok(n as u64)
}

/// A double, or any integer type (converted), as long as it is finite.
fn float(key: &str, value: &Variant<'_>) -> Result<f64, Llm1Error> {
    let x = match *value {
        Variant::F64(x) => x,
        Variant::U8(n) => n.into(),
        Variant::U16(n) => n.into(),
        Variant::I16(n) => n.into(),
        Variant::U32(n) => n.into(),
        Variant::I32(n) => n.into(),
        Variant::U64(n) => n as f64,
        Variant::I64(n) => n as f64,
        _ => return Err(wrong_type(key, value, "a number (d)")),
    };
    if !x.is_finite() {
        return Err(invalid(key, &format!("is {x}, not a finite number")));
    }
    Ok(x)
}

/// Sets the request's one structured-output constraint: two would each allow what the other
/// forbids, and no order of applying them is obviously right.
fn constrain(parsed: &mut RequestOptions, spec: ConstraintSpec) -> Result<(), Llm1Error> {
    if let Some(earlier) = &parsed.constraint {
        return Err(Llm1Error::InvalidOption(format!(
            "options `{}` and `{}` cannot be combined: give at most one of json_schema, regex \
             and grammar",
            earlier.option(),
            spec.option()
        )));
    }
    parsed.constraint = Some(spec);
    Ok(())
}

/// A non-empty string (`s`).
fn string(key: &str, value: &Variant<'_>) -> Result<String, Llm1Error> {
    let Variant::Str(s) = value else {
        return Err(wrong_type(key, value, "a string (s)"));
    };
    if s.is_empty() {
        return Err(invalid(key, "is empty"));
    }
    Ok(s.to_string())
}

/// An array of non-empty strings (`as`), at most [`MAX_STOP_STRINGS`] of them.
fn strings(key: &str, value: &Variant<'_>) -> Result<Vec<String>, Llm1Error> {
    let Variant::Array(array) = value else {
        return Err(wrong_type(key, value, "an array of strings (as)"));
    };
    let mut strings = Vec::with_capacity(array.len());
    for item in array.iter() {
        let Variant::Str(s) = item else {
            return Err(wrong_type(key, value, "an array of strings (as)"));
        };
        if s.is_empty() {
            return Err(invalid(key, "contains an empty string"));
        }
        strings.push(s.to_string());
    }
    if strings.len() > MAX_STOP_STRINGS {
        return Err(invalid(
            key,
            &format!(
                "has {} strings, at most {MAX_STOP_STRINGS} are allowed",
                strings.len()
            ),
        ));
    }
    Ok(strings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: Vec<(&str, Variant<'static>)>) -> HashMap<String, OwnedVariant> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), OwnedVariant::try_from(v).unwrap()))
            .collect()
    }

    fn refused_key(pairs: Vec<(&str, Variant<'static>)>) -> String {
        match RequestOptions::parse(&options(pairs)) {
            Err(Llm1Error::InvalidOption(message)) => message,
            other => panic!("expected InvalidOption, got {other:?}"),
        }
    }

    #[test]
    fn integer_widths_that_clients_send_are_accepted() {
        let parsed = RequestOptions::parse(&options(vec![
            ("max_tokens", Variant::I32(64)),
            ("top_k", Variant::U64(40)),
            ("seed", Variant::I64(7)),
            ("temperature", Variant::I32(1)),
            ("top_p", Variant::F64(0.9)),
            ("stop", Variant::from(vec!["\n\n", "User:"])),
            ("model", Variant::from("smollm2")),
        ]))
        .unwrap();
        assert_eq!(parsed.max_tokens, Some(64));
        assert_eq!(parsed.top_k, Some(40));
        assert_eq!(parsed.seed, Some(7));
        assert_eq!(parsed.temperature, Some(1.0));
        assert_eq!(parsed.top_p, Some(0.9));
        assert_eq!(parsed.stop, vec!["\n\n".to_owned(), "User:".to_owned()]);
        assert_eq!(parsed.model.as_deref(), Some("smollm2"));
    }

    #[test]
    fn wrong_kinds_and_ranges_are_refused_naming_the_key() {
        let cases: Vec<(&str, Variant<'static>)> = vec![
            ("max_tokens", Variant::from("64")),
            ("max_tokens", Variant::F64(64.0)),
            ("max_tokens", Variant::I32(-1)),
            ("max_tokens", Variant::U32(0)),
            ("max_tokens", Variant::U64(u64::from(u32::MAX) + 1)),
            ("seed", Variant::I64(-5)),
            ("top_k", Variant::Bool(true)),
            ("temperature", Variant::from("hot")),
            ("temperature", Variant::F64(f64::NAN)),
            ("stop", Variant::from("User:")),
            ("stop", Variant::from(vec![1u32, 2])),
            ("stop", Variant::from(vec![""])),
            ("stop", Variant::from(vec!["x"; MAX_STOP_STRINGS + 1])),
            ("model", Variant::U32(1)),
            ("model", Variant::from("")),
        ];
        for (key, value) in cases {
            let shown = format!("{value:?}");
            let message = refused_key(vec![(key, value)]);
            assert!(message.contains(&format!("`{key}`")), "{shown}: {message}");
        }
    }

    fn parsed(key: &str, value: Value) -> Result<RequestOptions, Llm1Error> {
        RequestOptions::parse(&options(vec![(key, value.to_variant())]))
    }

    #[test]
    fn every_option_of_the_table_is_accepted_with_its_example_default_and_bounds() {
        for spec in OPTIONS {
            let mut values = vec![spec.example];
            values.extend((spec.default)(512));
            if let Some(bounds) = spec.bounds {
                values.push(bounds.max);
                if !bounds.min_excluded {
                    values.push(bounds.min);
                }
            }
            for value in values {
                let options = parsed(spec.name, value)
                    .unwrap_or_else(|e| panic!("{} = {value:?} refused: {e}", spec.name));
                if value == spec.example {
                    assert_ne!(options, RequestOptions::default(), "{} ignored", spec.name);
                }
                assert_eq!(
                    value.to_variant().value_signature().to_string(),
                    spec.signature,
                    "{}: a value of the table is not of the stated type",
                    spec.name
                );
                crate::request::sampling(&options)
                    .unwrap_or_else(|e| panic!("{} = {value:?} out of range: {e}", spec.name));
            }
        }
    }

    #[test]
    fn values_past_the_stated_bounds_are_refused() {
        for spec in OPTIONS {
            let Some(bounds) = spec.bounds else { continue };
            let mut outside = Vec::new();
            match (bounds.min, bounds.max) {
                (Value::F64(min), Value::F64(max)) => {
                    outside.push(Value::F64(max + 1e-3));
                    outside.push(Value::F64(if bounds.min_excluded {
                        min
                    } else {
                        min - 1e-3
                    }));
                }
                (Value::U32(min), Value::U32(_)) if min > 0 => outside.push(Value::U32(min - 1)),
                _ => {}
            }
            for value in outside {
                let refused = parsed(spec.name, value).and_then(|options| {
                    crate::request::sampling(&options)
                        .map_err(|e| Llm1Error::InvalidOption(e.to_string()))
                });
                assert!(refused.is_err(), "{} = {value:?} accepted", spec.name);
            }
        }
    }

    #[test]
    fn the_refusal_of_an_unknown_key_lists_the_table() {
        let message = refused_key(vec![("colour", Variant::from("blue"))]);
        for spec in OPTIONS {
            assert!(message.contains(spec.name), "{message}");
        }
    }

    #[test]
    fn stop_strings_are_bounded_as_described() {
        let stop = OPTIONS.iter().find(|spec| spec.name == "stop").unwrap();
        assert!(
            stop.description
                .contains(&format!("at most {MAX_STOP_STRINGS}")),
            "{}",
            stop.description
        );
    }

    #[test]
    fn one_constraint_is_accepted_and_two_are_refused_naming_both() {
        let parsed =
            RequestOptions::parse(&options(vec![("regex", Variant::from("[a-z]+"))])).unwrap();
        assert_eq!(
            parsed.constraint,
            Some(ConstraintSpec::Regex("[a-z]+".into()))
        );
        let message = refused_key(vec![
            ("regex", Variant::from("[a-z]+")),
            ("json_schema", Variant::from("{}")),
        ]);
        assert!(
            message.contains("`regex`") && message.contains("`json_schema`"),
            "{message}"
        );
        for key in ["json_schema", "regex", "grammar"] {
            let message = refused_key(vec![(key, Variant::U32(1))]);
            assert!(message.contains(&format!("`{key}`")), "{message}");
        }
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let message = refused_key(vec![("temprature", Variant::F64(0.5))]);
        assert!(message.contains("`temprature`"), "{message}");
    }
}
