//! `memosctl`: the operators' and auditors' command line. It reads the same configuration as
//! `memos` (defaults, `memos.toml`, `MEMOS_KAFKA_BROKERS`/`DATABASE_URL`, `MEMOS__*`).

mod bench;
mod dlq;
mod lag;

use anyhow::Context;
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load().context("invalid configuration")?;
    match cli.command {
        Command::Lag { group, json } => lag::run(&config, group.as_deref(), json).await,
        Command::Dlq { command } => dlq::run(&config, command).await,
        Command::Bench { bench } => bench::run(&config, bench).await,
    }
}
