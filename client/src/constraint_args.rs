//! The structured-output flags, shared by `marengoctl` and `marengod generate` so that both
//! read them alike: a schema or grammar from a file, a regex inline, at most one of the three.

use clap::Args;

#[derive(Args, Clone, Debug, Default)]
pub struct ConstraintArgs {
    /// Constrain the text to the JSON schema in FILE.
    #[arg(long, value_name = "FILE", value_parser = read_file,
          conflicts_with_all = ["regex", "grammar"])]
    pub json_schema: Option<String>,
    /// Constrain the whole text to match the regular expression RE.
    #[arg(long, value_name = "RE", conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// Constrain the text to the Lark grammar (as llguidance reads it) in FILE.
    #[arg(long, value_name = "FILE", value_parser = read_file)]
    pub grammar: Option<String>,
}

impl ConstraintArgs {
    /// The one constraint given, as its D-Bus option name and text.
    pub fn option(&self) -> Option<(&'static str, &str)> {
        [
            ("json_schema", &self.json_schema),
            ("regex", &self.regex),
            ("grammar", &self.grammar),
        ]
        .into_iter()
        .find_map(|(key, value)| value.as_deref().map(|text| (key, text)))
    }
}

/// The contents of the file a flag names, read when the flags are parsed.
fn read_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}
