//! `memosctl keys`: API keys. `create` issues a key for a principal and prints it once (only
//! its digest is kept); `list` shows every key the keys log holds (who it is for, its role
//! and grants, who issued it and when, expiry, revocation); `revoke` ends a key. Issues and
//! revocations are appended to the keys log (`topics.keys`), which every API process follows:
//! the log is the audit trail of key management, and a revocation is in force on a running
//! API as soon as it has read it (see `docs/security.md`).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use memos_kafka::CommandProducer;
use memos_kafka::admin::{TopicSpec, ensure_topics};
use memos_runtime::Config;
use memos_runtime::keys::{self, KeyEvent, KeyRecord, Principal, Role};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Issues a key and prints it once.
    Create {
        /// The principal's name (for an agent: its agent id and namespace).
        #[arg(long)]
        principal: String,
        /// agent, service, auditor or operator.
        #[arg(long)]
        role: Role,
        /// A namespace besides its own the principal may write (repeatable).
        #[arg(long = "namespace", value_name = "NAMESPACE")]
        namespaces: Vec<String>,
        /// For a service: an agent it may act for, `*` for all (repeatable).
        #[arg(long = "agent", value_name = "AGENT")]
        agents: Vec<String>,
        /// Expires after this long (`30d`, `12h`); never when left out.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// Free text kept with the key (what it is for).
        #[arg(long)]
        note: Option<String>,
        /// Who issues it (recorded in the keys log).
        #[arg(long, env = "MEMOS_OPERATOR", default_value = "memosctl")]
        by: String,
        /// Print the key and its record as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Lists every key: principal, role, grants, issued by and when, expiry, revocation.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revokes a key (by its id, the 16 hex digits after `memos_`).
    Revoke {
        key_id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, env = "MEMOS_OPERATOR", default_value = "memosctl")]
        by: String,
    },
}

const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis).map_or_else(
        || "-".to_owned(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

async fn read_all(config: &Config) -> anyhow::Result<memos_runtime::keys::KeyRing> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || memos_kafka::keys::read_all(&config, READ_TIMEOUT)).await?
}

pub async fn run(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    ensure_topics(&config.kafka, &[TopicSpec::keys(&config.topics)])
        .await
        .context("cannot create the keys log (is Kafka up at kafka.brokers?)")?;
    match command {
        KeysCommand::Create {
            principal,
            role,
            namespaces,
            agents,
            expires_in,
            note,
            by,
            json,
        } => {
            memos_schemas::validate::check_name("principal", &principal)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for namespace in &namespaces {
                memos_schemas::validate::check_name("namespace", namespace)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            anyhow::ensure!(
                agents.is_empty() || role == Role::Service,
                "--agent is for service principals"
            );
            let principal = Principal {
                name: principal,
                role,
                namespaces: namespaces.into_iter().collect::<BTreeSet<_>>(),
                agents: agents.into_iter().collect::<BTreeSet<_>>(),
            };
            let now = now_ms();
            let expires_at = expires_in.map(|d| now.saturating_add(d.as_millis() as i64));
            let key = keys::issue(principal, &by, now, expires_at, note)?;
            let producer = CommandProducer::new(&config.kafka)?;
            memos_kafka::keys::append(&producer, config, &key.event).await?;
            let key_id = key.event.key_id().to_owned();
            if json {
                let out =
                    serde_json::json!({"key": key.token.expose(), "key_id": key_id, "event": key.event});
                println!("{out}");
            } else {
                println!("{}", key.token.expose());
                eprintln!("key {key_id} issued; it is shown only now: store it in your secret store");
            }
            Ok(())
        }
        KeysCommand::List { json } => {
            let ring = read_all(config).await?;
            if json {
                for key in ring.list() {
                    println!("{}", serde_json::to_string(key)?);
                }
                return Ok(());
            }
            println!(
                "{:<16}  {:<20}  {:<8}  {:<20}  {:<20}  {:<20}  {:<20}  grants",
                "key id", "principal", "role", "issued by", "issued at", "expires at", "revoked at"
            );
            for key in ring.list() {
                println!("{}", row(key));
            }
            Ok(())
        }
        KeysCommand::Revoke { key_id, reason, by } => {
            let ring = read_all(config).await?;
            let key = ring
                .get(&key_id)
                .with_context(|| format!("no key {key_id} in the keys log"))?;
            if key.revoked_at.is_some() {
                println!("key {key_id} was already revoked at {}", time(key.revoked_at));
                return Ok(());
            }
            let event = KeyEvent::Revoked {
                key_id: key_id.clone(),
                revoked_by: by,
                revoked_at: now_ms(),
                reason,
            };
            let producer = CommandProducer::new(&config.kafka)?;
            memos_kafka::keys::append(&producer, config, &event).await?;
            println!("key {key_id} of {} revoked", key.principal.name);
            Ok(())
        }
    }
}

fn row(key: &KeyRecord) -> String {
    let mut grants: Vec<String> = key
        .principal
        .namespaces
        .iter()
        .map(|n| format!("namespace:{n}"))
        .collect();
    grants.extend(key.principal.agents.iter().map(|a| format!("agent:{a}")));
    format!(
        "{:<16}  {:<20}  {:<8}  {:<20}  {:<20}  {:<20}  {:<20}  {}",
        key.key_id,
        key.principal.name,
        key.principal.role.as_str(),
        key.issued_by,
        time(Some(key.issued_at)),
        time(key.expires_at),
        time(key.revoked_at),
        grants.join(",")
    )
}
