//! API keys and the principals they stand for.
//!
//! Guarantees:
//! - A key is shown once, when it is issued ([`issue`]): what is kept anywhere (the keys log,
//!   the memory of every API process) is its SHA-256 digest, never the secret. The secret is
//!   256 random bits from the operating system, so a fast digest is as good as a slow one
//!   against guessing, and checking costs microseconds.
//! - Checking compares digests in time that does not depend on where they differ, and an
//!   unknown key id costs the same digest as a known one: the answer's timing says nothing
//!   about how close a guess was.
//! - The keys are the fold of one log of [`KeyEvent`]s (the `topics.keys` topic, kept
//!   forever): who issued or revoked which key for whom, and when, is that log. Every API
//!   process follows it, so a revocation takes effect on each of them as soon as it has read
//!   the event (well under a second on a healthy broker).
//! - A key past its expiry or revoked is refused, whatever the principal.
//!
//! Token format: `memos_<key id: 16 hex>_<secret: 43 base64url>`; the prefix makes a leaked
//! key easy to find with secret scanners.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// How every API key begins (and a JWT never does: its header is base64url JSON, `eyJ...`).
pub const PREFIX: &str = "memos_";
const KEY_ID_HEX: usize = 16;
const SECRET_BYTES: usize = 32;

/// What a principal may do (see `docs/security.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Its own namespace (its name) and the namespaces it is granted; what is shared with
    /// it; its own tasks and inbox.
    Agent,
    /// Acts on behalf of the agents it is granted, recorded as such in the actor.
    Service,
    /// Reads everything, writes nothing.
    Auditor,
    /// Dead letters, replay, promote, keys; reads everything.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Agent, Role::Service, Role::Auditor, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Service => "service",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (agent, service, auditor, operator)"))
    }
}

/// Who a credential stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The principal's name: for an agent, its agent id and its own namespace.
    pub name: String,
    pub role: Role,
    /// Namespaces besides its own it may write (and read): team namespaces.
    #[serde(default)]
    pub namespaces: BTreeSet<String>,
    /// For a service: the agents it may act for; `*` stands for every agent.
    #[serde(default)]
    pub agents: BTreeSet<String>,
}

impl Principal {
    /// Whether the principal may write memories of `namespace` (as itself).
    pub fn may_write(&self, namespace: &str) -> bool {
        match self.role {
            Role::Agent => self.name == namespace || self.namespaces.contains(namespace),
            Role::Service => self.may_act_for(namespace) || self.namespaces.contains(namespace),
            Role::Auditor | Role::Operator => false,
        }
    }

    /// Whether a service may act for `agent`.
    pub fn may_act_for(&self, agent: &str) -> bool {
        self.role == Role::Service && (self.agents.contains("*") || self.agents.contains(agent))
    }

    /// Whether the principal reads everything (auditors and operators).
    pub fn reads_everything(&self) -> bool {
        matches!(self.role, Role::Auditor | Role::Operator)
    }
}

/// One entry of the keys log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KeyEvent {
    Issued {
        key_id: String,
        /// Hex SHA-256 of the key's secret (see [`digest`]).
        digest: String,
        principal: Principal,
        issued_by: String,
        /// Milliseconds since the epoch.
        issued_at: i64,
        #[serde(default)]
        expires_at: Option<i64>,
        #[serde(default)]
        note: Option<String>,
    },
    Revoked {
        key_id: String,
        revoked_by: String,
        revoked_at: i64,
        #[serde(default)]
        reason: Option<String>,
    },
}

impl KeyEvent {
    /// The record value on the keys topic (JSON: the log is read by operators' tools too).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a key event serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyEvent, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn key_id(&self) -> &str {
        match self {
            KeyEvent::Issued { key_id, .. } | KeyEvent::Revoked { key_id, .. } => key_id,
        }
    }
}

/// A key as the log says it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    pub key_id: String,
    #[serde(skip)]
    digest: [u8; 32],
    pub principal: Principal,
    pub issued_by: String,
    pub issued_at: i64,
    pub expires_at: Option<i64>,
    pub note: Option<String>,
    pub revoked_by: Option<String>,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
}

/// Why a presented key was refused (the label of `memos_http_denied_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a memOS key at all.
    Malformed,
    /// No such key, or the secret does not match (not told apart, on purpose).
    Unknown,
    Revoked,
    Expired,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed_key",
            Refusal::Unknown => "unknown_key",
            Refusal::Revoked => "revoked_key",
            Refusal::Expired => "expired_key",
        }
    }
}

/// A key just issued: the token to hand over once, and the event to append.
pub struct NewKey {
    pub token: Secret,
    pub event: KeyEvent,
}

/// Issues a key for `principal`.
pub fn issue(
    principal: Principal,
    issued_by: &str,
    issued_at: i64,
    expires_at: Option<i64>,
    note: Option<String>,
) -> anyhow::Result<NewKey> {
    let mut random = [0u8; 8 + SECRET_BYTES];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key_id: String = random[..8].iter().map(|b| format!("{b:02x}")).collect();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&random[8..]);
    let token = format!("{PREFIX}{key_id}_{secret}");
    let digest = hex(&digest(&key_id, &secret));
    Ok(NewKey {
        token: Secret::new(token),
        event: KeyEvent::Issued {
            key_id,
            digest,
            principal,
            issued_by: issued_by.to_owned(),
            issued_at,
            expires_at,
            note,
        },
    })
}

/// The key id and secret of a token, if it has the memOS form.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (key_id, secret) = rest.split_at_checked(KEY_ID_HEX)?;
    let secret = secret.strip_prefix('_')?;
    let hex_id = key_id.bytes().all(|b| b.is_ascii_hexdigit());
    let b64 = secret.len() == 43
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (hex_id && b64).then_some((key_id, secret))
}

/// The digest kept for a key: SHA-256 over a domain tag, the key id and the secret.
pub fn digest(key_id: &str, secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"memos-api-key-v1\0");
    hasher.update(key_id.as_bytes());
    hasher.update(b"\0");
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The keys: the fold of the keys log.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: HashMap<String, KeyRecord>,
}

impl KeyRing {
    pub fn new() -> Self {
        KeyRing::default()
    }

    /// Folds one event. A revocation is final; an event for an unknown key, or a second
    /// issue of a known id, is ignored (ids are random: a repeat is a replayed record).
    pub fn apply(&mut self, event: &KeyEvent) {
        match event {
            KeyEvent::Issued {
                key_id,
                digest,
                principal,
                issued_by,
                issued_at,
                expires_at,
                note,
            } => {
                let Some(digest) = unhex(digest) else {
                    tracing::warn!(key_id, "key event with a malformed digest ignored");
                    return;
                };
                self.keys.entry(key_id.clone()).or_insert_with(|| KeyRecord {
                    key_id: key_id.clone(),
                    digest,
                    principal: principal.clone(),
                    issued_by: issued_by.clone(),
                    issued_at: *issued_at,
                    expires_at: *expires_at,
                    note: note.clone(),
                    revoked_by: None,
                    revoked_at: None,
                    revoke_reason: None,
                });
            }
            KeyEvent::Revoked {
                key_id,
                revoked_by,
                revoked_at,
                reason,
            } => {
                if let Some(key) = self.keys.get_mut(key_id)
                    && key.revoked_at.is_none()
                {
                    key.revoked_by = Some(revoked_by.clone());
                    key.revoked_at = Some(*revoked_at);
                    key.revoke_reason = reason.clone();
                }
            }
        }
    }

    pub fn get(&self, key_id: &str) -> Option<&KeyRecord> {
        self.keys.get(key_id)
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Vec<&KeyRecord> {
        let mut keys: Vec<&KeyRecord> = self.keys.values().collect();
        keys.sort_by(|a, b| (a.issued_at, &a.key_id).cmp(&(b.issued_at, &b.key_id)));
        keys
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The principal of a presented token at `now` (milliseconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<(&KeyRecord, &Principal), Refusal> {
        let (key_id, secret) = parse(token).ok_or(Refusal::Malformed)?;
        let presented = digest(key_id, secret);
        let Some(key) = self.keys.get(key_id) else {
            // Same work as a known id: compare against a digest that cannot match.
            let _ = constant_time_eq(&presented, &[0u8; 32]);
            return Err(Refusal::Unknown);
        };
        if !constant_time_eq(&presented, &key.digest) {
            return Err(Refusal::Unknown);
        }
        if key.revoked_at.is_some() {
            return Err(Refusal::Revoked);
        }
        if key.expires_at.is_some_and(|at| at <= now) {
            return Err(Refusal::Expired);
        }
        Ok((key, &key.principal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str) -> Principal {
        Principal {
            name: name.into(),
            role: Role::Agent,
            namespaces: BTreeSet::new(),
            agents: BTreeSet::new(),
        }
    }

    #[test]
    fn an_issued_key_verifies_and_only_its_digest_is_kept() {
        let key = issue(agent("alice"), "ops", 1_000, None, None).unwrap();
        let token = key.token.expose().to_owned();
        let (key_id, secret) = parse(&token).expect("memOS form");
        let logged = String::from_utf8(key.event.encode()).unwrap();
        assert_eq!(KeyEvent::decode(logged.as_bytes()).unwrap(), key.event);
        assert!(!logged.contains(secret), "the secret is not in the log");
        let mut ring = KeyRing::new();
        ring.apply(&key.event);
        let (record, principal) = ring.verify(&token, 2_000).unwrap();
        assert_eq!(record.key_id, key_id);
        assert_eq!(principal.name, "alice");
        assert_eq!(record.issued_by, "ops");
    }

    #[test]
    fn wrong_revoked_expired_and_malformed_keys_are_refused() {
        let mut ring = KeyRing::new();
        let live = issue(agent("a"), "ops", 0, Some(10_000), None).unwrap();
        ring.apply(&live.event);
        let token = live.token.expose().to_owned();
        assert!(ring.verify(&token, 9_999).is_ok());
        assert_eq!(ring.verify(&token, 10_000).unwrap_err(), Refusal::Expired);

        // One character of the secret changed: not told apart from an unknown key.
        let mut wrong = token.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'A' { b'B' } else { b'A' };
        let wrong = String::from_utf8(wrong).unwrap();
        assert_eq!(ring.verify(&wrong, 0).unwrap_err(), Refusal::Unknown);
        let other = issue(agent("b"), "ops", 0, None, None).unwrap();
        assert_eq!(
            ring.verify(other.token.expose(), 0).unwrap_err(),
            Refusal::Unknown
        );
        for malformed in [
            "",
            "Bearer x",
            "memos_",
            "memos_zzzzzzzzzzzzzzzz_",
            &token[..token.len() - 1],
        ] {
            assert_eq!(
                ring.verify(malformed, 0).unwrap_err(),
                Refusal::Malformed,
                "{malformed:?}"
            );
        }

        ring.apply(&KeyEvent::Revoked {
            key_id: live.event.key_id().to_owned(),
            revoked_by: "ops".into(),
            revoked_at: 5,
            reason: Some("leaked".into()),
        });
        assert_eq!(ring.verify(&token, 1).unwrap_err(), Refusal::Revoked);
        // Issued again (a replayed record): still revoked.
        ring.apply(&live.event);
        assert_eq!(ring.verify(&token, 1).unwrap_err(), Refusal::Revoked);
    }

    #[test]
    fn roles_decide_what_a_principal_may_write() {
        let mut team = agent("alice");
        team.namespaces.insert("team-x".into());
        assert!(team.may_write("alice") && team.may_write("team-x"));
        assert!(!team.may_write("bob"));
        let service = Principal {
            name: "ingest".into(),
            role: Role::Service,
            namespaces: BTreeSet::new(),
            agents: ["alice".to_owned()].into(),
        };
        assert!(service.may_act_for("alice") && service.may_write("alice"));
        assert!(!service.may_act_for("bob"));
        let auditor = Principal {
            role: Role::Auditor,
            ..agent("audit")
        };
        assert!(!auditor.may_write("audit") && auditor.reads_everything());
        assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!("root".parse::<Role>().is_err());
    }
}
