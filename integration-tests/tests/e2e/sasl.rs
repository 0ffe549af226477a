//! The broker with SASL/SCRAM and ACLs (`scripts/stack up --sasl`): a client without
//! credentials, with a wrong password, or authenticated as a principal without `WRITE` on a
//! topic is refused by the broker itself, and memOS's roles run with their own principals.
//!
//! `#[ignore]`d in the normal run, whose stack is plaintext: `scripts/test` starts a SASL
//! stack in `.stack-sasl` and runs them with
//! `MEMOS_SASL_STACK_DIR=.stack-sasl cargo test -p memos-integration-tests --test e2e -- --ignored sasl`.
//! Every client here is built by memOS's own `memos_kafka::client::base_config`, as the
//! processes' are.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use memos_integration_tests::api::Keyed;
use memos_integration_tests::process::{binary, memosctl_as};
use memos_integration_tests::{MemosProcess, TestEnv, eventually, metrics_text};
use memos_runtime::config::{KafkaConfig, SaslConfig, SaslMechanism, Secret, SecurityProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Reads `export KEY=value` lines.
fn env_file(path: &std::path::Path) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// The SASL stack named by `MEMOS_SASL_STACK_DIR`.
struct SaslStack {
    dir: PathBuf,
    addresses: HashMap<String, String>,
}

impl SaslStack {
    fn open() -> anyhow::Result<SaslStack> {
        let dir = std::env::var_os("MEMOS_SASL_STACK_DIR").map(PathBuf::from).context(
            "MEMOS_SASL_STACK_DIR is not set: start a stack with `STACK_DIR=.stack-sasl scripts/stack up --sasl` (other ports: see scripts/test) and name it",
        )?;
        let addresses = env_file(&dir.join("env"))?;
        Ok(SaslStack { dir, addresses })
    }

    /// The `MEMOS__KAFKA__*` (and `MEMOS__TOPICS__CREATE`) variables of a principal.
    fn principal(&self, name: &str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(env_file(&self.dir.join("sasl").join(format!("{name}.env")))?
            .into_iter()
            .collect())
    }

    fn brokers(&self) -> String {
        self.addresses["MEMOS_KAFKA_BROKERS"].clone()
    }

    /// A client configuration of `name` (`None`: no credentials at all), `password`
    /// replacing its own when given.
    fn kafka(&self, name: Option<&str>, password: Option<&str>) -> anyhow::Result<KafkaConfig> {
        let mut kafka = memos_runtime::Config::default().kafka;
        kafka.brokers = self.brokers();
        kafka.delivery_timeout = Duration::from_secs(5);
        if let Some(name) = name {
            let vars: HashMap<_, _> = self.principal(name)?.into_iter().collect();
            kafka.security_protocol = SecurityProtocol::SaslPlaintext;
            kafka.sasl = Some(SaslConfig {
                mechanism: SaslMechanism::ScramSha512,
                username: vars["MEMOS__KAFKA__SASL__USERNAME"].clone(),
                password: Secret::new(password.unwrap_or(&vars["MEMOS__KAFKA__SASL__PASSWORD"])),
            });
        }
        Ok(kafka)
    }

    /// A test's slice of this stack, its topics and groups named under the prefixes the
    /// stack's ACLs grant (`memos.memory.commands.it-ID`, `memos-projector-it-ID`, ...); its
    /// own clients are the super user's.
    async fn test_env(&self) -> anyhow::Result<TestEnv> {
        let mut env = TestEnv::on(
            self.brokers(),
            self.addresses["DATABASE_URL"].clone(),
            self.addresses["REDIS_URL"].clone(),
        )
        .await?;
        let id = format!("it-{}", env.id());
        env.commands_topic = format!("memos.memory.commands.{id}");
        env.task_commands_topic = format!("memos.task.commands.{id}");
        env.task_events_topic = format!("memos.task.events.{id}");
        env.dead_letter_topic = format!("memos.dlq.{id}");
        env.keys_topic = format!("memos.keys.{id}");
        env.group_id = format!("memos-projector-{id}");
        env.orchestrator_group_id = format!("memos-orchestrator-{id}");
        let admin = self.kafka(Some("admin"), None)?;
        let config = memos_kafka::client::base_config(&admin, "test");
        env.kafka_properties = [
            "security.protocol",
            "sasl.mechanism",
            "sasl.username",
            "sasl.password",
        ]
        .into_iter()
        .filter_map(|k| Some((k.to_owned(), config.get(k)?.to_owned())))
        .collect();
        Ok(env)
    }

    /// `memos create-topics` as the operator (the roles may not create topics).
    fn create_topics(&self, env: &TestEnv) -> anyhow::Result<()> {
        let output = std::process::Command::new(binary("memos")?)
            .arg("create-topics")
            .envs(env.process_env())
            .envs(self.principal("memos-operator")?)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "memos create-topics as memos-operator failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

/// Records what librdkafka reports through the error callback (the broker closing the
/// connection, an authentication failure), which a failed delivery alone does not tell.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<KafkaError>>>);

impl rdkafka::ClientContext for Errors {
    fn error(&self, error: KafkaError, _reason: &str) {
        self.0.lock().unwrap().push(error);
    }
}

impl Errors {
    fn codes(&self) -> Vec<RDKafkaErrorCode> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(KafkaError::rdkafka_error_code)
            .collect()
    }
}

/// One record produced to `topic` as memOS's producer does (idempotent, `acks=all`), with
/// `kafka`'s credentials; the delivery and what the error callback saw.
async fn produce(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<(Result<(), KafkaError>, Errors)> {
    let errors = Errors::default();
    let mut config = memos_kafka::client::base_config(kafka, "sasl-test");
    config.set("enable.idempotence", "true").set("acks", "all").set(
        "message.timeout.ms",
        kafka.delivery_timeout.as_millis().to_string(),
    );
    let producer: FutureProducer<Errors> = config.create_with_context(errors.clone())?;
    let delivered = producer
        .send(
            FutureRecord::to(topic).key("k").payload("not a command"),
            Timeout::Never,
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| e);
    Ok((delivered, errors))
}

/// Records in `topic`, counted by the super user.
fn records(env: &TestEnv, topic: &str) -> anyhow::Result<i64> {
    Ok(env.high_watermarks(topic)?.iter().map(|(_, high)| high).sum())
}

fn refused_for_the_topic(delivered: &Result<(), KafkaError>) -> bool {
    matches!(
        delivered,
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the SASL stack: MEMOS_SASL_STACK_DIR (scripts/test runs it)"]
async fn sasl_a_producer_without_credentials_is_refused() -> anyhow::Result<()> {
    let stack = SaslStack::open()?;
    let env = stack.test_env().await?;
    stack.create_topics(&env)?;

    let (delivered, _) = produce(&stack.kafka(Some("memos-api"), None)?, &env.commands_topic).await?;
    delivered.context("memos-api writes commands")?;

    let (delivered, errors) = produce(&stack.kafka(None, None)?, &env.commands_topic).await?;
    assert!(delivered.is_err(), "a producer without credentials delivered");
    // The broker hangs up on a client that does not start with a SASL handshake.
    assert!(
        errors.codes().iter().any(|c| matches!(
            c,
            RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown
        )),
        "{:?}",
        errors.codes()
    );
    assert_eq!(
        records(&env, &env.commands_topic)?,
        1,
        "only memos-api's record is in the log"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the SASL stack: MEMOS_SASL_STACK_DIR (scripts/test runs it)"]
async fn sasl_a_wrong_password_is_refused() -> anyhow::Result<()> {
    let stack = SaslStack::open()?;
    let env = stack.test_env().await?;
    stack.create_topics(&env)?;

    let kafka = stack.kafka(Some("memos-api"), Some("not-the-password"))?;
    let (delivered, errors) = produce(&kafka, &env.commands_topic).await?;
    assert!(delivered.is_err(), "memos-api with a wrong password delivered");
    assert!(
        errors.codes().contains(&RDKafkaErrorCode::Authentication),
        "no authentication failure reported: {:?}",
        errors.codes()
    );
    assert_eq!(records(&env, &env.commands_topic)?, 0);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the SASL stack: MEMOS_SASL_STACK_DIR (scripts/test runs it)"]
async fn sasl_principals_without_write_on_a_topic_are_refused() -> anyhow::Result<()> {
    let stack = SaslStack::open()?;
    let env = stack.test_env().await?;
    stack.create_topics(&env)?;

    // Authenticated, but not allowed: the projector only reads commands, the orchestrator
    // writes task commands (its ticks) but not memory commands, the API may neither forge
    // the orchestrator's decisions nor issue keys.
    for (principal, topic) in [
        ("memos-projector", &env.commands_topic),
        ("memos-projector", &env.task_commands_topic),
        ("memos-orchestrator", &env.commands_topic),
        ("memos-api", &env.task_events_topic),
        ("memos-api", &env.keys_topic),
    ] {
        let (delivered, _) = produce(&stack.kafka(Some(principal), None)?, topic).await?;
        assert!(
            refused_for_the_topic(&delivered),
            "{principal} writing {topic}: {delivered:?}"
        );
        assert_eq!(records(&env, topic)?, 0, "{principal} wrote {topic}");
    }
    // The same principals where the ACLs let them.
    for (principal, topic) in [
        ("memos-api", &env.commands_topic),
        ("memos-api", &env.task_commands_topic),
        ("memos-projector", &env.dead_letter_topic),
        ("memos-orchestrator", &env.task_events_topic),
    ] {
        let (delivered, _) = produce(&stack.kafka(Some(principal), None)?, topic).await?;
        delivered.with_context(|| format!("{principal} writing {topic}"))?;
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the SASL stack: MEMOS_SASL_STACK_DIR (scripts/test runs it)"]
async fn sasl_memos_runs_with_its_principals_and_projects_a_write() -> anyhow::Result<()> {
    let stack = SaslStack::open()?;
    let env = stack.test_env().await?;
    stack.create_topics(&env)?;
    let operator = stack.principal("memos-operator")?;
    let operator: Vec<(&str, &str)> = operator.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // The operator issues a key (it alone may write the keys log).
    let agent = format!("sasl-{}", &env.id()[..8]);
    let out = memosctl_as(
        &env,
        &operator,
        &[
            "keys",
            "create",
            "--principal",
            &agent,
            "--role",
            "agent",
            "--json",
        ],
    )?;
    anyhow::ensure!(
        out.code == 0,
        "memosctl keys create: {}\n{}",
        out.stderr,
        out.stdout
    );
    let issued: Value = serde_json::from_str(out.stdout.trim())?;
    let key = issued["key"].as_str().context("no key printed")?.to_owned();

    let mut processes = Vec::new();
    for (role, principal) in [
        ("orchestrator", "memos-orchestrator"),
        ("projector", "memos-projector"),
        ("api", "memos-api"),
    ] {
        let mut vars = stack.principal(principal)?;
        vars.push(("MEMOS__HTTP__AUTH".into(), "keys".into()));
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        processes.push(MemosProcess::start(&env, role, &vars).await?);
    }
    let api = Keyed::new(&processes[2].url(""), Some(&key));

    let content = format!("written through SASL by {agent}");
    let accepted = api
        .call(
            Method::POST,
            "/v1/memories",
            Some(json!({"agent_id": agent, "content": content})),
            &[],
        )
        .await?;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let memory_id = accepted.body["memory_id"]
        .as_str()
        .context("no memory_id")?
        .to_owned();
    let memory = eventually("the projector to apply the write", WAIT, || {
        let api = api.clone();
        let path = format!("/v1/memories/{memory_id}");
        async move {
            let answer = api.call(Method::GET, &path, None, &[]).await?;
            Ok((answer.status == 200).then_some(answer.body))
        }
    })
    .await?;
    assert_eq!(memory["content"], content, "{memory}");

    // The orchestrator commits transactions (its ticks) as memos-orchestrator: its
    // transactional id, group and topics are granted.
    let orchestrator = processes[0].url("/metrics");
    eventually("a committed orchestrator transaction", WAIT, || {
        let url = orchestrator.clone();
        async move {
            let text = reqwest::get(&url).await?.text().await?;
            let committed = metrics_text::sum(
                &text,
                "memos_orchestrator_transactions_total",
                &[("outcome", "committed")],
            );
            Ok(committed.filter(|n| *n > 0.0))
        }
    })
    .await?;
    for process in &processes {
        let log = process.log_text();
        assert!(
            !log.contains("Authorization") && !log.contains("AUTHORIZATION"),
            "a role was refused something:\n{log}"
        );
    }
    drop(processes);
    env.cleanup().await;
    Ok(())
}
