//! `memos`: the server binary. `memos run all` runs the API and the projector in one process;
//! `memos run api` and `memos run projector` run one role each. Configuration is described in
//! `memos_runtime::config`.

use std::sync::Arc;
use std::time::Duration;

/// mimalloc returns memory to the system between batches; glibc's allocator fragments under
/// the projector's pattern of large, short-lived batch buffers and its RSS creeps up.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use memos_api::auth::Authenticator;
use memos_api::jwt::JwtVerifier;
use memos_api::{Api, AppState};
use memos_kafka::CommandProducer;
use memos_kafka::admin::{all_topics, ensure_topics};
use memos_orchestrator::Orchestrator;
use memos_projector::{Projector, TaskProjector};
use memos_redis::HotViews;
use memos_runtime::config::AuthMode;
use memos_runtime::{Config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "memos", version, about = "memOS: event-sourced memory for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one role, or all of them in one process.
    Run {
        #[arg(value_enum, default_value_t = Role::All)]
        role: Role,
    },
    /// Create the memOS topics that do not exist yet.
    CreateTopics,
    /// Apply pending PostgreSQL migrations.
    Migrate,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Role {
    All,
    Api,
    Projector,
    Orchestrator,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Arc::new(Config::load().context("invalid configuration")?);
    let role_name = match &cli.command {
        Command::Run { role } => role.to_possible_value().expect("named").get_name().to_owned(),
        _ => "admin".to_owned(),
    };
    let _telemetry = telemetry::init(&config.telemetry, &role_name)?;
    memos_runtime::metrics::install(&role_name);
    match cli.command {
        Command::Run { role } => run(config, role).await,
        Command::CreateTopics => ensure_topics(&config.kafka, &all_topics(&config.topics)).await,
        Command::Migrate => {
            let pool = memos_postgres::connect(&config.postgres)
                .await
                .context("cannot connect to PostgreSQL")?;
            memos_postgres::migrate(&pool).await.context("migration failed")?;
            memos_postgres::pool::ensure_text_search(&pool, &config.memory.text_search_config)
                .await
                .context("full-text column")
        }
    }
}

async fn run(config: Arc<Config>, role: Role) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());

    if config.topics.create {
        ensure_topics(&config.kafka, &all_topics(&config.topics))
            .await
            .context("cannot create topics (is Kafka up at kafka.brokers?)")?;
    }
    let orchestrator = matches!(role, Role::All | Role::Orchestrator).then(|| {
        let orchestrator = Orchestrator::new(config.clone(), shutdown.child_token());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let result = orchestrator.run_until_stopped().await;
            // If the orchestrator ends on its own, stop the whole process.
            stop.cancel();
            result
        })
    });
    if role == Role::Orchestrator {
        serve_operations(&config, &shutdown).await?;
        if let Some(orchestrator) = orchestrator {
            orchestrator.await??;
        }
        tracing::info!("memos stopped");
        return Ok(());
    }

    let pool = memos_postgres::connect(&config.postgres)
        .await
        .context("cannot connect to PostgreSQL")?;
    memos_postgres::migrate(&pool).await.context("migration failed")?;
    memos_postgres::pool::ensure_text_search(&pool, &config.memory.text_search_config)
        .await
        .context("full-text column")?;
    memos_postgres::pool::ensure_vector_index(&pool, config.memory.embedding_dimensions)
        .await
        .context("cannot create the embedding index")?;
    let hot = HotViews::from_config(&config.redis)
        .await
        .context("cannot connect to Redis")?;
    let producer = CommandProducer::new(&config.kafka).context("cannot create the Kafka producer")?;

    // The projector role runs both projections: memory commands and task events.
    let mut projections = Vec::new();
    if role != Role::Api {
        // Each projection has its own dead-letter producer, sized for the dead-letter topic.
        let memory = Projector::new(&config, pool.clone(), hot.clone())?.spawn(shutdown.child_token())?;
        let tasks = TaskProjector::new(&config, pool.clone(), hot.clone())?.spawn(shutdown.child_token())?;
        for thread in [memory, tasks] {
            // If a projection thread ends on its own, stop the whole process.
            let stop = shutdown.clone();
            projections.push(tokio::task::spawn_blocking(move || {
                let result = thread.join();
                stop.cancel();
                result
            }));
        }
    }

    if role != Role::Projector {
        config.http.limits.check().map_err(anyhow::Error::msg)?;
        config.memory.search.check().map_err(anyhow::Error::msg)?;
        memos_api::jwt::export_metrics();
        let auth = match config.http.auth {
            AuthMode::Keys => {
                let followed = memos_kafka::keys::follow(config.clone(), shutdown.child_token());
                // Serve once the keys issued so far are known, so that none is refused at start.
                if !followed.wait_caught_up(Duration::from_secs(30)).await {
                    tracing::warn!("the keys log was not read within 30 s; unknown keys get 503 until it is");
                }
                let jwt = match &config.http.jwt {
                    Some(jwt) => {
                        let verifier = Arc::new(JwtVerifier::from_config(jwt).context("http.jwt")?);
                        verifier.spawn_refresh(shutdown.child_token());
                        tracing::info!(
                            family = ?verifier.family(),
                            algorithms = ?jwt.algorithms,
                            issuer = %jwt.issuer,
                            audience = %jwt.audience,
                            "JWT bearer tokens accepted besides API keys"
                        );
                        Some(verifier)
                    }
                    None => None,
                };
                Authenticator::Keys { ring: followed, jwt }
            }
            AuthMode::None => {
                anyhow::ensure!(
                    config.http.jwt.is_none(),
                    "http.jwt is set but http.auth = \"none\" checks no credential: set http.auth = \"keys\""
                );
                anyhow::ensure!(
                    config.http.bind.ip().is_loopback(),
                    "http.auth = \"none\" believes every request's headers: it is refused on {}, which is not a loopback address",
                    config.http.bind
                );
                tracing::warn!(
                    "http.auth = \"none\": requests are not authenticated; every client may act as any agent"
                );
                Authenticator::None
            }
        };
        let state = AppState {
            config: config.clone(),
            producer: producer.clone(),
            pool,
            hot,
            auth,
        };
        let api = Api::bind(state)
            .await
            .with_context(|| format!("cannot bind {}", config.http.bind))?;
        api.run_until_stopped(shutdown.clone()).await?;
    } else {
        serve_operations(&config, &shutdown).await?;
    }
    shutdown.cancel();
    if let Some(orchestrator) = orchestrator {
        orchestrator.await??;
    }
    for projection in projections {
        if projection.await?.is_err() {
            anyhow::bail!("projector thread panicked");
        }
    }
    tracing::info!("memos stopped");
    Ok(())
}

/// The projector and orchestrator roles serve only /healthz and /metrics (on
/// `http.operations_bind` when it is set).
async fn serve_operations(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let addr = config.http.operations_bind.unwrap_or(config.http.bind);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "operations endpoint listening");
    axum::serve(listener, memos_api::server::operations_router())
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    Ok(())
}
