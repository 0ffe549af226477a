//! Validation to what the views can store, in one place: the API runs it before it appends a
//! command (and on its read parameters), and the decoders of records read from Kafka run it
//! too, so a producer that writes straight to a topic meets exactly the rules an HTTP client
//! meets.
//!
//! Guarantee: a value accepted here can be stored by every view memOS keeps (PostgreSQL
//! `text`, `jsonb` and `timestamptz`, the JSON documents in Redis, the RFC 3339 times of the
//! API), so no accepted input can make a projection fail. The rules:
//!
//! - **No U+0000** in any string: PostgreSQL refuses NUL in `text` and `jsonb`
//!   ([`check_text`]; inside JSON, in keys and values at any depth: [`parse_json`]).
//! - **Times** between [`MIN_TIME_MS`] (`0001-01-01T00:00:00Z`) and [`MAX_TIME_MS`]
//!   (`9999-12-31T23:59:59.999Z`): the years RFC 3339 writes with four digits, inside what
//!   chrono and PostgreSQL `timestamptz` hold ([`Timestamp`]).
//! - **JSON** (metadata, payloads, results, inputs) nested at most [`MAX_JSON_DEPTH`] levels
//!   and no larger than its field's limit.
//! - **Search queries** of at most [`MAX_SEARCH_QUERY_BYTES`] bytes and [`MAX_SEARCH_TERMS`]
//!   words ([`SearchQuery`]): PostgreSQL builds a tree of the query's terms and a long one
//!   exhausts its stack.
//! - **Workflow templates** form a graph the orchestrator can run ([`WorkflowDag`]): 1 to
//!   [`MAX_STEPS`] steps, unique step ids, no self-dependency, no unknown dependency, no cycle.
//!
//! Every error names the offending field ([`ValidationError::field`]) as the API names it.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::task::WorkflowStep;

/// Earliest time accepted, in Unix milliseconds: `0001-01-01T00:00:00Z`.
pub const MIN_TIME_MS: i64 = -62_135_596_800_000;
/// Latest time accepted, in Unix milliseconds: `9999-12-31T23:59:59.999Z`.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;
/// Deepest nesting of JSON arrays and objects (`{"a":[1]}` is 2 deep).
pub const MAX_JSON_DEPTH: usize = 32;
/// Longest search query (full text, memories and tools), in bytes of UTF-8.
pub const MAX_SEARCH_QUERY_BYTES: usize = 1024;
/// Most words (runs of letters and digits) in a search query.
pub const MAX_SEARCH_TERMS: usize = 32;
/// Longest read parameter (a path segment or query parameter), in bytes.
pub const MAX_PARAM_BYTES: usize = 4096;
/// Most steps of a workflow template.
pub const MAX_STEPS: usize = 64;
/// Longest namespace, actor, id or name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most tags (or capabilities) on one command.
pub const MAX_TAGS: usize = 32;
/// Longest tag (or capability), in bytes.
pub const MAX_TAG_BYTES: usize = 128;

/// An input that breaks a limit or an invariant of its type.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The offending field, as the API names it (`metadata`, `payload.rows[2]`, `steps.depends_on`).
    pub field: Cow<'static, str>,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether the input is rejected for its size (HTTP 413) rather than its shape (422).
    pub fn is_too_large(&self) -> bool {
        self.message.starts_with("too large")
    }
}

const NUL_MESSAGE: &str = "must not contain U+0000 (NUL)";

/// Refuses U+0000, which PostgreSQL cannot store in `text` or `jsonb`.
pub fn check_text(field: impl Into<Cow<'static, str>>, value: &str) -> Result<(), ValidationError> {
    if value.contains('\0') {
        return Err(ValidationError::new(field, NUL_MESSAGE));
    }
    Ok(())
}

/// [`check_text`] on an optional value.
pub fn check_optional_text(field: &'static str, value: Option<&str>) -> Result<(), ValidationError> {
    value.map_or(Ok(()), |v| check_text(field, v))
}

/// A string field limited to `max` bytes, without U+0000.
pub fn check_bounded_text(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.len() > max {
        return Err(ValidationError::new(
            field,
            format!("too large: {} bytes, at most {max}", value.len()),
        ));
    }
    check_text(field, value)
}

/// A UUID in its text form.
pub fn check_uuid(field: &'static str, value: &str) -> Result<(), ValidationError> {
    Uuid::parse_str(value)
        .map(|_| ())
        .map_err(|_| ValidationError::new(field, "must be a UUID"))
}

/// A namespace, actor, id or name: not blank, at most [`MAX_NAME_BYTES`], no control
/// character (U+0000 included).
pub fn check_name(field: impl Into<Cow<'static, str>>, value: &str) -> Result<(), ValidationError> {
    let field = field.into();
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(ValidationError::new(
            field,
            format!("too large: at most {MAX_NAME_BYTES} bytes"),
        ));
    }
    check_text(field.clone(), value)?;
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// Tags or capabilities: at most [`MAX_TAGS`], each 1 to [`MAX_TAG_BYTES`] bytes without U+0000.
pub fn check_tags(field: &'static str, tags: &[String]) -> Result<(), ValidationError> {
    if tags.len() > MAX_TAGS {
        return Err(ValidationError::new(
            field,
            format!("too large: {} tags, at most {MAX_TAGS}", tags.len()),
        ));
    }
    if let Some(tag) = tags.iter().find(|t| t.is_empty() || t.len() > MAX_TAG_BYTES) {
        return Err(ValidationError::new(
            field,
            format!("each must be 1 to {MAX_TAG_BYTES} bytes, got {}", tag.len()),
        ));
    }
    if tags.iter().any(|t| t.contains('\0')) {
        return Err(ValidationError::new(field, NUL_MESSAGE));
    }
    Ok(())
}

/// An instant every view can store: between [`MIN_TIME_MS`] and [`MAX_TIME_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    fn out_of_range(field: impl Into<Cow<'static, str>>) -> ValidationError {
        ValidationError::new(
            field,
            "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z",
        )
    }

    /// From Unix milliseconds (the wire form of every time in the schemas).
    pub fn from_millis(
        field: impl Into<Cow<'static, str>>,
        millis: i64,
    ) -> Result<Timestamp, ValidationError> {
        if (MIN_TIME_MS..=MAX_TIME_MS).contains(&millis) {
            Ok(Timestamp(millis))
        } else {
            Err(Self::out_of_range(field))
        }
    }

    /// From a parsed time (an API field or parameter); sub-millisecond digits are dropped.
    pub fn from_datetime(
        field: impl Into<Cow<'static, str>>,
        time: &DateTime<Utc>,
    ) -> Result<Timestamp, ValidationError> {
        Self::from_millis(field, time.timestamp_millis())
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).expect("the range is inside chrono's")
    }
}

/// [`Timestamp::from_millis`] when only the check matters.
pub fn check_time(field: &'static str, millis: i64) -> Result<(), ValidationError> {
    Timestamp::from_millis(field, millis).map(|_| ())
}

/// A read parameter's time (`as_of`, `created_after`, ...): in range, so a query never asks
/// PostgreSQL for a time it cannot represent.
pub fn check_time_param(field: &'static str, time: Option<&DateTime<Utc>>) -> Result<(), ValidationError> {
    time.map_or(Ok(()), |t| Timestamp::from_datetime(field, t).map(|_| ()))
}

/// A read parameter (a path segment, a query parameter): no U+0000, at most
/// [`MAX_PARAM_BYTES`].
pub fn check_param(field: impl Into<Cow<'static, str>>, value: &str) -> Result<(), ValidationError> {
    let field = field.into();
    if value.len() > MAX_PARAM_BYTES {
        return Err(ValidationError::new(
            field,
            format!("too large: at most {MAX_PARAM_BYTES} bytes"),
        ));
    }
    check_text(field, value)
}

/// Nesting depth of JSON text (arrays and objects), without parsing it: linear, no recursion,
/// so even hostile text costs one pass.
fn json_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The path of the first string (key or value) holding U+0000 in `value`, below `field`.
fn find_nul(value: &serde_json::Value, path: &mut String) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = find_nul(item, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        serde_json::Value::Object(map) => map.iter().any(|(key, item)| {
            let len = path.len();
            if key.contains('\0') {
                path.push_str(".<key>");
                return true;
            }
            path.push('.');
            path.push_str(key);
            let found = find_nul(item, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        _ => false,
    }
}

/// Which JSON documents a field accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    /// Any JSON value (payloads, results, inputs).
    Any,
    /// A JSON object (metadata).
    Object,
}

/// Parses JSON text that every view can store: at most `max_bytes`, nested at most
/// [`MAX_JSON_DEPTH`] levels, no U+0000 in any key or string at any depth.
pub fn parse_json(
    field: &'static str,
    text: &str,
    max_bytes: usize,
    kind: JsonKind,
) -> Result<serde_json::Value, ValidationError> {
    if text.len() > max_bytes {
        return Err(ValidationError::new(
            field,
            format!("too large: {} bytes, at most {max_bytes}", text.len()),
        ));
    }
    let depth = json_depth(text);
    if depth > MAX_JSON_DEPTH {
        return Err(ValidationError::new(
            field,
            format!("nested {depth} levels deep, at most {MAX_JSON_DEPTH}"),
        ));
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ValidationError::new(field, format!("must be JSON: {e}")))?;
    if kind == JsonKind::Object && !value.is_object() {
        return Err(ValidationError::new(field, "must be a JSON object"));
    }
    check_json_value(field, &value)?;
    Ok(value)
}

/// [`parse_json`]'s depth and U+0000 rules on a value already parsed (an API parameter).
pub fn check_json_value(field: &'static str, value: &serde_json::Value) -> Result<(), ValidationError> {
    fn depth(value: &serde_json::Value, limit: usize) -> bool {
        match value {
            serde_json::Value::Array(items) => limit > 0 && items.iter().all(|v| depth(v, limit - 1)),
            serde_json::Value::Object(map) => limit > 0 && map.values().all(|v| depth(v, limit - 1)),
            _ => true,
        }
    }
    if !depth(value, MAX_JSON_DEPTH) {
        return Err(ValidationError::new(
            field,
            format!("nested deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    let mut path = String::from(field);
    if find_nul(value, &mut path) {
        return Err(ValidationError::new(path, NUL_MESSAGE));
    }
    Ok(())
}

/// A full-text search query PostgreSQL can run: not blank, at most [`MAX_SEARCH_QUERY_BYTES`]
/// bytes and [`MAX_SEARCH_TERMS`] words, no U+0000.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery(String);

impl SearchQuery {
    pub fn parse(field: &'static str, text: String) -> Result<SearchQuery, ValidationError> {
        if text.trim().is_empty() {
            return Err(ValidationError::new(field, "must not be blank"));
        }
        if text.len() > MAX_SEARCH_QUERY_BYTES {
            return Err(ValidationError::new(
                field,
                format!("too long: {} bytes, at most {MAX_SEARCH_QUERY_BYTES}", text.len()),
            ));
        }
        check_text(field, &text)?;
        // What PostgreSQL's parser turns into lexemes: runs of letters and digits (a
        // hyphenated word counts once per part, as it does there).
        let terms = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty())
            .count();
        if terms > MAX_SEARCH_TERMS {
            return Err(ValidationError::new(
                field,
                format!("too long: {terms} words, at most {MAX_SEARCH_TERMS}"),
            ));
        }
        Ok(SearchQuery(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A workflow template's steps, checked to form a graph the orchestrator can run: 1 to
/// [`MAX_STEPS`] steps, unique ids, every dependency another step of the template, no cycle.
/// Holds the steps' indices in an order where every step comes after its dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowDag {
    order: Vec<usize>,
}

impl WorkflowDag {
    pub fn parse(steps: &[WorkflowStep]) -> Result<WorkflowDag, ValidationError> {
        if steps.is_empty() || steps.len() > MAX_STEPS {
            return Err(ValidationError::new(
                "steps",
                format!("must have 1 to {MAX_STEPS} steps, got {}", steps.len()),
            ));
        }
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            if index.insert(step.step_id.as_str(), i).is_some() {
                return Err(ValidationError::new(
                    "steps.step_id",
                    format!("step id {:?} is used twice", step.step_id),
                ));
            }
        }
        for step in steps {
            if step.depends_on.len() > MAX_STEPS {
                return Err(ValidationError::new(
                    "steps.depends_on",
                    format!("too large: at most {MAX_STEPS} dependencies"),
                ));
            }
            for dependency in &step.depends_on {
                if *dependency == step.step_id {
                    return Err(ValidationError::new(
                        "steps.depends_on",
                        format!("step {:?} depends on itself", step.step_id),
                    ));
                }
                if !index.contains_key(dependency.as_str()) {
                    return Err(ValidationError::new(
                        "steps.depends_on",
                        format!("step {:?} depends on unknown step {dependency:?}", step.step_id),
                    ));
                }
            }
        }
        // Kahn: repeatedly take the steps whose dependencies are all taken.
        let mut taken = vec![false; steps.len()];
        let mut order = Vec::with_capacity(steps.len());
        while order.len() < steps.len() {
            let ready: Vec<usize> = (0..steps.len())
                .filter(|&i| !taken[i])
                .filter(|&i| steps[i].depends_on.iter().all(|d| taken[index[d.as_str()]]))
                .collect();
            if ready.is_empty() {
                let cyclic: Vec<&str> = (0..steps.len())
                    .filter(|&i| !taken[i])
                    .map(|i| steps[i].step_id.as_str())
                    .collect();
                return Err(ValidationError::new(
                    "steps",
                    format!("the steps form a cycle: {}", cyclic.join(", ")),
                ));
            }
            for i in ready {
                taken[i] = true;
                order.push(i);
            }
        }
        Ok(WorkflowDag { order })
    }

    /// Indices into the parsed steps, each after every step it depends on.
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

/// Test support: `value` with U+0000 put into each of its strings in turn (every field, every
/// element), with the path of the string; copies that the type cannot hold are skipped.
#[cfg(test)]
pub(crate) fn each_string_poisoned<T>(value: &T) -> Vec<(String, T)>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    fn paths(value: &serde_json::Value, path: String, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(_) => out.push(path),
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    paths(item, format!("{path}/{i}"), out);
                }
            }
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    paths(item, format!("{path}/{key}"), out);
                }
            }
            _ => {}
        }
    }
    let json = serde_json::to_value(value).expect("serializable");
    let mut found = Vec::new();
    paths(&json, String::new(), &mut found);
    found
        .into_iter()
        .filter_map(|path| {
            let mut poisoned = json.clone();
            match poisoned.pointer_mut(&path) {
                Some(serde_json::Value::String(s)) => s.push('\0'),
                _ => unreachable!("a string was found there"),
            }
            serde_json::from_value(poisoned).ok().map(|v| (path, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn times_are_bounded_to_four_digit_years() {
        assert!(Timestamp::from_millis("t", 0).is_ok());
        assert!(Timestamp::from_millis("t", MIN_TIME_MS).is_ok());
        assert!(Timestamp::from_millis("t", MAX_TIME_MS).is_ok());
        assert_eq!(
            Timestamp::from_millis("t", MAX_TIME_MS)
                .unwrap()
                .to_datetime()
                .to_rfc3339(),
            "9999-12-31T23:59:59.999+00:00"
        );
        assert_eq!(
            Timestamp::from_millis("t", MIN_TIME_MS)
                .unwrap()
                .to_datetime()
                .to_rfc3339(),
            "0001-01-01T00:00:00+00:00"
        );
        for millis in [MAX_TIME_MS + 1, MIN_TIME_MS - 1, i64::MAX, i64::MIN] {
            assert_eq!(
                Timestamp::from_millis("expires_at", millis).unwrap_err().field,
                "expires_at"
            );
        }
        let far: DateTime<Utc> = "+200000-01-01T00:00:00Z".parse().unwrap();
        assert!(Timestamp::from_datetime("as_of", &far).is_err());
    }

    #[test]
    fn depth_is_limited_at_every_depth_and_counted_without_recursion() {
        for depth in 0..=MAX_JSON_DEPTH {
            assert!(
                parse_json("payload", &nested(depth), 1 << 20, JsonKind::Any).is_ok(),
                "{depth}"
            );
        }
        for depth in [MAX_JSON_DEPTH + 1, 128, 129, 100_000] {
            let err = parse_json("payload", &nested(depth), 1 << 20, JsonKind::Any).unwrap_err();
            assert_eq!(err.field, "payload");
            assert!(err.message.contains("levels"), "{err}");
        }
        // Brackets inside strings do not count, escaped quotes do not end a string.
        let text = format!(r#"{{"a":"{}\"[[["}}"#, "[".repeat(100));
        assert!(parse_json("metadata", &text, 1 << 20, JsonKind::Object).is_ok());
        // The same rule on parsed values.
        let deep: serde_json::Value = serde_json::from_str(&nested(MAX_JSON_DEPTH + 1)).unwrap();
        assert!(check_json_value("metadata", &deep).is_err());
        let ok: serde_json::Value = serde_json::from_str(&nested(MAX_JSON_DEPTH)).unwrap();
        assert!(check_json_value("metadata", &ok).is_ok());
    }

    #[test]
    fn nul_is_found_in_keys_and_values_at_any_depth() {
        let clean = serde_json::json!({"a": [1, {"b": "x", "c": [null, true, "y"]}], "d": {}});
        assert!(check_json_value("metadata", &clean).is_ok());
        // Put NUL in every string and every key of the document, one at a time.
        fn strings(value: &serde_json::Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
            match value {
                serde_json::Value::String(_) => out.push(path),
                serde_json::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let mut p = path.clone();
                        p.push(i.to_string());
                        strings(item, p, out);
                    }
                }
                serde_json::Value::Object(map) => {
                    for (key, item) in map {
                        let mut p = path.clone();
                        p.push(key.clone());
                        out.push({
                            let mut k = p.clone();
                            k.push("<key>".into());
                            k
                        });
                        strings(item, p, out);
                    }
                }
                _ => {}
            }
        }
        fn poison(value: &mut serde_json::Value, path: &[String]) {
            match (value, path) {
                (serde_json::Value::String(s), []) => s.insert(0, '\0'),
                (serde_json::Value::Object(map), [key, rest @ ..]) if rest == ["<key>"] => {
                    let item = map.remove(key).unwrap();
                    map.insert(format!("{key}\0"), item);
                }
                (serde_json::Value::Object(map), [key, rest @ ..]) => poison(&mut map[key], rest),
                (serde_json::Value::Array(items), [i, rest @ ..]) => {
                    poison(&mut items[i.parse::<usize>().unwrap()], rest)
                }
                _ => unreachable!(),
            }
        }
        let mut paths = Vec::new();
        strings(&clean, Vec::new(), &mut paths);
        assert_eq!(paths.len(), 6, "{paths:?}");
        for path in paths {
            let mut value = clean.clone();
            poison(&mut value, &path);
            let err = check_json_value("metadata", &value).unwrap_err();
            assert!(err.field.starts_with("metadata"), "{err}");
            assert!(err.message.contains("U+0000"), "{err}");
            // As text, too (the wire form of a direct producer's record).
            let text = value.to_string();
            assert!(text.contains("\\u0000"));
            assert!(parse_json("metadata", &text, 1 << 20, JsonKind::Object).is_err());
        }
        let err = check_json_value("metadata", &serde_json::json!({"a": [0, "\0"]})).unwrap_err();
        assert_eq!(err.field, "metadata.a[1]");
    }

    #[test]
    fn strings_and_names_refuse_nul_anywhere() {
        for text in ["\0", "a\0", "\0a", "a\0b", "☕\0"] {
            assert!(check_text("content", text).is_err());
            assert!(check_name("actor", text).is_err());
            assert!(check_param("q", text).is_err());
            assert!(check_tags("tags", &["ok".into(), text.into()]).is_err());
        }
        assert!(check_text("content", "plain ☕").is_ok());
        assert!(check_param("q", &"x".repeat(MAX_PARAM_BYTES + 1)).is_err());
    }

    #[test]
    fn search_queries_are_bounded_in_bytes_and_words() {
        assert!(SearchQuery::parse("query", "dark roast coffee".into()).is_ok());
        let words = vec!["w"; MAX_SEARCH_TERMS].join(" ");
        assert!(SearchQuery::parse("query", words.clone()).is_ok());
        let err = SearchQuery::parse("query", format!("{words} w")).unwrap_err();
        assert!(err.message.contains("words"), "{err}");
        // A hyphenated chain is as many lexemes as parts.
        assert!(SearchQuery::parse("query", vec!["a"; MAX_SEARCH_TERMS + 1].join("-")).is_err());
        assert!(SearchQuery::parse("query", "x".repeat(MAX_SEARCH_QUERY_BYTES + 1)).is_err());
        assert!(SearchQuery::parse("query", "coffee\0".into()).is_err());
        assert!(SearchQuery::parse("query", "  ".into()).is_err());
        let forty_thousand = vec!["word"; 40_000].join(" ");
        assert_eq!(
            SearchQuery::parse("query", forty_thousand).unwrap_err().field,
            "query"
        );
    }

    fn step(id: &str, deps: &[&str]) -> WorkflowStep {
        WorkflowStep {
            step_id: id.into(),
            capability: "x".into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            timeout_ms: 1000,
            max_attempts: 1,
        }
    }

    #[test]
    fn workflow_graphs_are_checked() {
        let dag = WorkflowDag::parse(&[step("c", &["a", "b"]), step("a", &[]), step("b", &["a"])]).unwrap();
        assert_eq!(dag.order(), &[1, 2, 0]);

        let cases: Vec<(Vec<WorkflowStep>, &str, &str)> = vec![
            (vec![], "steps", "1 to"),
            (vec![step("a", &["a"])], "steps.depends_on", "itself"),
            (
                vec![step("a", &[]), step("b", &["z"])],
                "steps.depends_on",
                "unknown step \"z\"",
            ),
            (vec![step("a", &[]), step("a", &[])], "steps.step_id", "twice"),
            (
                vec![step("a", &["c"]), step("b", &["a"]), step("c", &["b"])],
                "steps",
                "cycle: a, b, c",
            ),
            (
                vec![step("ok", &[]), step("x", &["y"]), step("y", &["x"])],
                "steps",
                "cycle: x, y",
            ),
            (
                (0..=MAX_STEPS).map(|i| step(&i.to_string(), &[])).collect(),
                "steps",
                "1 to",
            ),
        ];
        for (steps, field, message) in cases {
            let err = WorkflowDag::parse(&steps).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.contains(message), "{err}");
        }
    }

    /// Every graph on a few nodes: accepted exactly when it has no cycle (checked against a
    /// depth-first search), and the order puts every step after its dependencies.
    #[test]
    fn every_small_graph_is_accepted_exactly_when_acyclic() {
        let n = 4;
        let edges: Vec<(usize, usize)> = (0..n)
            .flat_map(|a| (0..n).filter(move |&b| b != a).map(move |b| (a, b)))
            .collect();
        for mask in 0u32..(1 << edges.len()) {
            let deps: Vec<Vec<usize>> = (0..n)
                .map(|a| {
                    edges
                        .iter()
                        .enumerate()
                        .filter(|(i, (from, _))| mask & (1 << i) != 0 && *from == a)
                        .map(|(_, (_, to))| *to)
                        .collect()
                })
                .collect();
            fn cyclic(deps: &[Vec<usize>], node: usize, state: &mut [u8]) -> bool {
                match state[node] {
                    1 => return true,
                    2 => return false,
                    _ => {}
                }
                state[node] = 1;
                let found = deps[node].iter().any(|&d| cyclic(deps, d, state));
                state[node] = 2;
                found
            }
            let mut state = vec![0u8; n];
            let has_cycle = (0..n).any(|i| cyclic(&deps, i, &mut state));
            let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let steps: Vec<WorkflowStep> = (0..n)
                .map(|i| {
                    let d: Vec<&str> = deps[i].iter().map(|&d| names[d].as_str()).collect();
                    step(&names[i], &d)
                })
                .collect();
            match WorkflowDag::parse(&steps) {
                Ok(dag) => {
                    assert!(!has_cycle, "mask {mask}");
                    let position: Vec<usize> = {
                        let mut p = vec![0; n];
                        for (at, &i) in dag.order().iter().enumerate() {
                            p[i] = at;
                        }
                        p
                    };
                    for (a, ds) in deps.iter().enumerate() {
                        assert!(ds.iter().all(|&d| position[d] < position[a]), "mask {mask}");
                    }
                }
                Err(e) => assert!(has_cycle, "mask {mask}: {e}"),
            }
        }
    }
}
