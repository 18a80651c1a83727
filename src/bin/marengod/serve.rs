//! `marengod serve`: the D-Bus service, whose options and behaviour live in `marengo::serve`.

use std::process::ExitCode;

pub use marengo::serve::ServeArgs as Args;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    marengo::serve::run(&args)?;
    Ok(ExitCode::SUCCESS)
}
