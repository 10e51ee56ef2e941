//! Command-line interface: one subcommand per module.

mod generate;

use clap::{Parser, Subcommand};

/// Tessera serves the DeepSeek-VL2 vision-language models.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a reply offline, in this process (no network, no services).
    Generate(generate::GenerateArgs),
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
    }
}
