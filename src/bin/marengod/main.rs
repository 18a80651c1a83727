//! `marengod`: the marengo daemon. `serve` offers generation over D-Bus; `generate` runs one
//! generation in the foreground, without D-Bus, for users, scripts and checks; `perplexity`
//! scores a text, alone or against a reference bundle.

mod generate;
mod perplexity;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "marengod",
    version,
    about = "Offline on-device text generation over D-Bus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve org.marengo.Llm1 on a message bus.
    Serve(serve::Args),
    /// Run one generation from a bundle and stream the text to stdout.
    Generate(generate::Args),
    /// Perplexity of a bundle over a text file, and its KL divergence from a reference bundle.
    Perplexity(perplexity::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Perplexity(args) => perplexity::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("marengod: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
