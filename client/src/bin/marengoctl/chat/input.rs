//! Where `marengoctl chat` reads the user's turns: a line editor with history on a terminal,
//! plain lines otherwise. Both take the same multi-line forms: a line ending in `\` goes on
//! on the next line, and text opened with `"""` goes on until a closing `"""`.

use std::path::PathBuf;

use anyhow::Context;
use rustyline::completion::Completer;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::FileHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Config, Editor, Helper};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};

/// Opens and closes a block of several lines, as in ollama and Python.
const BLOCK: &str = "\"\"\"";

/// What one read gave.
pub enum Entry {
    /// A whole turn, its continuation marks removed, as typed otherwise.
    Text(String),
    /// Ctrl-C at the prompt.
    Interrupted,
    /// Ctrl-D, or the end of stdin.
    End,
}

/// Whether `text` waits for more lines: an open `"""` block, or a final `\`.
fn incomplete(text: &str) -> bool {
    match text.trim_start().strip_prefix(BLOCK) {
        Some(rest) => !rest.contains(BLOCK),
        None => text.ends_with('\\'),
    }
}

/// The turn `text` holds: the inside of a `"""` block, or the lines with their final `\`s
/// removed.
fn turn(text: &str) -> String {
    match text.trim_start().strip_prefix(BLOCK) {
        Some(rest) => {
            let inside = rest.rsplit_once(BLOCK).map_or(rest, |(inside, _)| inside);
            let inside = inside.strip_prefix('\n').unwrap_or(inside);
            inside.strip_suffix('\n').unwrap_or(inside).to_owned()
        }
        None => text.replace("\\\n", "\n"),
    }
}

/// Turns from the user, however they come.
pub enum Input {
    Terminal(Box<Terminal>),
    Piped(Piped),
}

impl Input {
    /// A line editor when stdin is a terminal (`interactive`), stdin's lines otherwise.
    pub fn new(interactive: bool) -> anyhow::Result<Input> {
        Ok(if interactive {
            Input::Terminal(Box::new(Terminal::new()?))
        } else {
            Input::Piped(Piped {
                lines: BufReader::new(tokio::io::stdin()).lines(),
            })
        })
    }

    pub async fn read(&mut self) -> anyhow::Result<Entry> {
        match self {
            Input::Terminal(terminal) => terminal.read().await,
            Input::Piped(piped) => piped.read().await,
        }
    }
}

pub struct Piped {
    lines: Lines<BufReader<Stdin>>,
}

impl Piped {
    async fn read(&mut self) -> anyhow::Result<Entry> {
        let mut pending: Option<String> = None;
        loop {
            let line = self.lines.next_line().await.context("cannot read stdin")?;
            let Some(line) = line else {
                // An unfinished turn at the end of the input is still sent.
                return Ok(pending.map_or(Entry::End, |text| Entry::Text(turn(&text))));
            };
            let text = match pending.take() {
                Some(mut text) => {
                    text.push('\n');
                    text.push_str(&line);
                    text
                }
                None => line,
            };
            if !incomplete(&text) {
                return Ok(Entry::Text(turn(&text)));
            }
            pending = Some(text);
        }
    }
}

/// The line editor, with the history of earlier chats.
pub struct Terminal {
    /// Lent to the blocking thread that reads a line, and back between reads.
    editor: Option<Editor<Continuation, FileHistory>>,
    history: Option<PathBuf>,
}

impl Terminal {
    fn new() -> anyhow::Result<Terminal> {
        let config = Config::builder()
            .max_history_size(1000)
            .context("configuring the line editor")?
            .auto_add_history(false)
            .build();
        let mut editor =
            Editor::with_config(config).context("cannot start the line editor on the terminal")?;
        editor.set_helper(Some(Continuation));
        let history = history_path();
        if let Some(path) = &history {
            // A first chat has no history yet; an unreadable one starts afresh.
            let _ = editor.load_history(path);
        }
        Ok(Terminal {
            editor: Some(editor),
            history,
        })
    }

    async fn read(&mut self) -> anyhow::Result<Entry> {
        let mut editor = self.editor.take().context("the line editor was lost")?;
        // The editor blocks in read(2) until Enter: off the runtime's thread, so that the bus
        // connection keeps being served meanwhile.
        let (editor, line) = tokio::task::spawn_blocking(move || {
            let line = editor.readline(">>> ");
            (editor, line)
        })
        .await
        .context("the line editor failed")?;
        let editor = self.editor.insert(editor);
        match line {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                    if let Some(path) = &self.history {
                        save_history(editor, path);
                    }
                }
                Ok(Entry::Text(turn(&line)))
            }
            Err(rustyline::error::ReadlineError::Interrupted) => Ok(Entry::Interrupted),
            Err(rustyline::error::ReadlineError::Eof) => Ok(Entry::End),
            Err(e) => Err(e).context("cannot read the terminal"),
        }
    }
}

/// Appends the new entry to the history file at once, so that a chat ended by a signal or a
/// crash keeps what was typed, and two chats at once do not overwrite each other's.
fn save_history(editor: &mut Editor<Continuation, FileHistory>, path: &std::path::Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = editor.append_history(path) {
        warn_once(&format!(
            "cannot save the history to {}: {e}",
            path.display()
        ));
    }
}

/// A warning on stderr, once per chat: history is a convenience, not worth stopping for.
fn warn_once(message: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("marengoctl: {message}"));
}

/// `$XDG_STATE_HOME/marengo/chat_history`, or `~/.local/state/marengo/chat_history`: history
/// is state, kept but not worth a backup (XDG Base Directory specification).
fn history_path() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
        })?;
    Some(state.join("marengo").join("chat_history"))
}

/// Tells the line editor that Enter inside a `"""` block or after a final `\` starts a new
/// line instead of sending.
struct Continuation;

impl Validator for Continuation {
    fn validate(&self, ctx: &mut ValidationContext<'_>) -> rustyline::Result<ValidationResult> {
        Ok(if incomplete(ctx.input()) {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

impl Completer for Continuation {
    type Candidate = String;
}

impl Hinter for Continuation {
    type Hint = String;
}

impl Highlighter for Continuation {}

impl Helper for Continuation {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_final_backslash_continues_the_turn() {
        assert!(incomplete("first \\"));
        assert!(!incomplete("first \\\nsecond"));
        assert_eq!(turn("first \\\nsecond"), "first \nsecond");
    }

    #[test]
    fn a_block_runs_to_its_closing_quotes() {
        assert!(incomplete("\"\"\"one"));
        assert!(incomplete("\"\"\"one\ntwo \\"));
        assert!(!incomplete("\"\"\"one\ntwo\"\"\""));
        assert_eq!(turn("\"\"\"\none\ntwo \\\n\"\"\""), "one\ntwo \\");
        assert_eq!(turn("\"\"\"one\"\"\""), "one");
    }

    #[test]
    fn a_plain_line_is_a_turn() {
        assert!(!incomplete("Hello \"\"\" there"));
        assert_eq!(turn("Hello"), "Hello");
    }
}
