//! Every schema in `schemas/avro/` has, in memOS, the Parsing Canonical Form and fingerprint
//! that two independent Avro implementations compute: fastavro (Python) and Java Avro's
//! `SchemaNormalization`, the reference implementation. So a record framed by any
//! spec-following client names a schema memOS knows.
//!
//! Needs `scripts/python-deps` (fastavro into `.cache/python`) and `scripts/java-deps` (Java
//! Avro into `.cache/avro-java`); `scripts/test` runs both first. Without them this test fails,
//! it never skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use memos_schemas::fingerprint::{fingerprint, parsing_canonical_form};
use memos_schemas::registry::registry;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every `.avsc` under `schemas/avro/`, sorted.
fn schema_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "avsc") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root().join("schemas/avro"), &mut files);
    files.sort();
    files
}

/// One implementation's answers: file -> (fingerprint, canonical form), read from lines
/// `path \t 16 hex digits \t canonical form`.
type Answers = BTreeMap<PathBuf, (u64, String)>;

fn run(what: &str, mut command: Command, hint: &str) -> std::process::Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} ({hint}): {e}"))
}

fn answers(what: &str, child: std::process::Child, hint: &str) -> Answers {
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{what} failed ({hint}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, '\t');
            let (Some(path), Some(fp), Some(canonical)) = (parts.next(), parts.next(), parts.next()) else {
                panic!("{what} printed an unexpected line: {line:?}")
            };
            let fp = u64::from_str_radix(fp, 16).unwrap_or_else(|e| panic!("{what}: {fp:?}: {e}"));
            (PathBuf::from(path), (fp, canonical.to_owned()))
        })
        .collect()
}

#[test]
fn every_schema_has_the_fingerprint_of_fastavro_and_java_avro() {
    let root = repo_root();
    let files = schema_files();
    assert!(
        files.len() >= 19,
        "schemas/avro/ has only {} schemas",
        files.len()
    );

    // Both start at once: the JVM's start-up is most of this test's time.
    let python_hint = "run scripts/python-deps";
    let mut python = Command::new("python3");
    python
        .arg(root.join("schemas/crosscheck/fingerprints.py"))
        .args(&files)
        .env("PYTHONPATH", root.join(".cache/python"));
    let python = run("fastavro", python, python_hint);
    let java_hint = "run scripts/java-deps; needs Java 17+";
    let mut java = Command::new("java");
    java.args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp"])
        .arg(root.join(".cache/avro-java/*"))
        .arg(root.join("schemas/crosscheck/Fingerprints.java"))
        .args(&files);
    let java = run("Java Avro", java, java_hint);
    let fastavro = answers("fastavro", python, python_hint);
    let java = answers("Java Avro", java, java_hint);

    for (name, theirs) in [("fastavro", &fastavro), ("Java Avro", &java)] {
        assert_eq!(
            theirs.keys().collect::<Vec<_>>(),
            files.iter().collect::<Vec<_>>(),
            "{name} did not answer for every schema"
        );
    }
    let mut mismatches = Vec::new();
    for file in &files {
        let json = std::fs::read_to_string(file).unwrap();
        let ours = (
            fingerprint(&json).unwrap(),
            parsing_canonical_form(&serde_json::from_str(&json).unwrap()).unwrap(),
        );
        for (name, theirs) in [("fastavro", &fastavro[file]), ("Java Avro", &java[file])] {
            if *theirs != ours {
                mismatches.push(format!(
                    "{}: memOS {:#018x} {}\n  {name} {:#018x} {}",
                    file.display(),
                    ours.0,
                    ours.1,
                    theirs.0,
                    theirs.1
                ));
            }
        }
        // And the registry files the schema under that fingerprint: what others frame with
        // is what memOS reads, and what memOS writes.
        let entry = registry()
            .get(ours.0)
            .unwrap_or_else(|| panic!("{} is not in the registry", file.display()));
        assert_eq!(entry.fingerprint, ours.0, "{}", file.display());
    }
    assert!(
        mismatches.is_empty(),
        "fingerprints differ:\n{}",
        mismatches.join("\n")
    );
}
