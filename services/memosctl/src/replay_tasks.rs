//! `memosctl replay --projection tasks --into <schema> [--until ...]`: rebuilds the task views
//! (agents, tasks, workflows, workflow templates, the task event trail) from
//! `memos.task.events` into a fresh PostgreSQL schema.
//!
//! How: the schema is created and migrated like the live one; the events topic is read
//! `read_committed` (decisions of aborted orchestrator transactions are never seen) from the
//! start of every partition up to the end offsets seen at start or the `--until` bound, and
//! applied in large chunks through the task projection's own decode and apply
//! ([`tasks::batch::prepare`], [`tasks::batch::apply_to`]): one transaction and one
//! set-based statement per table per chunk, the projection offsets in the same transaction.
//! Progress goes to stderr.
//!
//! Guarantees: the same fold as the live projection, so a rebuild up to the live offsets
//! verifies equal to the live views (`memosctl verify <schema>` compares the task tables of a
//! schema that holds the tasks projection); a projector pointed at the schema continues
//! after the last replayed event; the live views are never touched.

use std::time::Instant;

use anyhow::Context;
use memos_postgres::bulk;
use memos_projector::batch::Record;
use memos_projector::tasks::{self, TASK_PROJECTION};
use memos_runtime::Config;
use serde::Serialize;
use sqlx::Executor;
use sqlx::postgres::PgPoolOptions;

use crate::logread;
use crate::replay::{ReplayArgs, Until, plan};

#[derive(Debug, Default, Serialize)]
struct Report {
    schema: String,
    projection: &'static str,
    events: u64,
    undecodable: u64,
    chunks: u64,
    total_seconds: f64,
    events_per_second: f64,
}

pub async fn run(config: &Config, args: &ReplayArgs, until: Until) -> anyhow::Result<()> {
    let started = Instant::now();
    let url = config.postgres.url.expose().to_owned();
    let pool = memos_postgres::connect(&config.postgres)
        .await
        .context("E_POSTGRES: cannot connect to PostgreSQL")?;
    bulk::create_schema(
        &pool,
        &url,
        &args.into,
        args.replace,
        &config.memory.text_search_config,
    )
    .await?;
    let path = format!("SET search_path TO {}, public", args.into);
    let target = PgPoolOptions::new()
        .max_connections(2)
        .after_connect(move |conn, _| {
            let path = path.clone();
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(path)).await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .context("E_POSTGRES: cannot connect to the rebuilt schema")?;

    let topic = config.topics.task_events.clone();
    let ranges = plan(&config.kafka, &topic, &until)?;
    let total: i64 = ranges.iter().map(|r| r.end - r.start).sum();
    eprintln!("replay: {total} offsets of {topic} into schema {}", args.into);

    // The log is read on a blocking thread and handed over in chunks.
    let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Vec<Record>>(2);
    let reader = {
        let (kafka, topic, chunk, until) = (
            config.kafka.clone(),
            topic.clone(),
            args.chunk.max(1),
            until.clone(),
        );
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let consumer = logread::reader(&kafka)?;
            let mut buffer = Vec::with_capacity(chunk);
            logread::scan(&consumer, &topic, &ranges, |record| {
                if let Until::Time(t) = &until
                    && record.time().is_some_and(|time| time >= *t)
                {
                    return Ok(true);
                }
                buffer.push(Record {
                    traceparent: record.header(memos_kafka::headers::TRACEPARENT),
                    tracestate: record.header(memos_kafka::headers::TRACESTATE),
                    partition: record.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    key: record.key,
                    payload: record.payload,
                });
                if buffer.len() >= chunk {
                    let full = std::mem::replace(&mut buffer, Vec::with_capacity(chunk));
                    chunks_tx.blocking_send(full).context("replay stopped")?;
                }
                Ok(true)
            })?;
            if !buffer.is_empty() {
                chunks_tx.blocking_send(buffer).context("replay stopped")?;
            }
            Ok(())
        })
    };

    let mut report = Report {
        schema: args.into.clone(),
        projection: TASK_PROJECTION,
        ..Report::default()
    };
    let mut last_print = Instant::now();
    while let Some(records) = chunks_rx.recv().await {
        let prepared = tasks::batch::prepare(&records);
        tasks::batch::apply_to(&target, TASK_PROJECTION, &topic, &prepared)
            .await
            .context("E_POSTGRES: cannot apply a chunk of task events")?;
        report.events += prepared.events.len() as u64;
        report.undecodable += prepared.dead.len() as u64;
        report.chunks += 1;
        if last_print.elapsed().as_secs() >= 1 {
            last_print = Instant::now();
            let rate = report.events as f64 / started.elapsed().as_secs_f64();
            eprintln!("replay: {} events ({rate:.0}/s)", report.events);
        }
    }
    reader.await??;
    report.total_seconds = started.elapsed().as_secs_f64();
    report.events_per_second = report.events as f64 / report.total_seconds.max(1e-9);
    target.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "rebuilt schema {}: {} task events ({} undecodable) in {} chunks, {:.1}s ({:.0} events/s)",
            report.schema,
            report.events,
            report.undecodable,
            report.chunks,
            report.total_seconds,
            report.events_per_second
        );
        println!("compare with the live views: memosctl verify {}", report.schema);
    }
    Ok(())
}
