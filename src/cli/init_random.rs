//! `tessera init-random`: not written yet.

use clap::Args;

#[derive(Debug, Args)]
pub struct InitRandomArgs {}

pub fn run(_args: InitRandomArgs) -> anyhow::Result<()> {
    anyhow::bail!("tessera init-random is not available yet")
}
