//! The mergekit YAML subset that SLERP merges use, parsed and checked before any tensor is read.
//!
//! mergekit reads its YAML with pydantic models that ignore unknown keys, and silently drops
//! settings a merge method does not use (a per-model `t`, an unknown parameter name). Here every
//! key is either understood or refused, naming the key and what is supported: a typo in a merge
//! config must not quietly produce a different model.
//!
//! Model paths are local checkpoint directories; a relative path is taken relative to the
//! directory of the YAML file, so a config and its parents can move together. (mergekit resolves
//! them against its working directory; running it from the config's directory gives the same.)

use std::path::{Path, PathBuf};

use serde_norway::Value;

use crate::checkpoint::SourceDtype;

/// Top-level keys this subset understands.
const TOP_KEYS: &str = "merge_method, base_model, models, slices, parameters, dtype, out_dtype";

/// Why a merge config is refused.
#[derive(Debug, thiserror::Error)]
pub enum MergeConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{path}: `{key}` is not supported{place} (supported: {supported})")]
    UnsupportedKey {
        path: PathBuf,
        key: String,
        place: String,
        supported: &'static str,
    },
    #[error(
        "{path}: merge_method {method:?} is not supported (supported: slerp, mergekit's \
         spherical interpolation of two models)"
    )]
    UnsupportedMethod { path: PathBuf, method: String },
    #[error(
        "{path}: base_model is missing: SLERP interpolates from the base model (t = 0) to the other one (t = 1)"
    )]
    MissingBase { path: PathBuf },
    #[error("{path}: {message}")]
    Models { path: PathBuf, message: String },
    #[error("{path}: unknown parameter `{name}` (SLERP takes only t)")]
    UnknownParameter { path: PathBuf, name: String },
    #[error(
        "{path}: {at}: {message} (t is a number in [0, 1], a non-empty list of them spread \
         over the layers, or a list of {{filter, value}} entries)"
    )]
    BadT {
        path: PathBuf,
        at: String,
        message: String,
    },
    #[error("{path}: {at}: {message}")]
    Invalid {
        path: PathBuf,
        at: String,
        message: String,
    },
}

/// A value of `t`: one number, or a gradient spread over the layers of a slice.
#[derive(Debug, Clone, PartialEq)]
pub enum TValue {
    Constant(f64),
    Gradient(Vec<f64>),
}

/// One entry of a filtered `t`: applies to tensors whose name contains `filter` (all tensors
/// when `filter` is absent or `*`).
#[derive(Debug, Clone, PartialEq)]
pub struct FilteredT {
    pub filter: Option<String>,
    pub value: TValue,
}

/// How `t` is given in one `parameters` block.
#[derive(Debug, Clone, PartialEq)]
pub enum TSetting {
    Value(TValue),
    /// The first entry whose filter matches decides; none matching leaves `t` to the next
    /// (outer) `parameters` block.
    Filtered(Vec<FilteredT>),
}

impl TValue {
    /// The value at relative depth `pos` in [0, 1], exactly as mergekit's `evaluate_setting`
    /// computes it in double precision: `pos * (n - 1)` split into an integer index and a
    /// fraction, and a linear blend of the two neighbouring entries.
    pub fn at(&self, pos: f64) -> f64 {
        match self {
            TValue::Constant(value) => *value,
            TValue::Gradient(values) => {
                let last = values.len() - 1;
                let scaled = pos * last as f64;
                // Python's int() truncates toward zero; scaled is never negative here.
                let i0 = (scaled.trunc() as usize).min(last);
                let i1 = (i0 + 1).min(last);
                let frac = scaled - i0 as f64;
                (1.0 - frac) * values[i0] + frac * values[i1]
            }
        }
    }
}

impl TSetting {
    /// `t` for the tensor named `tensor` at relative depth `pos`, or `None` when no filter
    /// matches it.
    pub fn evaluate(&self, tensor: &str, pos: f64) -> Option<f64> {
        match self {
            TSetting::Value(value) => Some(value.at(pos)),
            TSetting::Filtered(entries) => entries
                .iter()
                .find(|e| match e.filter.as_deref() {
                    None | Some("*") => true,
                    Some(filter) => tensor.contains(filter),
                })
                .map(|e| e.value.at(pos)),
        }
    }
}

/// One output slice: a run of layers taken from both models and interpolated pairwise.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSpec {
    /// Layers of the base model; `None` is all of them (the `models:` form).
    pub base_layers: Option<(usize, usize)>,
    /// Layers of the other model, as many as the base's.
    pub other_layers: Option<(usize, usize)>,
    /// The slice's own `parameters: {t: …}`, consulted before the top-level one.
    pub t: Option<TSetting>,
}

/// A validated SLERP merge config.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The YAML file, for messages and provenance.
    pub file: PathBuf,
    /// The base model's checkpoint directory (t = 0).
    pub base: PathBuf,
    /// The other model's checkpoint directory (t = 1).
    pub other: PathBuf,
    pub slices: Vec<SliceSpec>,
    /// The top-level `parameters: {t: …}`.
    pub t: Option<TSetting>,
    /// `dtype`: what both inputs are converted to before merging; `None` keeps their own.
    pub dtype: Option<SourceDtype>,
    /// `out_dtype`: what the merged tensors are stored as; `None` is the merge dtype.
    pub out_dtype: Option<SourceDtype>,
}

struct Ctx<'a> {
    path: &'a Path,
    dir: &'a Path,
}

impl Ctx<'_> {
    fn invalid(&self, at: impl Into<String>, message: impl Into<String>) -> MergeConfigError {
        MergeConfigError::Invalid {
            path: self.path.to_owned(),
            at: at.into(),
            message: message.into(),
        }
    }

    fn bad_t(&self, at: &str, message: impl Into<String>) -> MergeConfigError {
        MergeConfigError::BadT {
            path: self.path.to_owned(),
            at: at.to_owned(),
            message: message.into(),
        }
    }

    /// The entries of a mapping with string keys, refusing keys outside `allowed`.
    fn mapping<'v>(
        &self,
        value: &'v Value,
        at: &str,
        allowed: &[&str],
        supported: &'static str,
    ) -> Result<Vec<(String, &'v Value)>, MergeConfigError> {
        let Value::Mapping(map) = value else {
            return Err(self.invalid(at, "expected a mapping"));
        };
        let mut out = Vec::new();
        for (key, value) in map {
            let Some(key) = key.as_str() else {
                return Err(self.invalid(at, format!("key {key:?} is not a string")));
            };
            if !allowed.contains(&key) {
                return Err(MergeConfigError::UnsupportedKey {
                    path: self.path.to_owned(),
                    key: key.to_owned(),
                    place: if at.is_empty() {
                        String::new()
                    } else {
                        format!(" in {at}")
                    },
                    supported,
                });
            }
            out.push((key.to_owned(), value));
        }
        Ok(out)
    }

    fn model_path(&self, value: &Value, at: &str) -> Result<PathBuf, MergeConfigError> {
        let Some(text) = value.as_str().filter(|s| !s.is_empty()) else {
            return Err(self.invalid(at, "expected the path of a checkpoint directory"));
        };
        if text.contains('+') && !Path::new(text).exists() {
            return Err(self.invalid(
                at,
                format!("{text:?}: LoRA adapters (model+lora) are not supported"),
            ));
        }
        let path = Path::new(text);
        Ok(if path.is_absolute() {
            path.to_owned()
        } else {
            self.dir.join(path)
        })
    }

    fn dtype(&self, value: &Value, key: &str) -> Result<SourceDtype, MergeConfigError> {
        let name = value.as_str().unwrap_or_default();
        let name = name.strip_prefix("torch.").unwrap_or(name);
        match name {
            "bfloat16" => Ok(SourceDtype::Bf16),
            "float16" => Ok(SourceDtype::F16),
            "float32" => Ok(SourceDtype::F32),
            _ => Err(self.invalid(
                key,
                format!("{value:?} is not supported (supported: bfloat16, float16, float32)"),
            )),
        }
    }

    fn number(&self, value: &Value, at: &str) -> Result<f64, MergeConfigError> {
        let number = match value {
            Value::Number(n) => n.as_f64(),
            _ => None,
        };
        let Some(number) = number else {
            return Err(self.bad_t(at, format!("{value:?} is not a number")));
        };
        if !number.is_finite() || !(0.0..=1.0).contains(&number) {
            return Err(self.bad_t(
                at,
                format!("{number} is outside [0, 1]: SLERP interpolates, it does not extrapolate"),
            ));
        }
        Ok(number)
    }

    fn t_value(&self, value: &Value, at: &str) -> Result<TValue, MergeConfigError> {
        match value {
            Value::Sequence(items) => {
                if items.is_empty() {
                    return Err(self.bad_t(at, "an empty list"));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.number(item, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()
                    .map(TValue::Gradient)
            }
            other => self.number(other, at).map(TValue::Constant),
        }
    }

    fn t_setting(&self, value: &Value, at: &str) -> Result<TSetting, MergeConfigError> {
        match value {
            Value::Sequence(items) if items.iter().any(|i| matches!(i, Value::Mapping(_))) => {
                let mut entries = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{at}[{i}]");
                    if !matches!(item, Value::Mapping(_)) {
                        return Err(self.bad_t(&at, "mixes numbers and {filter, value} entries"));
                    }
                    let mut filter = None;
                    let mut value = None;
                    for (key, v) in
                        self.mapping(item, &at, &["filter", "value"], "filter, value")?
                    {
                        if key == "filter" {
                            match v {
                                Value::String(s) => filter = Some(s.clone()),
                                Value::Null => {}
                                _ => {
                                    return Err(
                                        self.bad_t(&format!("{at}.filter"), "is not a string")
                                    );
                                }
                            }
                        } else {
                            value = Some(self.t_value(v, &format!("{at}.value"))?);
                        }
                    }
                    let value = value.ok_or_else(|| self.bad_t(&at, "has no value"))?;
                    entries.push(FilteredT { filter, value });
                }
                Ok(TSetting::Filtered(entries))
            }
            other => self.t_value(other, at).map(TSetting::Value),
        }
    }

    fn parameters(&self, value: &Value, at: &str) -> Result<Option<TSetting>, MergeConfigError> {
        let Value::Mapping(map) = value else {
            return Err(self.invalid(at, "expected a mapping of parameter names to values"));
        };
        let mut t = None;
        for (key, value) in map {
            match key.as_str() {
                Some("t") => t = Some(self.t_setting(value, &format!("{at}.t"))?),
                _ => {
                    return Err(MergeConfigError::UnknownParameter {
                        path: self.path.to_owned(),
                        name: key
                            .as_str()
                            .map_or_else(|| format!("{key:?}"), str::to_owned),
                    });
                }
            }
        }
        Ok(t)
    }

    fn layer_range(&self, value: &Value, at: &str) -> Result<(usize, usize), MergeConfigError> {
        let bounds: Option<Vec<usize>> = value.as_sequence().map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        });
        match bounds.as_deref() {
            Some(&[start, end]) if start < end && value.as_sequence().map(Vec::len) == Some(2) => {
                Ok((start, end))
            }
            _ => Err(self.invalid(
                at,
                format!("{value:?} is not a layer range [start, end) with start < end"),
            )),
        }
    }
}

impl MergeConfig {
    /// Reads and validates a merge config file.
    pub fn from_file(path: &Path) -> Result<Self, MergeConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| MergeConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(path, &text)
    }

    /// Validates a merge config's text; `path` names it in errors and anchors relative paths.
    pub fn from_yaml(path: &Path, text: &str) -> Result<Self, MergeConfigError> {
        let value: Value = serde_norway::from_str(text).map_err(|e| MergeConfigError::Yaml {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let cx = Ctx { path, dir };
        let top = cx.mapping(
            &value,
            "",
            &[
                "merge_method",
                "base_model",
                "models",
                "slices",
                "parameters",
                "dtype",
                "out_dtype",
            ],
            TOP_KEYS,
        )?;
        let get = |key: &str| top.iter().find(|(k, _)| k == key).map(|(_, v)| *v);

        let method = get("merge_method").and_then(Value::as_str).unwrap_or("");
        if method != "slerp" {
            return Err(MergeConfigError::UnsupportedMethod {
                path: path.to_owned(),
                method: match get("merge_method") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => format!("{other:?}"),
                    None => "(missing)".into(),
                },
            });
        }
        let base = match get("base_model") {
            None | Some(Value::Null) => {
                return Err(MergeConfigError::MissingBase {
                    path: path.to_owned(),
                });
            }
            Some(v) => cx.model_path(v, "base_model")?,
        };
        let models_error = |message: String| MergeConfigError::Models {
            path: path.to_owned(),
            message,
        };

        let (other, slices) = match (get("models"), get("slices")) {
            (Some(models), None) => {
                let Some(items) = models.as_sequence() else {
                    return Err(cx.invalid("models", "expected a list of {model: PATH}"));
                };
                let mut named = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let at = format!("models[{i}]");
                    let entry = cx.mapping(item, &at, &["model", "parameters"], "model")?;
                    if entry.iter().any(|(k, _)| k == "parameters") {
                        return Err(cx.invalid(
                            format!("{at}.parameters"),
                            "per-model parameters are not used by SLERP (mergekit ignores \
                             them); give t under the top-level parameters",
                        ));
                    }
                    let model = entry
                        .iter()
                        .find(|(k, _)| k == "model")
                        .ok_or_else(|| cx.invalid(&at, "has no model"))?
                        .1;
                    named.push(cx.model_path(model, &format!("{at}.model"))?);
                }
                let other = two_models(&base, &named).map_err(models_error)?;
                let slice = SliceSpec {
                    base_layers: None,
                    other_layers: None,
                    t: None,
                };
                (other, vec![slice])
            }
            (None, Some(slices)) => {
                let Some(items) = slices.as_sequence().filter(|s| !s.is_empty()) else {
                    return Err(cx.invalid("slices", "expected a non-empty list of {sources: …}"));
                };
                let mut other = None;
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let at = format!("slices[{i}]");
                    let entry =
                        cx.mapping(item, &at, &["sources", "parameters"], "sources, parameters")?;
                    let mut t = None;
                    let mut sources = None;
                    for (key, value) in entry {
                        if key == "parameters" {
                            t = cx.parameters(value, &format!("{at}.parameters"))?;
                        } else {
                            sources = Some(value);
                        }
                    }
                    let sources = sources
                        .and_then(Value::as_sequence)
                        .ok_or_else(|| cx.invalid(&at, "has no list of sources"))?;
                    let mut models = Vec::new();
                    let mut ranges = Vec::new();
                    for (j, source) in sources.iter().enumerate() {
                        let at = format!("{at}.sources[{j}]");
                        let fields = cx.mapping(
                            source,
                            &at,
                            &["model", "layer_range", "parameters"],
                            "model, layer_range",
                        )?;
                        if fields.iter().any(|(k, _)| k == "parameters") {
                            return Err(cx.invalid(
                                format!("{at}.parameters"),
                                "per-source parameters are not used by SLERP (mergekit ignores \
                                 them); give t under the slice's or the top-level parameters",
                            ));
                        }
                        let field =
                            |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
                        let model =
                            field("model").ok_or_else(|| cx.invalid(&at, "has no model"))?;
                        let range = field("layer_range")
                            .ok_or_else(|| cx.invalid(&at, "has no layer_range"))?;
                        models.push(cx.model_path(model, &format!("{at}.model"))?);
                        ranges.push(cx.layer_range(range, &format!("{at}.layer_range"))?);
                    }
                    if models.len() != 2 {
                        return Err(models_error(format!(
                            "{at} has {} sources; SLERP merges exactly two models",
                            models.len()
                        )));
                    }
                    let Some(base_index) = models.iter().position(|m| *m == base) else {
                        return Err(models_error(format!(
                            "{at}: neither source is base_model {}",
                            base.display()
                        )));
                    };
                    let slice_other = models[1 - base_index].clone();
                    if slice_other == base {
                        return Err(models_error(format!(
                            "{at}: both sources are the base model"
                        )));
                    }
                    match &other {
                        None => other = Some(slice_other),
                        Some(o) if *o == slice_other => {}
                        Some(o) => {
                            return Err(models_error(format!(
                                "{at} merges {} but an earlier slice merges {}: all slices must \
                                 merge the same two models",
                                slice_other.display(),
                                o.display()
                            )));
                        }
                    }
                    let (b, o) = (ranges[base_index], ranges[1 - base_index]);
                    if b.1 - b.0 != o.1 - o.0 {
                        return Err(cx.invalid(
                            &at,
                            format!(
                                "layer ranges {b:?} and {o:?} have different lengths; both \
                                 sources of a slice must contain the same number of layers"
                            ),
                        ));
                    }
                    out.push(SliceSpec {
                        base_layers: Some(b),
                        other_layers: Some(o),
                        t,
                    });
                }
                (other.unwrap_or_else(|| base.clone()), out)
            }
            (Some(_), Some(_)) => {
                return Err(models_error(
                    "give either models or slices, not both".into(),
                ));
            }
            (None, None) => {
                return Err(models_error(
                    "give the two models as models or slices".into(),
                ));
            }
        };

        let t = match get("parameters") {
            Some(p) => cx.parameters(p, "parameters")?,
            None => None,
        };
        let dtype = get("dtype").map(|v| cx.dtype(v, "dtype")).transpose()?;
        let out_dtype = get("out_dtype")
            .map(|v| cx.dtype(v, "out_dtype"))
            .transpose()?;
        Ok(MergeConfig {
            file: path.to_owned(),
            base,
            other,
            slices,
            t,
            dtype,
            out_dtype,
        })
    }

    /// `t` for a tensor: the slice's setting first, then the top-level one, as mergekit
    /// resolves a shared parameter; `None` when neither gives one.
    pub fn t_for(&self, slice: usize, tensor: &str, pos: f64) -> Option<f64> {
        self.slices[slice]
            .t
            .as_ref()
            .and_then(|s| s.evaluate(tensor, pos))
            .or_else(|| self.t.as_ref().and_then(|s| s.evaluate(tensor, pos)))
    }
}

/// The non-base model of a `models:` list: mergekit adds the base when it is not listed, and
/// SLERP needs exactly two distinct models in the end.
fn two_models(base: &Path, named: &[PathBuf]) -> Result<PathBuf, String> {
    let mut all: Vec<&Path> = Vec::new();
    for model in named.iter().map(PathBuf::as_path).chain([base]) {
        if !all.contains(&model) {
            all.push(model);
        }
    }
    match all.as_slice() {
        [a, b] => Ok(if *a == base { b } else { a }.to_path_buf()),
        _ => Err(format!(
            "SLERP merges exactly two models (the base and one other); this config has {}: {}",
            all.len(),
            all.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MergeConfig, MergeConfigError> {
        MergeConfig::from_yaml(Path::new("/cfg/slerp.yml"), text)
    }

    #[test]
    fn gradient_is_mergekits_linear_blend() {
        let g = TValue::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
        assert_eq!(g.at(0.0), 0.0);
        assert_eq!(g.at(1.0), 1.0);
        // 1/3 of the way: scaled 4/3 → between entries 1 and 2, a third of the way.
        let expected = (1.0 - (4.0f64 / 3.0 - 1.0)) * 0.5 + (4.0f64 / 3.0 - 1.0) * 0.3;
        assert_eq!(g.at(1.0 / 3.0), expected);
        assert_eq!(TValue::Gradient(vec![0.25]).at(0.7), 0.25);
    }

    #[test]
    fn first_matching_filter_wins_and_unmatched_falls_through() {
        let config = parse(
            "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n\
             parameters:\n  t:\n    - {filter: self_attn, value: 0.1}\n    - {filter: mlp, value: 0.9}\n",
        )
        .unwrap();
        assert_eq!(
            config.t_for(0, "model.layers.0.self_attn.q_proj.weight", 0.0),
            Some(0.1)
        );
        assert_eq!(
            config.t_for(0, "model.layers.0.mlp.up_proj.weight", 0.0),
            Some(0.9)
        );
        assert_eq!(config.t_for(0, "model.norm.weight", 0.0), None);
    }

    #[test]
    fn relative_models_are_next_to_the_config() {
        let config = parse(
            "merge_method: slerp\nbase_model: a\nmodels: [{model: b}]\nparameters: {t: 0.5}\n",
        )
        .unwrap();
        assert_eq!(config.base, Path::new("/cfg/a"));
        assert_eq!(config.other, Path::new("/cfg/b"));
    }
}
