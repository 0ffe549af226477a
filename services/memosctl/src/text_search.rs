//! `memosctl text-search apply`: regenerates the full-text column `memories.content_tsv` of
//! the live views (and its GIN index) with `memory.text_search_config`. A process refuses to
//! start while the column was built with another configuration than its own, so this is
//! the way to change the setting in place: it rewrites the memories table under an exclusive
//! lock (reads and the projector wait meanwhile). The alternative, without the lock, is a
//! rebuild (`memosctl replay`, whose fresh schema uses the setting) and `memosctl promote`.

use anyhow::Context;
use clap::Subcommand;
use memos_runtime::Config;

#[derive(Subcommand)]
pub enum TextSearchCommand {
    /// Rebuilds `memories.content_tsv` with `memory.text_search_config` (rewrites the table).
    Apply,
}

pub async fn run(config: &Config, command: TextSearchCommand) -> anyhow::Result<()> {
    match command {
        TextSearchCommand::Apply => {
            let pool = memos_postgres::connect(&config.postgres)
                .await
                .context("E_POSTGRES: cannot connect to PostgreSQL")?;
            memos_postgres::migrate(&pool)
                .await
                .context("E_MIGRATE: migration failed")?;
            let wanted = &config.memory.text_search_config;
            let changed = memos_postgres::pool::apply_text_search(&pool, wanted).await?;
            if changed {
                println!("memories.content_tsv rebuilt with text search configuration {wanted}");
            } else {
                println!("memories.content_tsv already uses text search configuration {wanted}");
            }
            Ok(())
        }
    }
}
