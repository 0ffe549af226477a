//! Typed, layered, strict configuration.
//!
//! Layers, later wins: built-in defaults; the TOML file named by `MEMOS_CONFIG` (or
//! `memos.toml` in the working directory when present); the short variables the local stack
//! writes (`MEMOS_KAFKA_BROKERS`, `DATABASE_URL`, `REDIS_URL`); then `MEMOS__SECTION__KEY`
//! variables (for example `MEMOS__HTTP__BIND=127.0.0.1:9090`). Unknown keys fail start-up
//! instead of being ignored, durations are written like `250ms` or `30s`, and connection
//! strings are [`Secret`]s that never print.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A value that must not appear in logs or debug output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub http: HttpConfig,
    pub projector: ProjectorConfig,
    pub orchestrator: OrchestratorConfig,
    pub memory: MemoryConfig,
    pub telemetry: TelemetryConfig,
}

/// The orchestrator: an exactly-once processor of task commands (see `memos-orchestrator`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorConfig {
    /// Consumer group of the orchestrator instances; they share the task partitions.
    pub group_id: String,
    /// Stable name of this instance (for example the pod name of a StatefulSet); its
    /// transactional id is derived from it, so a restarted instance fences its previous
    /// incarnation at once. Two live instances must not share it. Unset: a fresh name per
    /// process, so a crashed instance's open transaction holds readers back until
    /// `transaction_timeout` instead.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// How often the owner of a partition appends a `Tick` (the clock of timeouts and liveness).
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// An agent without a heartbeat for this long is lost and its tasks are re-delegated.
    #[serde(with = "humantime_serde")]
    pub heartbeat_window: Duration,
    /// Most commands decided in one Kafka transaction.
    pub max_batch_records: usize,
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Kafka `transaction.timeout.ms`: how long a crashed instance's open transaction can hold
    /// back readers before the broker aborts it.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Dimension of every stored embedding (the vector index is built for it); writes with
    /// another dimension are refused.
    pub embedding_dimensions: usize,
    /// How long a read carrying a position token waits for the views to reach it.
    #[serde(with = "humantime_serde")]
    pub read_your_writes_timeout: Duration,
    /// Bound on the read an update or forget makes before appending, to refuse at once what
    /// the projector would certainly reject. When PostgreSQL does not answer within it, the
    /// command is appended anyway and the projector decides: writes need only Kafka.
    #[serde(with = "humantime_serde")]
    pub conflict_check_timeout: Duration,
    /// PostgreSQL text search configuration of full-text search (`english` stems, so
    /// "preferences" finds "preference"; `simple` matches words as written). The generated
    /// column `memories.content_tsv` is built with it: a process refuses to start when the
    /// column was built with another one (`memosctl text-search apply` rebuilds it).
    pub text_search_config: String,
    /// How searches choose between exact and approximate plans (docs/search.md).
    pub search: SearchConfig,
}

/// How `POST /v1/memories/search` runs (`memory.search`). Vector search is exact k-NN over
/// what the reader may read while that is at most `exact_limit` memories; above it, the HNSW
/// index with pgvector's iterative scans, falling back to exact when the scan budget runs out
/// before `limit` results are found. Hybrid search fuses each mode's best `hybrid_candidates`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// The most memories a reader's namespaces may hold for vector search to stay exact.
    pub exact_limit: u32,
    /// `hnsw.ef_search` of the approximate path: the candidate list the graph search keeps
    /// (larger: better recall, slower).
    pub ef_search: u32,
    /// `hnsw.max_scan_tuples` of the approximate path: how many index entries an iterative
    /// scan may visit looking for visible memories before it gives up (then: exact).
    pub max_scan_tuples: u32,
    /// How many of the text and of the vector ranking hybrid search fuses (at least the
    /// request's limit).
    pub hybrid_candidates: u32,
}

impl SearchConfig {
    /// Refuses settings that would make every search fail or never be approximate.
    pub fn check(&self) -> Result<(), String> {
        if self.ef_search == 0 || self.ef_search > 1000 {
            return Err(format!(
                "memory.search.ef_search must be between 1 and 1000 (pgvector's range), not {}",
                self.ef_search
            ));
        }
        if self.max_scan_tuples == 0 || self.max_scan_tuples > i32::MAX as u32 {
            return Err(format!(
                "memory.search.max_scan_tuples must be between 1 and {} (pgvector's range), not {}",
                i32::MAX,
                self.max_scan_tuples
            ));
        }
        if self.hybrid_candidates == 0 || self.hybrid_candidates > 10_000 {
            return Err(format!(
                "memory.search.hybrid_candidates must be between 1 and 10000, not {}",
                self.hybrid_candidates
            ));
        }
        Ok(())
    }
}

/// Wire format of OTLP trace export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    HttpProtobuf,
    HttpJson,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint of a collector (e.g. `http://127.0.0.1:4318`); unset: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// `service.name` of exported spans.
    pub service_name: String,
    /// How often the projector measures its consumer lag.
    #[serde(with = "humantime_serde")]
    pub lag_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    pub client_id: String,
    /// How long the producer may try to deliver one record before the API answers 503.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// How clients connect to the brokers: `plaintext` (the default; no authentication,
    /// for a broker on a trusted network), `sasl_plaintext` or `sasl_ssl` (authenticated
    /// with `kafka.sasl`, so the broker's ACLs apply to this process's principal).
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// The SASL credentials of this process's Kafka principal; required by the `sasl_*`
    /// protocols and refused with `plaintext` (see `docs/security.md`).
    #[serde(default)]
    pub sasl: Option<SaslConfig>,
    /// Raw librdkafka properties applied to every client, for tuning (`linger.ms`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Refuses a protocol without the credentials it needs, and credentials that would be
    /// ignored (a process configured with a principal it does not use is a mistake).
    pub fn check(&self) -> Result<(), String> {
        match (self.security_protocol, &self.sasl) {
            (SecurityProtocol::Plaintext, Some(_)) => Err(
                "kafka.sasl is set but kafka.security_protocol is plaintext: set it to sasl_plaintext or sasl_ssl".into(),
            ),
            (SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl, None) => Err(format!(
                "kafka.security_protocol = {:?} needs kafka.sasl (mechanism, username, password)",
                self.security_protocol.librdkafka()
            )),
            (_, Some(sasl)) if sasl.username.is_empty() || sasl.password.expose().is_empty() => {
                Err("kafka.sasl.username and kafka.sasl.password must not be empty".into())
            }
            _ => Ok(()),
        }
    }
}

/// librdkafka `security.protocol` (TLS without SASL is set through `kafka.properties`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// The value of librdkafka's `security.protocol`.
    pub fn librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// A Kafka principal's SASL credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    #[serde(default)]
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

/// SASL mechanisms librdkafka implements itself (GSSAPI and OAUTHBEARER are reachable
/// through `kafka.properties`). PLAIN sends the password as is: only over `sasl_ssl`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "PLAIN")]
    Plain,
}

impl SaslMechanism {
    /// The value of librdkafka's `sasl.mechanism`.
    pub fn librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    pub memory_commands: String,
    /// Task commands: the orchestrator's input.
    pub task_commands: String,
    /// Task events: the orchestrator's decisions, written transactionally; same partition
    /// count as `task_commands` (an event goes to the partition of its command).
    pub task_events: String,
    pub dead_letter: String,
    /// The keys log: API keys issued and revoked (`memos_runtime::keys`); one partition,
    /// kept forever, as it is the audit trail of key management.
    pub keys: String,
    /// Partitions of topics memOS creates; a namespace always maps to one partition.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic `min.insync.replicas` of the topics memOS creates: with the producers'
    /// `acks=all`, a write is acknowledged only once this many replicas hold it. Unset: 1 when
    /// `replication_factor` is 1, otherwise `min(2, replication_factor)`
    /// ([`TopicsConfig::min_insync_replicas`]). Not applied to topics that already exist
    /// (`memosctl topics check` reports them).
    #[serde(default)]
    pub min_insync_replicas: Option<i32>,
    /// Whether processes create missing topics at start through the admin API (and apply
    /// the size and timestamp settings to existing ones).
    pub create: bool,
    /// Largest record on the command and event topics (topic `max.message.bytes`); the
    /// dead-letter topic accepts that plus the headers a dead letter adds, so every record a
    /// command topic accepted can be dead-lettered as a copy.
    pub max_message_bytes: usize,
}

impl TopicsConfig {
    /// The `min.insync.replicas` topics are created with: the configured value, or 1 when
    /// the replication factor is 1 and `min(2, replication_factor)` otherwise, so that an
    /// acknowledged write survives the loss of one broker while one broker may be down.
    pub fn min_insync_replicas(&self) -> i32 {
        self.min_insync_replicas
            .unwrap_or(if self.replication_factor <= 1 {
                1
            } else {
                self.replication_factor.min(2)
            })
    }
}

/// PostgreSQL. The session bounds are set on every pooled connection (startup parameters),
/// so no transaction, lock wait or statement can hold the views back without end: a
/// projector stopped inside its transaction (SIGSTOP, a VM paused) loses its session and its
/// row locks after `idle_in_transaction_timeout`, and the instance that took its partitions
/// waits at most `lock_timeout` per attempt before it retries. `0s` disables a bound
/// (PostgreSQL's meaning).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub url: Secret,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: a session idle inside an open transaction for
    /// longer is ended by the server, which releases its locks.
    #[serde(with = "humantime_serde")]
    pub idle_in_transaction_timeout: Duration,
    /// `lock_timeout`: longest wait of one statement for a lock (a row, a table, an advisory
    /// lock); the statement then fails with SQLSTATE 55P03, which workers retry.
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// `statement_timeout` of the services' statements (SQLSTATE 57014 after it, retried).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// `statement_timeout` of `memosctl`'s commands, which scan, copy or index whole tables
    /// (verify, cache rebuild, audit, replay); `0s`: unbounded. Migrations and the embedding
    /// index build are always unbounded: a bound there would stop a process from starting.
    #[serde(with = "humantime_serde")]
    pub maintenance_statement_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Secret,
    /// Prefix of every key memOS writes, so several deployments can share a server.
    pub key_prefix: String,
    /// How long a memory stays in the hot cache after its last write.
    #[serde(with = "humantime_serde")]
    pub memory_ttl: Duration,
    /// Bound on one read (a cached document, a position, readiness' ping). A read that
    /// fails or takes longer goes to PostgreSQL and opens the circuit breaker.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Bound on one pipeline of writes (a projector batch, a chunk of `memosctl cache
    /// rebuild`); the caller retries a write that fails.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Bound on establishing a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long reads skip Redis after it failed to answer, before one read probes it again.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Most script calls sent in one round trip; a larger write is split.
    pub max_pipeline: usize,
}

/// The HTTP edge. Every bound answers instead of holding a connection: a client that is too
/// slow gets `408` (or its connection closed while it still sends headers), a request that
/// runs too long `503 timeout`, a request beyond the concurrency limit `503 overloaded`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: SocketAddr,
    /// Where `/readyz` and `/metrics` are served instead of `bind`, for probes and scrapers
    /// on an address of their own (neither needs an API key on either address); `/healthz`
    /// answers on both. Unset: all on `bind`.
    #[serde(default)]
    pub operations_bind: Option<SocketAddr>,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Longest a request may take, body read and answer included; longer ones get
    /// `503 timeout`. Keep it above `kafka.delivery_timeout` and
    /// `memory.read_your_writes_timeout` so that their own, more precise answers come first.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's headers (from the first byte of a
    /// request, or from the end of the previous answer on a kept-alive connection); the
    /// connection is closed after it.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's whole body; `408` after it.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Most `/v1` requests served at once; the ones beyond get `503 overloaded` at once
    /// (with `Retry-After`), never a queue.
    pub max_concurrent_requests: usize,
    /// Bound on each dependency check of `/readyz` (they run at once, so it bounds the
    /// whole answer too); a check that takes longer reports its dependency as down.
    #[serde(with = "humantime_serde")]
    pub readiness_timeout: Duration,
    /// How `/v1` requests are bound to a principal: `keys` (every request carries an API
    /// key, `Authorization: Bearer memos_...`; see `docs/security.md`) or `none` (the
    /// `X-Memos-Agent` and `X-Memos-Actor` headers are believed; only on a loopback
    /// address, for a single-user laptop or tests).
    pub auth: AuthMode,
    /// JWT bearer tokens from an identity provider, accepted besides API keys (with
    /// `auth = "keys"`): a bearer token that does not start with `memos_` is verified as a
    /// JWT. Unset (the default): only API keys. See `docs/security.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// Request limits of each principal, by role (`crate::keys::Role`); `429` beyond.
    pub limits: RoleLimits,
}

/// The [`Limits`] of each role.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleLimits {
    pub agent: Limits,
    pub service: Limits,
    pub auditor: Limits,
    pub operator: Limits,
}

impl RoleLimits {
    pub fn of(&self, role: crate::keys::Role) -> &Limits {
        use crate::keys::Role;
        match role {
            Role::Agent => &self.agent,
            Role::Service => &self.service,
            Role::Auditor => &self.auditor,
            Role::Operator => &self.operator,
        }
    }

    /// Refuses limits that would refuse everything or overflow.
    pub fn check(&self) -> Result<(), String> {
        for role in crate::keys::Role::ALL {
            let l = self.of(role);
            if !(l.requests_per_second.is_finite() && l.requests_per_second >= 0.001) {
                return Err(format!(
                    "http.limits.{role}.requests_per_second must be a number of at least 0.001, not {}",
                    l.requests_per_second
                ));
            }
            if l.burst == 0 || l.concurrent_requests == 0 {
                return Err(format!(
                    "http.limits.{role}.burst and .concurrent_requests must be at least 1"
                ));
            }
        }
        Ok(())
    }
}

/// How much one principal may ask of one API process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Sustained requests per second.
    pub requests_per_second: f64,
    /// Requests admitted at one instant after being idle (the bucket's size).
    pub burst: u32,
    /// Requests served at once.
    pub concurrent_requests: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Keys,
    None,
}

/// A JWS algorithm a JWT may be signed with. `none` is not one: an unsigned token can never
/// be configured, so never accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

/// How JWTs are verified (`http.jwt`). Exactly one key source: `jwks_file`, `key_file` or
/// `secret`; the process checks at start that it holds keys of the pinned `algorithms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The algorithms a token may be signed with, all of one family (HMAC, RSA, EC or
    /// EdDSA), for example `["RS256"]`; a token whose header names another is refused.
    pub algorithms: Vec<JwtAlgorithm>,
    /// A JWKS file (`{"keys": [...]}`, public RSA, EC or Ed25519 keys); a token's `kid`
    /// chooses its key. Re-read every `jwks_refresh`, so keys can be rotated without a
    /// restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// One PEM public key (`-----BEGIN PUBLIC KEY-----`), for every token; read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The shared secret of HS256/HS384/HS512 (at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// The only accepted `iss`; tokens must carry it.
    pub issuer: String,
    /// The `aud` tokens must carry (one of their audiences).
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde", default = "JwtConfig::default_leeway")]
    pub leeway: Duration,
    /// How often `jwks_file` is re-read. A file that cannot be read or parsed keeps the keys
    /// read before (and is counted in `memos_jwt_jwks_reloads_total{outcome="failed"}`).
    #[serde(with = "humantime_serde", default = "JwtConfig::default_jwks_refresh")]
    pub jwks_refresh: Duration,
    /// The claim holding the principal's role (`agent`, `service`, `auditor` or
    /// `operator`): a string, or a list of which exactly one entry is such a role.
    #[serde(default = "JwtConfig::default_roles_claim")]
    pub roles_claim: String,
    /// The claim listing the namespaces besides its own the principal may write.
    #[serde(default = "JwtConfig::default_namespaces_claim")]
    pub namespaces_claim: String,
    /// The claim listing the agents a service may act for (`*`: every agent).
    #[serde(default = "JwtConfig::default_agents_claim")]
    pub agents_claim: String,
}

impl JwtConfig {
    fn default_leeway() -> Duration {
        Duration::from_secs(30)
    }

    fn default_jwks_refresh() -> Duration {
        Duration::from_secs(60)
    }

    fn default_roles_claim() -> String {
        "memos_role".into()
    }

    fn default_namespaces_claim() -> String {
        "memos_namespaces".into()
    }

    fn default_agents_claim() -> String {
        "memos_agents".into()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorConfig {
    pub group_id: String,
    /// Most records applied in one PostgreSQL transaction.
    pub max_batch_records: usize,
    /// Most payload bytes applied in one PostgreSQL transaction.
    pub max_batch_bytes: usize,
    /// How long one poll waits for the first record of a batch when the topic is idle.
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// How long the group waits for a silent projector before giving its partitions to
    /// another one (librdkafka `session.timeout.ms`): the failover time after a crash.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How many PostgreSQL transactions apply one batch concurrently, each for its own
    /// partitions (namespaces never span partitions, so they are independent).
    pub apply_parallelism: usize,
    /// Longest pause between retries when PostgreSQL or Redis fail.
    #[serde(with = "humantime_serde")]
    pub max_retry_backoff: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kafka: KafkaConfig {
                brokers: "127.0.0.1:19092".into(),
                client_id: "memos".into(),
                delivery_timeout: Duration::from_secs(30),
                security_protocol: SecurityProtocol::Plaintext,
                sasl: None,
                properties: BTreeMap::new(),
            },
            topics: TopicsConfig {
                memory_commands: "memos.memory.commands".into(),
                task_commands: "memos.task.commands".into(),
                task_events: "memos.task.events".into(),
                dead_letter: "memos.dlq".into(),
                keys: "memos.keys".into(),
                partitions: 6,
                replication_factor: 1,
                min_insync_replicas: None,
                create: true,
                max_message_bytes: 1024 * 1024,
            },
            postgres: PostgresConfig {
                url: Secret::new("postgres://memos@127.0.0.1:15432/memos"),
                max_connections: 10,
                acquire_timeout: Duration::from_secs(5),
                idle_in_transaction_timeout: Duration::from_secs(5),
                lock_timeout: Duration::from_secs(5),
                statement_timeout: Duration::from_secs(30),
                maintenance_statement_timeout: Duration::ZERO,
            },
            redis: RedisConfig {
                url: Secret::new("redis://127.0.0.1:16379/"),
                key_prefix: "memos".into(),
                memory_ttl: Duration::from_secs(24 * 3600),
                read_timeout: Duration::from_millis(250),
                write_timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(1),
                breaker_cooldown: Duration::from_secs(1),
                max_pipeline: 500,
            },
            http: HttpConfig {
                bind: "127.0.0.1:8080".parse().expect("valid address"),
                operations_bind: None,
                max_body_bytes: 256 * 1024,
                request_timeout: Duration::from_secs(60),
                header_read_timeout: Duration::from_secs(30),
                body_read_timeout: Duration::from_secs(10),
                max_concurrent_requests: 1024,
                readiness_timeout: Duration::from_secs(1),
                auth: AuthMode::Keys,
                jwt: None,
                // An agent is one process of a model's tool calls; a service fronts many
                // agents; exports and audits are few and heavy.
                limits: RoleLimits {
                    agent: Limits {
                        requests_per_second: 100.0,
                        burst: 200,
                        concurrent_requests: 32,
                    },
                    service: Limits {
                        requests_per_second: 2000.0,
                        burst: 4000,
                        concurrent_requests: 256,
                    },
                    auditor: Limits {
                        requests_per_second: 50.0,
                        burst: 100,
                        concurrent_requests: 8,
                    },
                    operator: Limits {
                        requests_per_second: 50.0,
                        burst: 100,
                        concurrent_requests: 8,
                    },
                },
            },
            projector: ProjectorConfig {
                group_id: "memos-projector".into(),
                max_batch_records: 2000,
                max_batch_bytes: 8 * 1024 * 1024,
                poll_timeout: Duration::from_millis(200),
                session_timeout: Duration::from_secs(10),
                apply_parallelism: 2,
                max_retry_backoff: Duration::from_secs(10),
            },
            orchestrator: OrchestratorConfig {
                group_id: "memos-orchestrator".into(),
                instance_id: None,
                tick_interval: Duration::from_secs(1),
                heartbeat_window: Duration::from_secs(30),
                max_batch_records: 1000,
                poll_timeout: Duration::from_millis(100),
                session_timeout: Duration::from_secs(10),
                transaction_timeout: Duration::from_secs(10),
            },
            memory: MemoryConfig {
                embedding_dimensions: 384,
                read_your_writes_timeout: Duration::from_secs(5),
                conflict_check_timeout: Duration::from_millis(300),
                text_search_config: "english".into(),
                search: SearchConfig {
                    exact_limit: 5_000,
                    ef_search: 100,
                    max_scan_tuples: 20_000,
                    hybrid_candidates: 100,
                },
            },
            telemetry: TelemetryConfig {
                otlp_endpoint: None,
                otlp_protocol: OtlpProtocol::HttpProtobuf,
                service_name: "memos".into(),
                lag_interval: Duration::from_secs(5),
            },
        }
    }
}

impl Config {
    /// Loads the layers described in the module documentation from the process environment.
    pub fn load() -> Result<Config, Box<figment::Error>> {
        let file = std::env::var_os("MEMOS_CONFIG")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("memos.toml")).filter(|p| p.exists()));
        let config: Config = Self::figment(file).extract().map_err(Box::new)?;
        config
            .kafka
            .check()
            .map_err(|e| Box::new(figment::Error::from(e)))?;
        Ok(config)
    }

    /// The layered sources, exposed so tests can add their own on top.
    pub fn figment(file: Option<PathBuf>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(
                Env::raw()
                    .only(&["MEMOS_KAFKA_BROKERS"])
                    .map(|_| "kafka.brokers".into()),
            )
            .merge(Env::raw().only(&["DATABASE_URL"]).map(|_| "postgres.url".into()))
            .merge(Env::raw().only(&["REDIS_URL"]).map(|_| "redis.url".into()))
            .merge(Env::prefixed("MEMOS__").split("__"))
            .merge(Self::verbatim_env())
    }

    /// The credentials' variables once more, as the strings they are: the environment
    /// provider reads `0123` as the number 123 and `true` as a boolean, which would refuse
    /// (or, worse, change) a password of digits.
    fn verbatim_env() -> Figment {
        [
            ("MEMOS__KAFKA__SASL__USERNAME", "kafka.sasl.username"),
            ("MEMOS__KAFKA__SASL__PASSWORD", "kafka.sasl.password"),
        ]
        .into_iter()
        .filter_map(|(var, key)| Some((key, std::env::var(var).ok()?)))
        .fold(Figment::new(), |figment, (key, value)| {
            figment.merge(Serialized::default(key, value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_would_refuse_everything_are_refused() {
        let defaults = Config::default().http.limits;
        assert!(defaults.check().is_ok());
        for broken in [
            Limits {
                requests_per_second: 0.0,
                ..defaults.agent
            },
            Limits {
                requests_per_second: f64::NAN,
                ..defaults.agent
            },
            Limits {
                burst: 0,
                ..defaults.agent
            },
            Limits {
                concurrent_requests: 0,
                ..defaults.agent
            },
        ] {
            let limits = RoleLimits {
                auditor: broken,
                ..defaults
            };
            let error = limits.check().expect_err("refused");
            assert!(error.contains("http.limits.auditor"), "{error}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn layers_apply_in_order_and_unknown_keys_fail() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "memos.toml",
                "[http]\nbind = \"127.0.0.1:9000\"\n[projector]\npoll_timeout = \"50ms\"\n",
            )?;
            jail.set_env("DATABASE_URL", "postgres://elsewhere/db");
            jail.set_env("MEMOS__HTTP__BIND", "127.0.0.1:9001");
            let config: Config = Config::figment(Some("memos.toml".into())).extract()?;
            assert_eq!(config.http.bind.port(), 9001, "env wins over the file");
            assert_eq!(config.projector.poll_timeout, Duration::from_millis(50));
            assert_eq!(config.postgres.url.expose(), "postgres://elsewhere/db");
            let defaults = Config::default();
            assert_eq!(
                config.projector.max_batch_records, defaults.projector.max_batch_records,
                "defaults stay"
            );
            assert!(
                !format!("{config:?}").contains("elsewhere"),
                "secrets never print"
            );

            assert_eq!(config.postgres.lock_timeout, Duration::from_secs(5));
            assert_eq!(config.postgres.maintenance_statement_timeout, Duration::ZERO);

            jail.set_env("MEMOS__HTTP__BINDD", "oops");
            let err = Config::figment(None).extract::<Config>().unwrap_err();
            assert!(err.to_string().contains("bindd"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn jwt_is_absent_by_default_and_strict_when_set() {
        figment::Jail::expect_with(|jail| {
            let config: Config = Config::figment(None).extract()?;
            assert!(config.http.jwt.is_none(), "no JWT unless configured");

            jail.set_env("MEMOS__HTTP__JWT__ALGORITHMS", "[RS256]");
            jail.set_env("MEMOS__HTTP__JWT__JWKS_FILE", "/etc/memos/jwks.json");
            jail.set_env("MEMOS__HTTP__JWT__ISSUER", "https://idp.example");
            jail.set_env("MEMOS__HTTP__JWT__AUDIENCE", "memos");
            let config: Config = Config::figment(None).extract()?;
            let jwt = config.http.jwt.expect("configured from the environment");
            assert_eq!(jwt.algorithms, vec![JwtAlgorithm::RS256]);
            assert_eq!(jwt.leeway, Duration::from_secs(30));
            assert_eq!(jwt.roles_claim, "memos_role");
            assert!(jwt.secret.is_none() && jwt.key_file.is_none());

            jail.set_env("MEMOS__HTTP__JWT__ALGORITHMS", "[none]");
            let err = Config::figment(None).extract::<Config>().unwrap_err();
            assert!(err.to_string().contains("none"), "{err}");

            jail.set_env("MEMOS__HTTP__JWT__ALGORITHMS", "[HS256]");
            jail.set_env("MEMOS__HTTP__JWT__SECRET", "a-shared-secret-of-at-least-32-bytes");
            let config: Config = Config::figment(None).extract()?;
            assert!(
                !format!("{config:?}").contains("a-shared-secret"),
                "secrets never print"
            );

            jail.set_env("MEMOS__HTTP__JWT__ISSUERS", "x");
            let err = Config::figment(None).extract::<Config>().unwrap_err();
            assert!(err.to_string().contains("issuers"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn search_settings_out_of_pgvectors_range_are_refused() {
        let defaults = Config::default().memory.search;
        defaults.check().expect("the defaults are valid");
        for (bad, name) in [
            (
                SearchConfig {
                    ef_search: 0,
                    ..defaults
                },
                "ef_search",
            ),
            (
                SearchConfig {
                    ef_search: 1001,
                    ..defaults
                },
                "ef_search",
            ),
            (
                SearchConfig {
                    max_scan_tuples: u32::MAX,
                    ..defaults
                },
                "max_scan_tuples",
            ),
            (
                SearchConfig {
                    hybrid_candidates: 0,
                    ..defaults
                },
                "hybrid_candidates",
            ),
            (
                SearchConfig {
                    hybrid_candidates: 10_001,
                    ..defaults
                },
                "hybrid_candidates",
            ),
        ] {
            let error = bad.check().expect_err(name);
            assert!(error.contains(name), "{error}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn sasl_comes_from_the_environment_and_must_match_the_protocol() {
        figment::Jail::expect_with(|jail| {
            let config: Config = Config::figment(None).extract()?;
            assert_eq!(config.kafka.security_protocol, SecurityProtocol::Plaintext);
            assert!(config.kafka.sasl.is_none());
            config.kafka.check().expect("plaintext without credentials");

            jail.set_env("MEMOS__KAFKA__SECURITY_PROTOCOL", "sasl_plaintext");
            let config: Config = Config::figment(None).extract()?;
            let err = config.kafka.check().unwrap_err();
            assert!(err.contains("needs kafka.sasl"), "{err}");

            jail.set_env("MEMOS__KAFKA__SASL__USERNAME", "memos-api");
            // All digits: still a password, not a number.
            jail.set_env("MEMOS__KAFKA__SASL__PASSWORD", "0123456789");
            let config: Config = Config::figment(None).extract()?;
            config.kafka.check().expect("complete credentials");
            let sasl = config.kafka.sasl.as_ref().expect("sasl");
            assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512, "the default");
            assert_eq!(sasl.username, "memos-api");
            assert_eq!(sasl.password.expose(), "0123456789");
            assert!(
                !format!("{config:?}").contains("0123456789"),
                "the password never prints"
            );

            jail.set_env("MEMOS__KAFKA__SASL__MECHANISM", "SCRAM-SHA-256");
            let config: Config = Config::figment(None).extract()?;
            assert_eq!(config.kafka.sasl.unwrap().mechanism, SaslMechanism::ScramSha256);
            jail.set_env("MEMOS__KAFKA__SASL__MECHANISM", "GSSAPI");
            assert!(
                Config::figment(None).extract::<Config>().is_err(),
                "an unknown mechanism"
            );
            jail.set_env("MEMOS__KAFKA__SASL__MECHANISM", "PLAIN");

            jail.set_env("MEMOS__KAFKA__SECURITY_PROTOCOL", "plaintext");
            let config: Config = Config::figment(None).extract()?;
            assert!(config.kafka.check().is_err(), "credentials that would be ignored");
            jail.set_env("MEMOS__KAFKA__SECURITY_PROTOCOL", "ssl");
            assert!(
                Config::figment(None).extract::<Config>().is_err(),
                "an unknown protocol"
            );
            Ok(())
        });
    }

    #[test]
    fn min_insync_replicas_defaults_to_two_when_replicated() {
        let mut topics = Config::default().topics;
        let by_factor = |topics: &mut TopicsConfig, rf: i32| {
            topics.replication_factor = rf;
            topics.min_insync_replicas()
        };
        assert_eq!(
            by_factor(&mut topics, 1),
            1,
            "a single replica cannot wait for two"
        );
        assert_eq!(by_factor(&mut topics, 2), 2);
        assert_eq!(
            by_factor(&mut topics, 3),
            2,
            "one broker may be down, one may be lost"
        );
        assert_eq!(by_factor(&mut topics, 5), 2);
        topics.min_insync_replicas = Some(3);
        assert_eq!(by_factor(&mut topics, 5), 3, "a set value wins");
    }
}
