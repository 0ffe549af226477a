//! The isolation of records PostgreSQL refuses, driven through the library's apply path
//! against the real PostgreSQL and Kafka of the local stack (`scripts/stack up`). The
//! batches are built as decoded commands, not decoded from bytes, so these tests keep
//! exercising the apply path whatever validation the decoder does first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use memos_integration_tests::TestEnv;
use memos_kafka::CommandProducer;
use memos_kafka::admin::{TopicSpec, dead_letter_max_bytes, ensure_topics};
use memos_postgres::errors::{Failure, classify};
use memos_projector::batch::{self, Prepared, Record, Sinks};
use memos_projector::fold::{Decided, FoldConfig};
use memos_projector::tasks::batch::{self as task_batch, TaskSinks};
use memos_projector::tasks::fold::DecidedEvent;
use memos_redis::HotViews;
use memos_runtime::Config;
use memos_runtime::config::Secret;
use memos_schemas::task::{TaskEvent, TaskEventType};
use memos_schemas::{MemoryCommand, Tier, UpdateMemory, WriteMemory};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

fn config(env: &TestEnv) -> Config {
    let mut config = Config::default();
    config.kafka.brokers = env.brokers.clone();
    config.postgres.url = Secret::new(env.database_url.clone());
    config.topics.memory_commands = env.commands_topic.clone();
    config.topics.task_events = env.task_events_topic.clone();
    config.topics.dead_letter = env.dead_letter_topic.clone();
    config.topics.partitions = 2;
    config
}

/// The migrated views of `env`'s database, and its dead-letter topic.
async fn prepare_stack(
    env: &TestEnv,
    config: &Config,
) -> anyhow::Result<(PgPool, HotViews, CommandProducer)> {
    let pool = memos_postgres::connect(&config.postgres).await?;
    memos_postgres::migrate(&pool).await?;
    ensure_topics(
        &config.kafka,
        &[TopicSpec::dead_letter(&config.topics.dead_letter, &config.topics)],
    )
    .await?;
    let hot = HotViews::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(60)).await?;
    let producer =
        CommandProducer::with_max_message_bytes(&config.kafka, Some(dead_letter_max_bytes(&config.topics)))?;
    Ok((pool, hot, producer))
}

/// Every letter on the dead-letter topic: origin (partition, offset), class, message.
fn read_letters(env: &TestEnv, expected: usize) -> anyhow::Result<Vec<(i32, i64, String, String)>> {
    let mut config = env.kafka_config();
    config.set("group.id", format!("{}-isolation-reader", env.group_id));
    let consumer: BaseConsumer = config.create()?;
    let mut tpl = TopicPartitionList::new();
    for partition in 0..2 {
        tpl.add_partition_offset(&env.dead_letter_topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let header = |m: &rdkafka::message::BorrowedMessage<'_>, name: &str| {
        m.headers()
            .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let mut letters = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let m = message?;
            letters.push((
                header(&m, "memos-dlq-origin-partition").parse()?,
                header(&m, "memos-dlq-origin-offset").parse()?,
                header(&m, "memos-dlq-error-class"),
                header(&m, "memos-dlq-error-message"),
            ));
        } else if letters.len() >= expected {
            break;
        }
    }
    letters.sort();
    Ok(letters)
}

fn write(namespace: &str, memory_id: &str, content: &str) -> WriteMemory {
    WriteMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: namespace.into(),
        actor: namespace.into(),
        issued_at: 1_790_000_000_000,
        traceparent: None,
        memory_id: memory_id.into(),
        content: content.into(),
        tier: Tier::Semantic,
        tags: vec!["t".into()],
        metadata_json: "{}".into(),
        importance: 0.5,
        expires_at: None,
        embedding: None,
        source: None,
    }
}

/// A record at `partition:offset` and the command it decodes to (built directly).
fn crafted(partition: i32, offset: i64, command: MemoryCommand) -> (Record, Decided) {
    let record = Record {
        partition,
        offset,
        timestamp_ms: Some(1_790_000_000_000 + offset),
        key: Some(command.namespace().as_bytes().to_vec()),
        traceparent: None,
        tracestate: None,
        payload: Some(format!("crafted {partition}:{offset}").into_bytes()),
    };
    let decided = Decided {
        record_time: Utc.timestamp_millis_opt(record.timestamp_ms.unwrap()).unwrap(),
        traceparent: None,
        partition,
        offset,
        command,
    };
    (record, decided)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_errors_are_classified_by_sqlstate() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let raise = |code: &str| format!("DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{code}'; END $$");
    for (code, expected) in [
        ("22008", Failure::Record),
        ("22P05", Failure::Record),
        ("22021", Failure::Record),
        ("23505", Failure::Record),
        ("23503", Failure::Record),
        ("54000", Failure::Record),
        ("40001", Failure::Transient),
        ("40P01", Failure::Transient),
        ("57P01", Failure::Transient),
        ("57P03", Failure::Transient),
        ("08006", Failure::Transient),
        ("53300", Failure::Transient),
        ("55P03", Failure::Transient),
        ("57014", Failure::Transient),
        ("25P03", Failure::Transient),
        ("42P01", Failure::Transient),
        ("XX000", Failure::Transient),
    ] {
        let error = sqlx::raw_sql(sqlx::AssertSqlSafe(raise(code)))
            .execute(&env.pool)
            .await
            .expect_err("raises");
        assert_eq!(classify(&error), expected, "{code}: {error}");
        let reason = memos_postgres::errors::reason(&error);
        assert!(reason.starts_with(&format!("SQLSTATE {code}: test")), "{reason}");
    }
    // The refusals of the findings, as PostgreSQL words them.
    for sql in [
        "SELECT '+200000-01-01T00:00:00Z'::timestamptz",
        "SELECT '\"a\\u0000b\"'::jsonb",
        "SELECT convert_from('\\x6100'::bytea, 'UTF8')",
    ] {
        let error = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&env.pool)
            .await
            .expect_err("refused");
        assert_eq!(classify(&error), Failure::Record, "{sql}: {error}");
    }
    // A connection terminated by an administrator is transient.
    let mut conn = env.pool.acquire().await?;
    let error = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(&mut *conn)
        .await
        .expect_err("terminated");
    assert_eq!(classify(&error), Failure::Transient, "{error}");
    drop(conn);
    env.cleanup().await;
    Ok(())
}

/// The pool's session bounds, against the real server: a waiter for a row lock fails after
/// `lock_timeout`, a statement after `statement_timeout`, and a transaction left idle (a
/// stopped process) is ended after `idle_in_transaction_timeout`, releasing its locks; its
/// work never commits. Every one of these failures is transient (retried, never isolated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_bounds_end_stalled_transactions_with_transient_errors() -> anyhow::Result<()> {
    use sqlx::Connection;

    let env = TestEnv::new().await?;
    let mut config = config(&env);
    config.postgres.lock_timeout = Duration::from_millis(200);
    config.postgres.statement_timeout = Duration::from_millis(300);
    config.postgres.idle_in_transaction_timeout = Duration::from_millis(500);
    let pool = memos_postgres::connect(&config.postgres).await?;
    memos_postgres::migrate(&pool).await?;
    let (topic, partitions) = (env.commands_topic.as_str(), [0]);
    let settings: (String, String, String, String) = sqlx::query_as(
        "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),
                current_setting('idle_in_transaction_session_timeout'), current_setting('application_name')",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        (settings.0.as_str(), settings.1.as_str(), settings.2.as_str()),
        ("200ms", "300ms", "500ms")
    );
    assert!(
        settings.3.ends_with(&format!("[{}]", std::process::id())),
        "{}",
        settings.3
    );

    // A holder without bounds (another tool's session) keeps the offset row locked: the
    // projector's lock wait ends with 55P03 instead of waiting for it.
    let mut holder = sqlx::PgConnection::connect(&env.database_url).await?;
    let mut held = holder.begin().await?;
    memos_postgres::offsets::lock_and_load(&mut held, "memory", topic, &partitions).await?;
    let mut waiter = pool.begin().await?;
    let error = memos_postgres::offsets::lock_and_load(&mut waiter, "memory", topic, &partitions)
        .await
        .expect_err("the lock wait is bounded");
    assert_eq!(
        memos_postgres::errors::sqlstate(&error).as_deref(),
        Some("55P03"),
        "{error}"
    );
    assert_eq!(classify(&error), Failure::Transient, "{error}");
    drop(waiter);
    held.rollback().await?;
    holder.close().await?;

    // A statement running too long ends with 57014.
    let error = sqlx::query("SELECT pg_sleep(30)")
        .execute(&pool)
        .await
        .expect_err("the statement is bounded");
    assert_eq!(
        memos_postgres::errors::sqlstate(&error).as_deref(),
        Some("57014"),
        "{error}"
    );
    assert_eq!(classify(&error), Failure::Transient, "{error}");

    // A zombie: it locked the row and moved the offset, then stopped. The server ends its
    // session; the row is free for the next owner and the zombie's work never commits.
    let mut zombie = pool.begin().await?;
    let (zombie_pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut *zombie)
        .await?;
    memos_postgres::offsets::lock_and_load(&mut zombie, "memory", topic, &partitions).await?;
    memos_postgres::offsets::advance(&mut zombie, "memory", topic, &BTreeMap::from([(0, 10)])).await?;
    memos_integration_tests::eventually(
        "the server to end the idle transaction's session",
        Duration::from_secs(30),
        || async {
            let (alive,): (bool,) =
                sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                    .bind(zombie_pid)
                    .fetch_one(&env.pool)
                    .await?;
            Ok((!alive).then_some(()))
        },
    )
    .await?;
    let mut owner = pool.begin().await?;
    let stored = memos_postgres::offsets::lock_and_load(&mut owner, "memory", topic, &partitions).await?;
    assert_eq!(stored[&0], 0, "the zombie's offset never committed");
    memos_postgres::offsets::advance(&mut owner, "memory", topic, &BTreeMap::from([(0, 4)])).await?;
    owner.commit().await?;
    let error = zombie.commit().await.expect_err("the zombie's session is gone");
    assert_eq!(classify(&error), Failure::Transient, "{error}");
    let (next,): (i64,) = sqlx::query_as("SELECT next_offset FROM projection_offsets WHERE topic = $1")
        .bind(topic)
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(next, 4, "only the owner's transaction committed");

    // Migrations and index builds are not bounded (they may take long on large tables).
    memos_postgres::migrate(&pool).await?;
    memos_postgres::pool::ensure_vector_index(&pool, 3).await?;
    pool.close().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_memory_commands_are_isolated_and_the_rest_applied_in_order() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let config = config(&env);
    let (pool, hot, producer) = prepare_stack(&env, &config).await?;
    let sinks = Sinks {
        pool: pool.clone(),
        hot,
        producer,
        topic: env.commands_topic.clone(),
        dead_letter_topic: env.dead_letter_topic.clone(),
        dead_letter_max_bytes: dead_letter_max_bytes(&config.topics),
        projection: memos_projector::MEMORY_PROJECTION.to_owned(),
        fold: FoldConfig {
            topic: env.commands_topic.clone(),
            embedding_dimensions: Some(3),
        },
    };
    let id = |n: u8| format!("00000000-0000-4000-8000-0000000000{n:02}");
    let far = Utc
        .with_ymd_and_hms(200_000, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    let mut too_far = write("agent-a", &id(1), "expires in year 200000");
    too_far.expires_at = Some(far);
    let mut nul_tag = write("agent-b", &id(11), "a tag with NUL");
    nul_tag.tags = vec!["x\u{0}y".into()];
    let update = UpdateMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: "agent-a".into(),
        actor: "agent-a".into(),
        issued_at: 1_790_000_000_000,
        traceparent: None,
        memory_id: id(2),
        expected_version: Some(1),
        content: Some("updated after the bad ones".into()),
        tier: None,
        tags: None,
        metadata_json: None,
        importance: None,
        expires_at: None,
        clear_expiry: false,
        embedding: None,
    };
    // Log order; agent-a on partition 0, agent-b on partition 1.
    let batch: Vec<(Record, Decided)> = vec![
        crafted(0, 0, MemoryCommand::Write(write("agent-a", &id(0), "first"))),
        crafted(1, 0, MemoryCommand::Write(write("agent-b", &id(10), "b first"))),
        crafted(0, 1, MemoryCommand::Write(too_far)),
        crafted(1, 1, MemoryCommand::Write(nul_tag)),
        crafted(0, 2, MemoryCommand::Write(write("agent-a", &id(2), "third"))),
        crafted(1, 2, MemoryCommand::Write(write("agent-b", &id(12), "b third"))),
        crafted(
            0,
            3,
            MemoryCommand::Write(write("agent-a", &id(3), "NUL \u{0} inside")),
        ),
        crafted(0, 4, MemoryCommand::Update(update)),
        crafted(0, 5, MemoryCommand::Write(write("agent-a", &id(5), "last"))),
    ];
    let records: Vec<Record> = batch.iter().map(|(r, _)| r.clone()).collect();
    let prepared = Prepared {
        commands: batch.into_iter().map(|(_, d)| d).collect(),
        dead: Vec::new(),
        next_offsets: BTreeMap::from([(0, 6), (1, 3)]),
    };
    // Without isolation, the batch is refused as a whole (the outage of the finding).
    let whole = batch::apply(&sinks, &prepared)
        .await
        .expect_err("refused as a whole");
    assert_eq!(classify(&whole), Failure::Record, "{whole}");

    let groups = batch::split(prepared, 2);
    let done = batch::apply_all(&sinks, &records, &groups).await?;
    let poisoned: Vec<(i32, i64)> = done.poisoned.iter().map(|p| (p.partition, p.offset)).collect();
    let mut sorted = poisoned.clone();
    sorted.sort();
    assert_eq!(sorted, vec![(0, 1), (0, 3), (1, 1)]);
    assert!(
        done.poisoned
            .iter()
            .all(|p| p.sqlstate.as_deref().is_some_and(|c| c.starts_with("22")))
    );
    assert_eq!(done.outcome.applied, 6);

    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT memory_id::text, content, version FROM memories ORDER BY memory_id")
            .fetch_all(&pool)
            .await?;
    let expected = vec![
        (id(0), "first".to_owned(), 1),
        (id(2), "updated after the bad ones".to_owned(), 2),
        (id(5), "last".to_owned(), 1),
        (id(10), "b first".to_owned(), 1),
        (id(12), "b third".to_owned(), 1),
    ];
    assert_eq!(rows, expected, "every valid command applied, in log order");
    let offsets: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM projection_offsets ORDER BY partition")
            .fetch_all(&pool)
            .await?;
    assert_eq!(offsets, vec![(0, 6), (1, 3)], "offsets past the isolated records");

    let letters = read_letters(&env, 3)?;
    assert_eq!(letters.len(), 3, "{letters:?}");
    for ((partition, offset, class, message), expected) in letters.iter().zip(&sorted) {
        assert_eq!((*partition, *offset), *expected);
        assert_eq!(class, "unstorable");
        assert!(message.starts_with("SQLSTATE 22"), "{message}");
    }

    // Applying the same batch again (a redelivery) changes nothing and letters nothing.
    let again = batch::apply_all(&sinks, &records, &groups).await?;
    assert_eq!((again.outcome.applied, again.poisoned.len()), (0, 0));
    assert_eq!(again.already_applied, 9);
    pool.close().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_event_postgres_refuses_is_isolated_and_the_rest_applied() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let config = config(&env);
    let (pool, hot, producer) = prepare_stack(&env, &config).await?;
    let sinks = TaskSinks {
        pool: pool.clone(),
        hot,
        producer,
        topic: env.task_events_topic.clone(),
        dead_letter_topic: env.dead_letter_topic.clone(),
        dead_letter_max_bytes: dead_letter_max_bytes(&config.topics),
        projection: memos_projector::tasks::TASK_PROJECTION.to_owned(),
    };
    let accepted = |offset: i64, task: &str, payload: &str| {
        let mut event = TaskEvent::new(
            uuid::Uuid::new_v4().to_string(),
            TaskEventType::TaskAccepted,
            1_790_000_000_000 + offset,
        );
        event.task_id = Some(task.into());
        event.actor = Some("boss".into());
        event.data_json = Some(format!(
            r#"{{"required_capabilities":["x"],"payload":{payload},"priority":0,"timeout_ms":1000,"max_attempts":1,"preferred_agent":null}}"#
        ));
        let record = Record {
            partition: 0,
            offset,
            timestamp_ms: Some(event.at),
            key: Some(task.as_bytes().to_vec()),
            traceparent: None,
            tracestate: None,
            payload: Some(event.encode().expect("encodes")),
        };
        let decided = DecidedEvent {
            record_time: Utc.timestamp_millis_opt(event.at).unwrap(),
            traceparent: None,
            partition: 0,
            offset,
            event,
        };
        (record, decided)
    };
    let batch = [
        accepted(0, "t0", r#"{"n":0}"#),
        accepted(1, "t1", r#"{"text":"a\u0000b"}"#),
        accepted(2, "t2", r#"{"n":2}"#),
    ];
    let records: Vec<Record> = batch.iter().map(|(r, _)| r.clone()).collect();
    let prepared = task_batch::Prepared {
        events: batch.into_iter().map(|(_, d)| d).collect(),
        dead: Vec::new(),
        next_offsets: BTreeMap::from([(0, 3)]),
    };
    let done = task_batch::apply_isolating(&sinks, &records, &prepared).await?;
    assert_eq!(done.poisoned.len(), 1);
    assert_eq!((done.poisoned[0].partition, done.poisoned[0].offset), (0, 1));
    assert!(
        done.poisoned[0].reason.starts_with("SQLSTATE 22"),
        "{}",
        done.poisoned[0].reason
    );
    let tasks: Vec<(String,)> = sqlx::query_as("SELECT task_id FROM tasks ORDER BY task_id")
        .fetch_all(&pool)
        .await?;
    assert_eq!(tasks, vec![("t0".to_owned(),), ("t2".to_owned(),)]);
    let (next,): (i64,) =
        sqlx::query_as("SELECT next_offset FROM projection_offsets WHERE projection = 'tasks'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(next, 3);
    let letters = read_letters(&env, 1)?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].0, letters[0].1, letters[0].2.as_str()),
        (0, 1, "unstorable")
    );
    pool.close().await;
    env.cleanup().await;
    Ok(())
}
