//! llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) and the splitting they stand for.
//!
//! A byte-level BPE model is only half a tokenizer: before merges run, text is cut into words by
//! a list of regular expressions, and two models with the same vocabulary but different cuts
//! (say, digits split one by one or kept in runs) produce different ids. GGUF stores only the
//! name of the rule set, so the rules are tabulated here. Each expression isolates its matches
//! and keeps the text between them, applied in turn to the pieces the previous one left — the
//! semantics of llama.cpp's `unicode_regex_split` and of a sequence of `tokenizers` `Split`
//! pre-tokenizers with `Isolated` behaviour, which is how they are expressed.
//!
//! Where a family's HuggingFace `tokenizer.json` states its rules, they are written here as it
//! states them (Llama 3's and Qwen2's regexes verbatim, Qwen2's NFC normalization, which
//! llama.cpp skips), so that the rebuilt tokenizer equals the HuggingFace one rather than
//! llama.cpp's reading of it. Checked: `smollm` against llama.cpp's own tokenization
//! (`tests/fixtures/smollm2/`), `llama-bpe` and `qwen2` against HuggingFace's ids and the models'
//! original tokenizers (`tests/llama3_and_qwen2_text_match_references.rs`); the other tables
//! are transcriptions of llama.cpp's source.

/// GPT-2's word splitting: contractions, letter runs, digit runs, other-symbol runs (each with
/// one optional leading space), and whitespace not followed by a word.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Every digit on its own.
const DIGITS: &str = r"\p{N}";

/// Llama 3's splitting: case-insensitive contractions, at most three digits together, and
/// newlines kept apart from other whitespace; as Meta's tokenizer and its `tokenizer.json` write
/// it (the Unicode case folding of `(?i:…)` also takes `ſ` for `s`, which `'[sS]` would not).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's splitting: as Llama 3's but digits one by one.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a named pre-tokenizer cuts text, and whether whole words found in the vocabulary skip
/// the merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreTokenizerRules {
    /// Applied in order, each isolating its matches within the pieces left by the previous.
    pub regexes: Vec<&'static str>,
    /// llama.cpp's `ignore_merges`: a word that is itself a token is emitted whole.
    pub ignore_merges: bool,
    /// Whether llama.cpp adds BOS by default for this pre-tokenizer (when the GGUF does not say).
    pub add_bos_default: bool,
    /// Whether text is put in Unicode NFC before splitting, as Qwen2's `tokenizer.json` does: a
    /// decomposed `e` + `◌́` then tokenizes as `é`.
    pub nfc: bool,
}

/// The rules for llama.cpp pre-tokenizer `name`, or `None` when it is not tabulated here.
/// An absent `tokenizer.ggml.pre` means `default`.
pub fn rules(name: &str) -> Option<PreTokenizerRules> {
    let (regexes, ignore_merges, add_bos_default): (Vec<&'static str>, bool, bool) = match name {
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" | "gigachat"
        | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" => (vec![GPT2], false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => (vec![DIGITS, GPT2], false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => (vec![LLAMA3], true, true),
        "dbrx" | "smaug-bpe" => (vec![LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "hunyuan"
        | "solar-open" => (vec![QWEN2], false, false),
        "falcon" => (
            vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "default" => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        _ => return None,
    };
    Some(PreTokenizerRules {
        regexes,
        ignore_merges,
        add_bos_default,
        // Qwen2, 2.5 and 3 normalize; the names that share Qwen2's regex are other families,
        // whose tokenizers were not seen doing it.
        nfc: name == "qwen2",
    })
}

/// The names [`rules`] knows, for error messages.
pub const KNOWN: &str = "gpt-2 and its aliases, smollm/starcoder/refact/command-r/codeshell/exaone, \
     llama3/llama-bpe and aliases, dbrx, smaug-bpe, qwen2 and aliases, stablelm2, falcon, default";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_splits_digits_before_words() {
        let rules = rules("smollm").unwrap();
        assert_eq!(rules.regexes, vec![DIGITS, GPT2]);
        assert!(!rules.ignore_merges);
    }

    #[test]
    fn every_table_regex_compiles() {
        for name in ["gpt-2", "smollm", "llama3", "qwen2", "falcon", "default"] {
            for re in rules(name).unwrap().regexes {
                let split = tokenizers::pre_tokenizers::split::Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex(re.to_owned()),
                    tokenizers::SplitDelimiterBehavior::Isolated,
                    false,
                );
                assert!(split.is_ok(), "{name}: {re}");
            }
        }
    }

    #[test]
    fn unknown_names_are_not_guessed() {
        assert_eq!(rules("smollm2"), None);
    }
}
