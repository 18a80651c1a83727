//! Shell completions and man pages, made from the command line's own definition so that they
//! cannot drift from it. The packaging writes them with these commands
//! (`packaging/build-debs.sh`); users may too, for a shell the package does not cover.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
pub use clap_complete::Shell;

use crate::Cli;

/// Writes `shell`'s completion script for marengoctl to stdout.
pub fn completions(shell: Shell) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, "marengoctl", &mut out);
    out.flush().context("cannot write the completion script")
}

/// Writes `marengoctl.1` and one page per command (`marengoctl-chat.1`, …) into `dir`, as git
/// and cargo do: each command's options on a page of its own.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))
}
