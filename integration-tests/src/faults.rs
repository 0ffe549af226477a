//! Fault injection: what clients were told, and the check that holds the views to it.
//!
//! The fault suite (`tests/e2e/faults.rs`, run by `scripts/faults`) drives the real binaries
//! while it kills them, the brokers, PostgreSQL or Redis. Clients record every `202` in a
//! [`Ledger`]: the command id and the log position the answer named. [`judge`] then compares
//! the ledger with the decisions the views hold: an acknowledged command with no decision is
//! lost, one decided at another position is misplaced, one applied more than once is
//! doubled. The guarantee under test is that all three stay empty whatever fails.
//!
//! [`FaultStack`] is the stack the suite may break: it must be a stack of its own
//! (`STACK_DIR` other than `.stack`), never the shared one the other suites use.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::stack::repo_root;

/// One acknowledged command: its id and the position its `202` named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub command_id: String,
    pub partition: i32,
    pub offset: i64,
}

/// A decision the views hold for a command: where it was decided, and how many times it was
/// applied (history rows, or events, it produced; exactly one is expected).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub command_id: String,
    pub partition: i32,
    pub offset: i64,
    pub applications: i64,
}

/// The outcome of [`judge`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    pub acknowledged: usize,
    pub decided: usize,
    /// Acknowledged, never decided.
    pub lost: Vec<String>,
    /// Decided at another position than the one acknowledged: `(id, acked, decided)`.
    pub misplaced: Vec<(String, String, String)>,
    /// Applied more than once: `(id, times)`.
    pub doubled: Vec<(String, i64)>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.misplaced.is_empty() && self.doubled.is_empty()
    }

    /// Fails with the first offending ids when anything is lost, misplaced or doubled.
    pub fn ensure(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.ok(),
            "of {} acknowledged commands {} lost (first: {:?}), {} misplaced (first: {:?}), {} doubled (first: {:?})",
            self.acknowledged,
            self.lost.len(),
            self.lost.iter().take(5).collect::<Vec<_>>(),
            self.misplaced.len(),
            self.misplaced.iter().take(5).collect::<Vec<_>>(),
            self.doubled.len(),
            self.doubled.iter().take(5).collect::<Vec<_>>(),
        );
        Ok(())
    }
}

/// Holds `decisions` to `acks`. A position is checked only where the decision names one
/// (`partition >= 0`): task decisions are events on another topic and carry none.
/// Decisions of commands nobody acknowledged (a request that failed after the broker took
/// it) are allowed; they are not counted.
pub fn judge(acks: &[Ack], decisions: &[Decision]) -> Verdict {
    let by_id: HashMap<&str, &Decision> = decisions.iter().map(|d| (d.command_id.as_str(), d)).collect();
    let mut verdict = Verdict {
        acknowledged: acks.len(),
        ..Verdict::default()
    };
    for ack in acks {
        let Some(decision) = by_id.get(ack.command_id.as_str()) else {
            verdict.lost.push(ack.command_id.clone());
            continue;
        };
        verdict.decided += 1;
        if decision.partition >= 0 && (decision.partition, decision.offset) != (ack.partition, ack.offset) {
            verdict.misplaced.push((
                ack.command_id.clone(),
                format!("{}:{}", ack.partition, ack.offset),
                format!("{}:{}", decision.partition, decision.offset),
            ));
        }
        if decision.applications > 1 {
            verdict
                .doubled
                .push((ack.command_id.clone(), decision.applications));
        }
    }
    verdict
}

/// What clients saw during a scenario: every `202`, every error by status, and when.
#[derive(Default)]
pub struct Ledger {
    inner: Mutex<LedgerInner>,
}

#[derive(Default)]
struct LedgerInner {
    acks: Vec<Ack>,
    errors: BTreeMap<String, u64>,
    last_ack: Option<Instant>,
    longest_gap: Duration,
}

impl Ledger {
    pub fn ack(&self, ack: Ack) {
        let mut inner = self.inner.lock().expect("ledger lock");
        let now = Instant::now();
        if let Some(last) = inner.last_ack {
            inner.longest_gap = inner.longest_gap.max(now - last);
        }
        inner.last_ack = Some(now);
        inner.acks.push(ack);
    }

    /// An answer other than `202` (`"503"`), or a request that got none (`"transport"`).
    pub fn error(&self, kind: &str) {
        *self
            .inner
            .lock()
            .expect("ledger lock")
            .errors
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.inner.lock().expect("ledger lock").acks.clone()
    }

    pub fn ack_count(&self) -> usize {
        self.inner.lock().expect("ledger lock").acks.len()
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.inner.lock().expect("ledger lock").errors.clone()
    }

    /// The longest time between two consecutive `202`s: how long writes were unavailable.
    pub fn longest_gap(&self) -> Duration {
        self.inner.lock().expect("ledger lock").longest_gap
    }
}

/// The figures one scenario records (one JSON line in `$MEMOS_FAULTS_RESULTS`).
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub faults: String,
    pub acknowledged: usize,
    pub lost: usize,
    pub misplaced: usize,
    pub doubled: usize,
    /// Client-visible errors by status (`transport`: no answer at all).
    pub errors: BTreeMap<String, u64>,
    /// Longest time without a `202` (seconds).
    pub write_gap_s: f64,
    /// From the end of the last fault until every acknowledged command was decided (seconds).
    pub recovery_s: f64,
    /// `memosctl verify` of a rebuild against the live views: `equal` or what differed.
    pub verify: String,
    pub notes: String,
}

impl Figures {
    pub fn new(scenario: &str, faults: String, verdict: &Verdict, ledger: &Ledger) -> Figures {
        Figures {
            scenario: scenario.to_owned(),
            faults,
            acknowledged: verdict.acknowledged,
            lost: verdict.lost.len(),
            misplaced: verdict.misplaced.len(),
            doubled: verdict.doubled.len(),
            errors: ledger.errors(),
            write_gap_s: ledger.longest_gap().as_secs_f64(),
            ..Figures::default()
        }
    }

    /// Appends these figures to `$MEMOS_FAULTS_RESULTS` (when set) and prints them.
    pub fn record(&self) -> anyhow::Result<()> {
        let line = serde_json::to_string(self)?;
        eprintln!("faults: {line}");
        if let Ok(path) = std::env::var("MEMOS_FAULTS_RESULTS") {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("open {path}"))?;
            writeln!(file, "{line}")?;
        }
        Ok(())
    }
}

/// The stack a fault scenario may break, driven through `scripts/stack` with its `STACK_DIR`.
pub struct FaultStack {
    pub dir: PathBuf,
    pub brokers: usize,
}

impl FaultStack {
    /// The stack named by `MEMOS_FAULTS_STACK_DIR`, refusing the shared `.stack` and a stack
    /// other than the one the test's environment points at.
    pub fn from_env() -> anyhow::Result<FaultStack> {
        let dir = PathBuf::from(std::env::var("MEMOS_FAULTS_STACK_DIR").context(
            "MEMOS_FAULTS_STACK_DIR is not set: run the fault suite with scripts/faults, which starts a stack of its own",
        )?);
        let dir = dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
        if let Ok(shared) = repo_root().join(".stack").canonicalize() {
            anyhow::ensure!(
                dir != shared,
                "refusing to inject faults into the shared stack {}",
                dir.display()
            );
        }
        let env = std::fs::read_to_string(dir.join("env")).context("the fault stack has no env file")?;
        let brokers = std::env::var("MEMOS_KAFKA_BROKERS").context("MEMOS_KAFKA_BROKERS")?;
        anyhow::ensure!(
            env.lines()
                .any(|l| l.trim() == format!("export MEMOS_KAFKA_BROKERS={brokers}")),
            "MEMOS_KAFKA_BROKERS ({brokers}) is not the fault stack's ({})",
            dir.display()
        );
        let count = std::fs::read_to_string(dir.join("brokers"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        Ok(FaultStack { dir, brokers: count })
    }

    /// `scripts/stack ARGS...` against this stack; fails if it does.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = std::process::Command::new(repo_root().join("scripts/stack"))
            .args(args)
            .env("STACK_DIR", &self.dir)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "scripts/stack {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

/// Full-size counts with `MEMOS_FAULTS_FULL=1`, the bounded ones otherwise.
pub fn full_run() -> bool {
    std::env::var("MEMOS_FAULTS_FULL").is_ok_and(|v| v == "1")
}

/// `bounded` or `full` depending on [`full_run`].
pub fn size<T>(bounded: T, full: T) -> T {
    if full_run() { full } else { bounded }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: &str, partition: i32, offset: i64) -> Ack {
        Ack {
            command_id: id.into(),
            partition,
            offset,
        }
    }

    fn decision(id: &str, partition: i32, offset: i64, applications: i64) -> Decision {
        Decision {
            command_id: id.into(),
            partition,
            offset,
            applications,
        }
    }

    #[test]
    fn every_acknowledged_command_decided_once_where_acked_passes() {
        let acks = [ack("a", 0, 1), ack("b", 1, 7)];
        // "c" was never acknowledged (its request failed after the append): allowed.
        let decisions = [
            decision("a", 0, 1, 1),
            decision("b", 1, 7, 1),
            decision("c", 2, 0, 1),
        ];
        let verdict = judge(&acks, &decisions);
        assert!(verdict.ok(), "{verdict:?}");
        assert_eq!((verdict.acknowledged, verdict.decided), (2, 2));
        verdict.ensure().unwrap();
    }

    #[test]
    fn a_missing_decision_is_lost_and_fails() {
        let acks = [ack("a", 0, 1), ack("missing", 1, 7)];
        let verdict = judge(&acks, &[decision("a", 0, 1, 1)]);
        assert_eq!(verdict.lost, vec!["missing".to_owned()]);
        let error = verdict.ensure().unwrap_err().to_string();
        assert!(error.contains("1 lost") && error.contains("missing"), "{error}");
    }

    #[test]
    fn a_decision_at_another_position_is_misplaced_and_fails() {
        let verdict = judge(&[ack("a", 0, 1)], &[decision("a", 0, 2, 1)]);
        assert_eq!(verdict.misplaced, vec![("a".into(), "0:1".into(), "0:2".into())]);
        assert!(verdict.ensure().is_err());
    }

    #[test]
    fn a_command_applied_twice_is_doubled_and_fails() {
        let verdict = judge(&[ack("a", 0, 1)], &[decision("a", 0, 1, 2)]);
        assert_eq!(verdict.doubled, vec![("a".into(), 2)]);
        assert!(verdict.ensure().is_err());
    }

    #[test]
    fn a_decision_without_a_position_is_not_held_to_one() {
        let verdict = judge(&[ack("t", 2, 40)], &[decision("t", -1, -1, 1)]);
        assert!(verdict.ok(), "{verdict:?}");
    }

    #[test]
    fn the_ledger_measures_the_longest_gap_between_acks() {
        let ledger = Ledger::default();
        ledger.ack(ack("a", 0, 0));
        std::thread::sleep(Duration::from_millis(30));
        ledger.ack(ack("b", 0, 1));
        ledger.error("503");
        ledger.error("503");
        assert!(ledger.longest_gap() >= Duration::from_millis(30));
        assert_eq!(ledger.errors().get("503"), Some(&2));
        assert_eq!(ledger.ack_count(), 2);
    }
}
