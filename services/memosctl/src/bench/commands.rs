//! Deterministic, realistic memory commands: a seeded xorshift drives everything, so the same
//! seed gives the same log (ids included).
//!
//! Mix: about 70% `WriteMemory` (content of 100 to 600 bytes of words, 0 to 5 tags, a small
//! metadata object, a tier mix, an importance, 10% with an embedding by default), 20%
//! `UpdateMemory` of
//! a live memory written earlier in the same namespace (half with the right
//! `expected_version`, which the generator tracks), 10% `ForgetMemory` of a live memory.
//! Namespaces are picked with a mild skew (some agents are busier than others). Every
//! command is valid and, applied in log order, accepted: the expected versions are correct.

use memos_schemas::{ForgetMemory, MemoryCommand, Tier, UpdateMemory, WriteMemory};
use serde::Serialize;
use uuid::Uuid;

/// xorshift64*: tiny, fast, deterministic; not for anything but test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Any seed works; zero would stay zero.
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn uuid(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "user", "prefers", "coffee", "meeting", "tomorrow", "project", "deadline", "report", "asked",
    "about", "weather", "flight", "booked", "hotel", "remember", "password", "reset", "order",
    "shipped", "invoice", "paid", "customer", "support", "ticket", "opened", "closed", "bug", "fixed",
    "release", "version", "deploy", "server", "database", "query", "slow", "index", "added", "memory",
    "agent", "tool", "called", "result", "summary", "document", "uploaded", "page", "section",
    "question", "answer", "follow", "up", "email", "sent", "draft", "review", "approved", "rejected",
    "budget", "quarter", "revenue", "growth", "plan", "team", "hiring", "interview", "candidate",
    "offer", "accepted", "vacation", "monday", "friday", "morning", "evening", "lunch", "dinner",
    "restaurant", "italian", "vegetarian", "allergy", "peanuts", "birthday", "gift", "daughter", "son",
    "partner", "dog", "walk", "gym", "running", "marathon", "training", "schedule", "calendar",
    "reminder", "note", "idea", "research", "paper", "citation", "model", "training", "dataset",
    "evaluation", "metric", "accuracy", "latency", "throughput", "kafka", "postgres", "redis", "vector",
    "search", "embedding", "language", "french", "spanish", "translate", "travel", "paris", "berlin",
    "tokyo", "timezone", "call", "phone", "address", "street", "city", "country", "preferred", "dark",
    "mode", "settings", "notification", "disabled", "enabled", "account", "upgrade", "plan", "premium",
    "trial", "expired", "renewal", "contract", "signed", "legal", "compliance", "audit", "log", "event",
    "stream", "batch",
];

#[rustfmt::skip]
const TAGS: &[&str] = &[
    "preference", "fact", "task", "todo", "contact", "travel", "work", "personal", "health", "finance",
    "food", "project", "meeting", "reminder", "important", "chat", "email", "calendar", "code", "docs",
    "research", "idea", "decision", "feedback", "bug", "release", "customer", "support", "billing",
    "legal", "hr", "hiring", "family", "sport", "music", "books", "movies", "shopping", "home", "car",
];

const SOURCES: &[&str] = &["chat", "email", "tool", "import", "reflection"];

/// A live memory the generator can update or forget, with its current version.
struct Live {
    id: Uuid,
    version: i64,
}

/// What was generated, by kind.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Mix {
    pub writes: u64,
    pub updates: u64,
    pub forgets: u64,
    pub with_embedding: u64,
}

pub struct Generator {
    rng: Rng,
    namespaces: Vec<String>,
    live: Vec<Vec<Live>>,
    dimensions: usize,
    /// Share of writes with an embedding (updates: half of it).
    embedding_fraction: f64,
    /// Unix ms of the first command; each command is one ms later.
    clock_ms: i64,
    pub mix: Mix,
}

/// The fields of a new memory, shared by the Kafka and the HTTP benchmarks.
pub struct NewMemory {
    pub content: String,
    pub tier: Tier,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub importance: f64,
    pub expires_at: Option<i64>,
    pub embedding: Option<Vec<f32>>,
    pub source: Option<String>,
}

impl Generator {
    pub fn new(seed: u64, namespaces: usize, dimensions: usize) -> Self {
        let namespaces: Vec<String> = (0..namespaces.max(1)).map(|i| format!("agent-{i:05}")).collect();
        Generator {
            rng: Rng::new(seed),
            live: (0..namespaces.len()).map(|_| Vec::new()).collect(),
            namespaces,
            dimensions,
            embedding_fraction: 0.1,
            clock_ms: 1_790_000_000_000,
            mix: Mix::default(),
        }
    }

    /// Changes the share of writes that carry an embedding (default 0.1).
    pub fn with_embedding_fraction(mut self, fraction: f64) -> Self {
        self.embedding_fraction = fraction.clamp(0.0, 1.0);
        self
    }

    /// A namespace index, skewed towards the first ones (density 1/(2 sqrt x)).
    fn namespace(&mut self) -> usize {
        let u = self.rng.unit();
        ((u * u) * self.namespaces.len() as f64) as usize
    }

    pub fn content(&mut self) -> String {
        let target = 100 + self.rng.below(501);
        let mut text = String::with_capacity(target + 16);
        while text.len() < target {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(WORDS[self.rng.below(WORDS.len())]);
        }
        text
    }

    fn tags(&mut self) -> Vec<String> {
        let n = self.rng.below(6);
        let mut tags: Vec<String> = Vec::with_capacity(n);
        while tags.len() < n {
            let tag = TAGS[self.rng.below(TAGS.len())];
            if !tags.iter().any(|t| t == tag) {
                tags.push(tag.to_owned());
            }
        }
        tags
    }

    fn metadata(&mut self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("source".into(), SOURCES[self.rng.below(SOURCES.len())].into());
        map.insert("turn".into(), (self.rng.below(200) as u64).into());
        if self.rng.chance(0.5) {
            map.insert(
                "session".into(),
                format!("s-{:06x}", self.rng.below(1 << 24)).into(),
            );
        }
        if self.rng.chance(0.3) {
            map.insert("confidence".into(), ((self.rng.below(100) as f64) / 100.0).into());
        }
        serde_json::Value::Object(map)
    }

    fn tier(&mut self) -> Tier {
        match self.rng.below(10) {
            0..=3 => Tier::Working,
            4..=6 => Tier::Episodic,
            7..=8 => Tier::Semantic,
            _ => Tier::Procedural,
        }
    }

    fn importance(&mut self) -> f64 {
        self.rng.below(101) as f64 / 100.0
    }

    /// A unit-length vector of the configured dimension.
    pub fn embedding(&mut self) -> Vec<f32> {
        let mut v: Vec<f32> = (0..self.dimensions)
            .map(|_| (self.rng.unit() * 2.0 - 1.0) as f32)
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        for x in &mut v {
            *x /= norm;
        }
        v
    }

    /// The fields of a new memory (about 10% with an embedding by default).
    pub fn new_memory(&mut self) -> NewMemory {
        let embedding = self.rng.chance(self.embedding_fraction).then(|| self.embedding());
        if embedding.is_some() {
            self.mix.with_embedding += 1;
        }
        NewMemory {
            content: self.content(),
            tier: self.tier(),
            tags: self.tags(),
            metadata: self.metadata(),
            importance: self.importance(),
            expires_at: self
                .rng
                .chance(0.1)
                .then(|| self.clock_ms + 30 * 24 * 3600 * 1000),
            embedding,
            source: self
                .rng
                .chance(0.5)
                .then(|| format!("chat:{}", self.rng.below(100_000))),
        }
    }

    /// A namespace name for the HTTP benchmark (same skew).
    pub fn agent(&mut self) -> String {
        let i = self.namespace();
        self.namespaces[i].clone()
    }

    /// The next command of the log.
    pub fn next_command(&mut self) -> MemoryCommand {
        self.clock_ms += 1;
        let ns = self.namespace();
        let roll = self.rng.unit();
        let has_live = !self.live[ns].is_empty();
        if roll < 0.7 || !has_live {
            self.write(ns)
        } else if roll < 0.9 {
            self.update(ns)
        } else {
            self.forget(ns)
        }
    }

    fn write(&mut self, ns: usize) -> MemoryCommand {
        self.mix.writes += 1;
        let command_id = self.rng.uuid();
        let memory_id = self.rng.uuid();
        let m = self.new_memory();
        self.live[ns].push(Live {
            id: memory_id,
            version: 1,
        });
        let namespace = self.namespaces[ns].clone();
        MemoryCommand::Write(WriteMemory {
            command_id: command_id.to_string(),
            actor: namespace.clone(),
            namespace,
            issued_at: self.clock_ms,
            traceparent: None,
            memory_id: memory_id.to_string(),
            content: m.content,
            tier: m.tier,
            tags: m.tags,
            metadata_json: m.metadata.to_string(),
            importance: m.importance,
            expires_at: m.expires_at,
            embedding: m.embedding,
            source: m.source,
        })
    }

    fn update(&mut self, ns: usize) -> MemoryCommand {
        self.mix.updates += 1;
        let command_id = self.rng.uuid();
        let pick = self.rng.below(self.live[ns].len());
        let with_version = self.rng.chance(0.5);
        let (memory_id, version) = {
            let live = &mut self.live[ns][pick];
            let before = live.version;
            live.version += 1;
            (live.id, before)
        };
        // At least the content or the importance changes; other fields sometimes.
        let content = self.rng.chance(0.6).then(|| self.content());
        let importance = (content.is_none() || self.rng.chance(0.3)).then(|| self.importance());
        let tags = self.rng.chance(0.3).then(|| self.tags());
        let tier = self.rng.chance(0.2).then(|| self.tier());
        let metadata_json = self.rng.chance(0.2).then(|| self.metadata().to_string());
        let embedding = self
            .rng
            .chance(self.embedding_fraction / 2.0)
            .then(|| self.embedding());
        if embedding.is_some() {
            self.mix.with_embedding += 1;
        }
        let namespace = self.namespaces[ns].clone();
        MemoryCommand::Update(UpdateMemory {
            command_id: command_id.to_string(),
            actor: namespace.clone(),
            namespace,
            issued_at: self.clock_ms,
            traceparent: None,
            memory_id: memory_id.to_string(),
            expected_version: with_version.then_some(version),
            content,
            tier,
            tags,
            metadata_json,
            importance,
            expires_at: None,
            clear_expiry: false,
            embedding,
        })
    }

    fn forget(&mut self, ns: usize) -> MemoryCommand {
        self.mix.forgets += 1;
        let command_id = self.rng.uuid();
        let pick = self.rng.below(self.live[ns].len());
        let live = self.live[ns].swap_remove(pick);
        let with_version = self.rng.chance(0.5);
        let namespace = self.namespaces[ns].clone();
        MemoryCommand::Forget(ForgetMemory {
            command_id: command_id.to_string(),
            actor: namespace.clone(),
            namespace,
            issued_at: self.clock_ms,
            traceparent: None,
            memory_id: live.id.to_string(),
            expected_version: with_version.then_some(live.version),
            reason: self.rng.chance(0.3).then(|| "no longer relevant".to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_log_and_every_command_is_valid() {
        let mut a = Generator::new(7, 50, 8);
        let mut b = Generator::new(7, 50, 8);
        for _ in 0..2000 {
            let (x, y) = (a.next_command(), b.next_command());
            assert_eq!(x, y);
            x.validate().unwrap();
            let bytes = x.encode().unwrap();
            assert_eq!(MemoryCommand::decode(&bytes).unwrap(), x);
        }
        let mix = a.mix;
        assert_eq!(mix.writes + mix.updates + mix.forgets, 2000);
        assert!(
            mix.writes > 1200 && mix.updates > 300 && mix.forgets > 120,
            "{mix:?}"
        );
    }
}
