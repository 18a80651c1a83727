//! The example clients of `examples/clients/`, as the commands a user would type: the system
//! `python3` (Debian's python3-gi is built for it, not for a venv's), `gjs`, and the C client
//! built by its own Makefile into a scratch directory, once per test binary.

use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::command::run;
use crate::paths::{repo_root, scratch_dir};

/// One example client. Each takes `--address ADDRESS`, `--max-tokens N`, `--json-schema` and
/// a prompt, streams the answer to stdout and ends its stderr with `finished: REASON`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Python,
    Gjs,
    C,
}

impl Client {
    pub const ALL: [Client; 3] = [Client::Python, Client::Gjs, Client::C];

    /// The command that runs this client, before its arguments.
    pub fn command(self) -> Command {
        let examples = repo_root().join("examples/clients");
        match self {
            Client::Python => {
                let mut command = Command::new("/usr/bin/python3");
                command.arg(examples.join("python/marengo_chat.py"));
                command
            }
            Client::Gjs => {
                let mut command = Command::new("gjs");
                command.arg(examples.join("gjs/marengo-chat.js"));
                command
            }
            Client::C => Command::new(c_client()),
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Client::Python => "python",
            Client::Gjs => "gjs",
            Client::C => "c",
        })
    }
}

/// `examples/clients/c/marengo-chat`, built by `make` out of the source tree.
fn c_client() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = scratch_dir("example_client_c");
            run(Command::new("make")
                .arg("-C")
                .arg(repo_root().join("examples/clients/c"))
                .arg(format!("OUT={}", out.display())));
            out.join("marengo-chat")
        })
        .clone()
}
