//! The `a{sv}` options of `Generate`, `Chat` and `Complete`, checked key by key.
//!
//! D-Bus clients do not agree on integer widths: `gdbus call` turns `<64>` into an `i32`,
//! `busctl` sends whatever signature the user typed, zbus sends the Rust type. Integer options
//! therefore accept every integer type whose value fits, and floating-point options accept
//! integers too (`temperature <1>`); anything else — a string, a boolean, a double where a
//! count is meant — is refused, naming the key, rather than guessed at.

use std::collections::HashMap;

use zbus::{OwnedVariant, Variant};

use super::Llm1Error;
use crate::constraint::ConstraintSpec;
use crate::request::RequestOptions;

/// The most stop strings a request may carry; each is matched against every new piece of text.
pub const MAX_STOP_STRINGS: usize = 16;

impl RequestOptions {
    /// Parses and range-checks `options`. Ranges of the sampling parameters are the sampler's
    /// to decide and are checked where the request is prepared.
    pub fn parse(options: &HashMap<String, OwnedVariant>) -> Result<Self, Llm1Error> {
        let mut parsed = Self::default();
        for (key, value) in options {
            let value: &Variant<'_> = value;
            match key.as_str() {
                "max_tokens" => {
                    let n = unsigned(key, value, u32::MAX as u64)? as u32;
                    if n == 0 {
                        return Err(invalid(key, "must be at least 1"));
                    }
                    parsed.max_tokens = Some(n);
                }
                "top_k" => parsed.top_k = Some(unsigned(key, value, u32::MAX as u64)? as u32),
                "seed" => parsed.seed = Some(unsigned(key, value, u64::MAX)?),
                "temperature" => parsed.temperature = Some(float(key, value)?),
                "top_p" => parsed.top_p = Some(float(key, value)?),
                "min_p" => parsed.min_p = Some(float(key, value)?),
                "repeat_penalty" => parsed.repeat_penalty = Some(float(key, value)?),
                "stop" => parsed.stop = strings(key, value)?,
                "json_schema" => {
                    constrain(&mut parsed, ConstraintSpec::JsonSchema(string(key, value)?))?
                }
                "regex" => constrain(&mut parsed, ConstraintSpec::Regex(string(key, value)?))?,
                "grammar" => constrain(&mut parsed, ConstraintSpec::Grammar(string(key, value)?))?,
                "model" => parsed.model = Some(string(key, value)?),
                _ => {
                    return Err(Llm1Error::InvalidOption(format!(
                        "unknown option `{key}` (known: model, max_tokens, temperature, top_k, \
                         top_p, min_p, repeat_penalty, seed, stop, json_schema, regex, grammar)"
                    )));
                }
            }
        }
        Ok(parsed)
    }
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
