//! Running the real `memos` binary as a child process, so a test can stop it gracefully or
//! kill it with SIGKILL exactly as an operator or a crash would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::stack::TestEnv;

/// A workspace binary (`memos`, `memosctl`) next to the test binary's `deps/` folder.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary has no parent")?;
    let binary = dir.join(name);
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it first with `cargo build --workspace` (scripts/test does)",
        binary.display()
    );
    Ok(binary)
}

pub struct MemosProcess {
    child: Child,
    pub log: PathBuf,
    /// `http://127.0.0.1:PORT`: the API, or the projector role's /healthz and /metrics.
    pub base_url: Option<String>,
}

impl MemosProcess {
    /// Starts `memos run <role>` for `env` plus `extra` variables, and waits until it is
    /// serving (API roles) or has joined the group (projector).
    pub async fn start(env: &TestEnv, role: &str, extra: &[(&str, &str)]) -> anyhow::Result<MemosProcess> {
        let log = std::env::temp_dir().join(format!(
            "{}-{role}-{}.log",
            env.database,
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(binary("memos")?);
        command
            .args(["run", role])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (key, value) in env.process_env() {
            command.env(key, value);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command.spawn().context("spawn memos")?;
        let mut process = MemosProcess {
            child,
            log,
            base_url: None,
        };
        // Every role serves HTTP (the projector role: /healthz and /metrics only).
        let marker = if role == "projector" || role == "orchestrator" {
            "operations endpoint listening"
        } else {
            "api listening"
        };
        let line = process.wait_for_log(marker, Duration::from_secs(60)).await?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        let addr = value["fields"]["addr"]
            .as_str()
            .context("listening line has no addr")?;
        process.base_url = Some(format!("http://{addr}"));
        if role == "projector" || role == "all" {
            process
                .wait_for_log("projector started", Duration::from_secs(60))
                .await?;
        }
        if role == "orchestrator" || role == "all" {
            process
                .wait_for_log("orchestrator state rebuilt", Duration::from_secs(60))
                .await?;
        }
        Ok(process)
    }

    /// Waits until a log line contains `marker`, failing early if the process exits.
    pub async fn wait_for_log(&mut self, marker: &str, deadline: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(marker)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("memos exited ({status}) before logging {marker:?}; log:\n{text}");
            }
            if start.elapsed() > deadline {
                anyhow::bail!("memos did not log {marker:?} within {deadline:?}; log:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.base_url.as_deref().expect("process serves the API")
        )
    }

    /// The process id of the running binary (for signals a test sends itself, or to find its
    /// PostgreSQL sessions: they are named `memos[PID]`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown hook runs, as in a crash.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`, ...) without waiting: a process frozen or thawed,
    /// as a stalled host or a debugger would.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self, deadline: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > deadline {
                anyhow::bail!("memos did not stop within {deadline:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MemosProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a `memosctl` run printed and how it ended.
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `memosctl` with `env`'s configuration.
pub fn memosctl(env: &TestEnv, args: &[&str]) -> anyhow::Result<CtlOutput> {
    memosctl_as(env, &[], args)
}

/// Runs `memosctl` with `env`'s configuration and `extra` variables (a Kafka principal's).
pub fn memosctl_as(env: &TestEnv, extra: &[(&str, &str)], args: &[&str]) -> anyhow::Result<CtlOutput> {
    let output = Command::new(binary("memosctl")?)
        .args(args)
        .envs(env.process_env())
        .envs(extra.iter().copied())
        .env_remove("RUST_BACKTRACE")
        .output()?;
    Ok(CtlOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout)?,
        stderr: String::from_utf8(output.stderr)?,
    })
}

/// Runs `memosctl`, which must succeed; its stdout.
pub fn memosctl_ok(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    let out = memosctl(env, args)?;
    anyhow::ensure!(
        out.code == 0,
        "memosctl {args:?} exited with {}: {}\n{}",
        out.code,
        out.stderr,
        out.stdout
    );
    Ok(out.stdout)
}

/// Issues an API key with `memosctl keys create` (its args after `--principal NAME --role
/// ROLE`) into `env`'s keys log; the key.
pub fn issue_key(env: &TestEnv, principal: &str, role: &str, more: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![
        "keys",
        "create",
        "--principal",
        principal,
        "--role",
        role,
        "--json",
    ];
    args.extend_from_slice(more);
    let out = memosctl_ok(env, &args)?;
    let issued: serde_json::Value = serde_json::from_str(out.trim())?;
    issued["key"]
        .as_str()
        .map(str::to_owned)
        .context("memosctl keys create printed no key")
}
