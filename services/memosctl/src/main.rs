//! `memosctl`: the operators' and auditors' command line. It reads the same configuration as
//! `memos` (defaults, `memos.toml`, `MEMOS_KAFKA_BROKERS`/`DATABASE_URL`, `MEMOS__*`).

mod audit;
mod bench;
mod cache;
mod dlq;
mod export;
mod keys;
mod lag;
mod logread;
mod promote;
mod replay;
mod replay_tasks;
mod text_search;
mod topics;
mod verify;

use anyhow::Context;

/// A rebuild allocates and frees millions of small objects (decoded commands, JSON trees,
/// rows); mimalloc spends a fraction of glibc's time on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use memos_runtime::Config;

#[derive(Parser)]
#[command(name = "memosctl", version, about = "Operate and audit memOS")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consumer lag of every consumer group (like `kafka-consumer-groups --describe`), and
    /// of every projection from the offsets stored with its views.
    Lag {
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks on the local stack (see docs/benchmarks.md); one JSON line on stdout.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// Dead letters: list them, show one, redrive them to their origin topic.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Who changed what, when: every command about a memory or of an agent, with its outcome.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Writes the raw commands of a slice of the log (Avro container file or JSON Lines).
    Export(export::ExportArgs),
    /// Rebuilds a projection's views from the log into a fresh PostgreSQL schema.
    Replay(replay::ReplayArgs),
    /// Compares a rebuilt schema's views with the live ones (exit 2 when they differ).
    Verify(verify::VerifyArgs),
    /// Makes a rebuilt schema the active views of every process, atomically.
    Promote(promote::PromoteArgs),
    /// Redis hot views: refill them from PostgreSQL.
    Cache {
        #[command(subcommand)]
        command: cache::CacheCommand,
    },
    /// API keys: issue (shown once), list, revoke; every change is in the keys log.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Command topics: check that their retention keeps the history forever.
    Topics {
        #[command(subcommand)]
        command: topics::TopicsCommand,
    },
    /// Full-text search: rebuild `memories.content_tsv` with `memory.text_search_config`.
    TextSearch {
        #[command(subcommand)]
        command: text_search::TextSearchCommand,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load().context("invalid configuration")?;
    // The operator's commands scan, copy and index whole tables: their statements get the
    // maintenance bound, not the services' one. Lock and idle-in-transaction bounds stay.
    config.postgres.statement_timeout = config.postgres.maintenance_statement_timeout;
    match cli.command {
        Command::Lag { group, json } => lag::run(&config, group.as_deref(), json).await,
        Command::Dlq { command } => dlq::run(&config, command).await,
        Command::Bench { bench } => bench::run(&config, bench).await,
        Command::Audit { command } => audit::run(&config, command).await,
        Command::Export(args) => export::run(&config, args).await,
        Command::Replay(args) => replay::run(&config, args).await,
        Command::Verify(args) => verify::run(&config, args).await,
        Command::Topics { command } => topics::run(&config, command).await,
        Command::Keys { command } => keys::run(&config, command).await,
        Command::Cache { command } => cache::run(&config, command).await,
        Command::Promote(args) => promote::run(&config, args).await,
        Command::TextSearch { command } => text_search::run(&config, command).await,
    }
}
