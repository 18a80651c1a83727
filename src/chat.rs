//! Conversations to prompt text, with the model's own chat template.
//!
//! Every model family spells turns differently (`[INST] … [/INST]`, `<|im_start|>user\n…`), and
//! a prompt in the wrong spelling quietly degrades answers. So marengo never writes a format per
//! model: it renders the Jinja template that ships with the model (`chat_template` of
//! `tokenizer_config.json`, or `tokenizer.chat_template` of a GGUF file) with minijinja, set up
//! as HuggingFace's `apply_chat_template` sets up Jinja2: `trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, and the Python string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`, …) that templates written for Python call. The render context
//! is transformers': `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and
//! `documents` as none (no tool calling here), and `strftime_now`, with which Llama 3.2's
//! template prints today's date.

use std::ffi::CString;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

/// Name of the one template an environment holds; without an extension, so nothing is escaped.
const TEMPLATE_NAME: &str = "chat";

/// Errors of compiling and rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the model's chat template does not compile: {0}")]
    Syntax(#[source] Error),
    /// The template itself refused the conversation with `raise_exception`, e.g. because the
    /// roles do not alternate: the caller's messages are at fault, not the model.
    #[error("the model's chat template rejects this conversation: {0}")]
    Rejected(String),
    #[error("the model's chat template failed to render: {0}")]
    Render(#[source] Error),
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`; which roles are accepted is the template's decision.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
}

/// Marks an error as raised by the template's `raise_exception`, to tell it from a template bug.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// A compiled chat template with the special tokens it refers to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `template`; `bos_token` and `eos_token` are the texts (`"<s>"`) templates print.
    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(ChatError::Syntax)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The prompt text of `messages`; `add_generation_prompt` appends the opening of an
    /// assistant turn, for templates that have one. The text contains the special tokens as
    /// text (`<s>`): encode it with special tokens recognised but without adding another BOS.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.render_at(messages, add_generation_prompt, SystemTime::now())
    }

    /// [`Self::render`] with `now` as the time `strftime_now` formats, for renderings that must
    /// not depend on the day they are made.
    pub fn render_at(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        now: SystemTime,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatError::Render)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                tools => Value::from(()),
                documents => Value::from(()),
                strftime_now => Value::from_function(move |format: String| strftime(&format, now)),
            })
            .map_err(|error| match raised_message(&error) {
                Some(message) => ChatError::Rejected(message),
                None => ChatError::Render(error),
            })
    }
}

/// `time` in the local time zone, formatted by the C library's `strftime`: transformers'
/// `strftime_now` is Python's `datetime.now().strftime`, which hands the format to the same
/// function, so the two print the same text (both in the C locale: neither process sets
/// `LC_TIME`).
fn strftime(format: &str, time: SystemTime) -> Result<String, Error> {
    let invalid = |detail: &str| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now({format:?}): {detail}"),
        )
    };
    let seconds = match time.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs() as libc::time_t,
        Err(before) => -(before.duration().as_secs() as libc::time_t),
    };
    let c_format = CString::new(format).map_err(|_| invalid("the format contains a NUL"))?;
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct (a null `tm_zone`
    // included), and it is overwritten below.
    let mut local: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r writes only to `local`.
    if unsafe { libc::localtime_r(&seconds, &mut local) }.is_null() {
        return Err(invalid("the time is out of the C library's range"));
    }
    // No conversion writes more than a few dozen bytes; a format long enough to need more is
    // given room in proportion.
    let mut buffer = vec![0u8; 256 + 64 * format.len()];
    // SAFETY: strftime writes at most `buffer.len()` bytes, its terminating NUL included, reads
    // the NUL-terminated format and `local`; it returns the length written before the NUL.
    let written = unsafe {
        libc::strftime(
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            c_format.as_ptr(),
            &local,
        )
    };
    buffer.truncate(written);
    String::from_utf8(buffer).map_err(|_| invalid("the result is not UTF-8"))
}

fn raised_message(error: &Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(Raised(message)) = current.downcast_ref::<Raised>() {
            return Some(message.clone());
        }
        cause = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;
    use std::path::Path;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mistral-7b-v0.1"
    );

    /// SmolLM2-135M-Instruct's template, as its GGUF's `tokenizer.chat_template` has it.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn read_json(name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(Path::new(FIXTURE).join(name)).expect("fixture exists");
        serde_json::from_str(&text).expect("fixture is JSON")
    }

    fn mistral_template() -> ChatTemplate {
        let config = read_json("tokenizer_config.json");
        let field = |key: &str| config[key].as_str().expect("string field").to_owned();
        ChatTemplate::new(
            &field("chat_template"),
            &field("bos_token"),
            &field("eos_token"),
        )
        .expect("compiles")
    }

    fn messages(value: &serde_json::Value) -> Vec<Message> {
        value
            .as_array()
            .expect("messages array")
            .iter()
            .map(|message| {
                Message::new(
                    message["role"].as_str().expect("role"),
                    message["content"].as_str().expect("content"),
                )
            })
            .collect()
    }

    #[test]
    fn mistral_template_renders_like_transformers() {
        let template = mistral_template();
        let expected = read_json("chat_expected.json");
        let conversations = expected["conversations"].as_array().expect("conversations");
        assert!(conversations.iter().any(|c| c.get("error").is_some()));
        for conversation in conversations {
            let name = &conversation["name"];
            let add_generation_prompt = conversation["add_generation_prompt"]
                .as_bool()
                .expect("bool");
            let result =
                template.render(&messages(&conversation["messages"]), add_generation_prompt);
            match (
                conversation["rendered"].as_str(),
                conversation["error"].as_str(),
            ) {
                (Some(rendered), None) => assert_eq!(result.expect("renders"), rendered, "{name}"),
                (None, Some(error)) => match result {
                    Err(ChatError::Rejected(message)) => assert_eq!(message, error, "{name}"),
                    other => {
                        panic!("{name}: expected the template's exception {error:?}, got {other:?}")
                    }
                },
                _ => panic!("{name}: fixture has neither rendering nor error"),
            }
        }
    }

    #[test]
    fn mistral_prompt_tokenizes_like_mistral_common() {
        let template = mistral_template();
        let tokenizer =
            Tokenizer::from_file(&Path::new(FIXTURE).join("tokenizer.json")).expect("loads");
        let expected = read_json("chat_expected.json");
        let mut checked = 0;
        for conversation in expected["conversations"].as_array().expect("conversations") {
            let Some(ids) = conversation.get("mistral_common_ids") else {
                continue;
            };
            let ids: Vec<u32> = serde_json::from_value(ids.clone()).expect("ids");
            let prompt = template
                .render(&messages(&conversation["messages"]), true)
                .expect("renders");
            assert_eq!(
                tokenizer.encode(&prompt, false).expect("encodes"),
                ids,
                "{prompt}"
            );
            checked += 1;
        }
        assert_eq!(checked, 2);
    }

    #[test]
    fn smollm2_template_adds_its_default_system_turn_and_generation_prompt() {
        let template =
            ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").expect("compiles");
        assert_eq!(
            template.render(&[Message::user("Hello")], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        );
        let conversation = [
            Message::new("system", "Answer in French."),
            Message::user("Hi"),
            Message::new("assistant", "Salut !"),
        ];
        assert_eq!(
            template.render(&conversation, false).unwrap(),
            "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nSalut !<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_and_block_trimming_behave_as_in_transformers() {
        let template = ChatTemplate::new(
            "{% for message in messages %}\n  {% if message.role.startswith('us') %}\n{{ message['content'].strip().upper() }}|{{ message.content.split(',') | length }}\n  {% endif %}\n{% endfor %}",
            "<s>",
            "</s>",
        )
        .expect("compiles");
        let conversation = [
            Message::user("  a, b, c  "),
            Message::new("assistant", "x"),
            Message::user("d"),
        ];
        assert_eq!(
            template.render(&conversation, false).unwrap(),
            "A, B, C|3\nD|1\n"
        );
    }

    #[test]
    fn strftime_now_formats_the_render_time_and_tools_are_none() {
        let template = ChatTemplate::new(
            "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y') }}|{{ tools is none }}|{{ documents is none }}",
            "<s>",
            "</s>",
        )
        .expect("compiles");
        // 2026-12-03 12:00 UTC: the same date in any time zone within eleven hours.
        let noon = UNIX_EPOCH + std::time::Duration::from_secs(1_796_299_200);
        assert_eq!(
            template
                .render_at(&[Message::user("x")], true, noon)
                .unwrap(),
            "03 Dec 2026|2026|True|True"
        );
        assert_eq!(strftime("", noon).unwrap(), "");
        let error = strftime("%d\0", noon).unwrap_err();
        assert!(error.to_string().contains("NUL"), "{error}");
    }

    #[test]
    fn broken_templates_fail_with_syntax_or_render_errors() {
        let error = ChatTemplate::new("{% for message in %}", "<s>", "</s>").unwrap_err();
        assert!(matches!(error, ChatError::Syntax(_)), "{error:?}");
        let template =
            ChatTemplate::new("{{ messages[0].content + 1 }}", "<s>", "</s>").expect("compiles");
        let error = template.render(&[Message::user("x")], false).unwrap_err();
        assert!(matches!(error, ChatError::Render(_)), "{error:?}");
    }
}
