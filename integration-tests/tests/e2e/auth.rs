//! Identity against the running service with `http.auth = "keys"`: every `/v1` request needs
//! a key; the actor and the reader come from the key's principal; impersonation through
//! `X-Memos-Agent`, `X-Memos-Actor` or a body `agent_id` is refused and counted; a revoked
//! key stops working on the running API.

use std::time::Duration;

use memos_integration_tests::metrics_text;
use memos_integration_tests::process::{issue_key, memosctl_ok};
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

struct As<'a> {
    http: &'a reqwest::Client,
    memos: &'a MemosProcess,
    key: Option<&'a str>,
}

impl As<'_> {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self.http.request(method, self.memos.url(path));
        if let Some(key) = self.key {
            request = request.bearer_auth(key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_decides_who_acts_and_reads_and_a_revoked_key_stops_working() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let alice_key = issue_key(&env, "alice", "agent", &[])?;
    let bob_key = issue_key(&env, "bob", "agent", &[])?;
    let audit_key = issue_key(&env, "audit", "auditor", &[])?;
    let ingest_key = issue_key(&env, "ingest", "service", &["--agent", "alice"])?;
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__HTTP__AUTH", "keys")]).await?;
    let http = reqwest::Client::new();
    let anonymous = As {
        http: &http,
        memos: &memos,
        key: None,
    };
    let alice = As {
        http: &http,
        memos: &memos,
        key: Some(&alice_key),
    };
    let bob = As {
        http: &http,
        memos: &memos,
        key: Some(&bob_key),
    };
    let auditor = As {
        http: &http,
        memos: &memos,
        key: Some(&audit_key),
    };
    let ingest = As {
        http: &http,
        memos: &memos,
        key: Some(&ingest_key),
    };
    let write = |agent: &str| Some(json!({"agent_id": agent, "content": format!("a memory of {agent}")}));

    // Anonymous: every /v1 route refuses with 401; health, readiness and metrics stay open.
    for (method, path) in [
        (Method::POST, "/v1/memories"),
        (Method::GET, "/v1/agents/alice/memories"),
        (Method::POST, "/v1/memories/search"),
        (Method::GET, "/v1/tools"),
        (Method::GET, "/v1/agents/alice/inbox"),
        (Method::POST, "/v1/tasks"),
        (Method::GET, "/v1/orchestrator/stats"),
    ] {
        let (status, body) = anonymous.call(method, path, Some(json!({})), &[]).await?;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["code"], "unauthorized", "{path}");
    }
    for path in ["/healthz", "/metrics"] {
        assert_eq!(
            anonymous.call(Method::GET, path, None, &[]).await?.0,
            200,
            "{path}"
        );
    }

    // The actor is the key's principal; a body or header naming another is refused.
    let (status, accepted) = alice
        .call(Method::POST, "/v1/memories", write("alice"), &[])
        .await?;
    assert_eq!(status, 202, "{accepted}");
    let memory_id = accepted["memory_id"].as_str().unwrap().to_owned();
    let position = accepted["position"].as_str().unwrap().to_owned();
    let command_id = accepted["command_id"].as_str().unwrap().to_owned();
    assert_eq!(
        alice
            .call(Method::POST, "/v1/memories", write("bob"), &[])
            .await?
            .0,
        403
    );
    let root = [("x-memos-actor", "root")];
    assert_eq!(
        alice
            .call(Method::POST, "/v1/memories", write("alice"), &root)
            .await?
            .0,
        403
    );
    assert_eq!(
        auditor
            .call(Method::POST, "/v1/memories", write("audit"), &[])
            .await?
            .0,
        403
    );

    // Reads are made as the principal: the owner reads, another agent does not (404, as if
    // absent), and cannot borrow the owner's name; an auditor reads everything.
    let memory = format!("/v1/memories/{memory_id}");
    let (status, body) = alice
        .call(Method::GET, &memory, None, &[("x-memos-position", &position)])
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(bob.call(Method::GET, &memory, None, &[]).await?.0, 404);
    assert_eq!(
        bob.call(Method::GET, &memory, None, &[("x-memos-agent", "alice")])
            .await?
            .0,
        403
    );
    assert_eq!(auditor.call(Method::GET, &memory, None, &[]).await?.0, 200);
    let search = Some(json!({"agent_id": "alice", "query": "memory"}));
    assert_eq!(
        bob.call(Method::POST, "/v1/memories/search", search.clone(), &[])
            .await?
            .0,
        403
    );
    assert_eq!(
        alice
            .call(Method::POST, "/v1/memories/search", search, &[])
            .await?
            .0,
        200
    );

    // The command's status: its own namespace's, not another's.
    let status_path = format!("/v1/commands/{command_id}");
    let decided = eventually("the write is decided", WAIT, || async {
        let (status, body) = alice.call(Method::GET, &status_path, None, &[]).await?;
        Ok((status == 200 && body["status"] == "applied").then_some(body))
    })
    .await?;
    assert_eq!(decided["actor"], "alice", "the actor is the key's principal");
    assert_eq!(bob.call(Method::GET, &status_path, None, &[]).await?.0, 404);

    // A service acts for the agents it is granted, recorded as such, and reads as one.
    let (status, accepted) = ingest
        .call(Method::POST, "/v1/memories", write("alice"), &[])
        .await?;
    assert_eq!(status, 202, "{accepted}");
    let via = format!("/v1/commands/{}", accepted["command_id"].as_str().unwrap());
    let decided = eventually("the service's write is decided", WAIT, || async {
        let (status, body) = alice.call(Method::GET, &via, None, &[]).await?;
        Ok((status == 200 && body["status"] == "applied").then_some(body))
    })
    .await?;
    assert_eq!(decided["actor"], "alice via ingest");
    assert_eq!(
        ingest
            .call(Method::POST, "/v1/memories", write("bob"), &[])
            .await?
            .0,
        403
    );
    assert_eq!(
        ingest
            .call(Method::GET, &memory, None, &[("x-memos-agent", "alice")])
            .await?
            .0,
        200
    );
    assert_eq!(
        ingest.call(Method::GET, &memory, None, &[]).await?.0,
        403,
        "a service names its reader"
    );
    assert_eq!(
        ingest
            .call(Method::GET, &memory, None, &[("x-memos-agent", "bob")])
            .await?
            .0,
        403
    );

    // Tasks: an agent registers and reads only itself.
    let register = |agent: &str| Some(json!({"agent_id": agent, "capabilities": ["x"], "max_concurrent": 1}));
    let (status, registered) = alice
        .call(Method::POST, "/v1/agents", register("alice"), &[])
        .await?;
    assert_eq!(status, 202, "{registered}");
    let registration = format!("/v1/commands/{}", registered["command_id"].as_str().unwrap());
    eventually("the registration is decided", WAIT, || async {
        let (status, body) = alice.call(Method::GET, &registration, None, &[]).await?;
        Ok((status == 200 && body["status"] == "applied").then_some(()))
    })
    .await?;
    assert_eq!(
        bob.call(Method::GET, &registration, None, &[]).await?.0,
        404,
        "another agent's task command"
    );
    assert_eq!(
        bob.call(Method::POST, "/v1/agents", register("alice"), &[])
            .await?
            .0,
        403
    );
    assert_eq!(
        bob.call(Method::GET, "/v1/agents/alice/inbox", None, &[])
            .await?
            .0,
        403
    );
    eventually("alice reads its inbox once registered", WAIT, || async {
        let (status, _) = alice
            .call(Method::GET, "/v1/agents/alice/inbox", None, &[])
            .await?;
        Ok((status == 200).then_some(()))
    })
    .await?;
    assert_eq!(
        bob.call(Method::GET, "/v1/tasks?agent_id=alice", None, &[])
            .await?
            .0,
        403
    );
    let complete = Some(json!({"agent_id": "alice", "result": "done"}));
    assert_eq!(
        bob.call(Method::POST, "/v1/tasks/t-1/complete", complete, &[])
            .await?
            .0,
        403
    );

    // Every refusal is counted by reason.
    let (_, metrics) = anonymous.call(Method::GET, "/metrics", None, &[]).await?;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    let denied = |reason: &str| {
        metrics_text::sum(&metrics, "memos_http_denied_total", &[("reason", reason)]).unwrap_or(0.0)
    };
    assert!(denied("no_credential") >= 7.0, "{metrics}");
    assert!(denied("impersonation") >= 3.0);
    assert!(denied("not_own_namespace") >= 2.0);
    assert!(denied("read_only_role") >= 1.0);

    // Revoked while the API runs: refused from then on.
    let key_id = alice_key
        .trim_start_matches("memos_")
        .split('_')
        .next()
        .unwrap()
        .to_owned();
    memosctl_ok(
        &env,
        &["keys", "revoke", &key_id, "--reason", "test", "--by", "ops"],
    )?;
    eventually("the revoked key is refused", WAIT, || async {
        let (status, _) = alice
            .call(Method::GET, "/v1/agents/alice/inbox", None, &[])
            .await?;
        Ok((status == 401).then_some(()))
    })
    .await?;
    assert_eq!(
        bob.call(Method::GET, "/v1/tools", None, &[]).await?.0,
        200,
        "other keys still work"
    );
    env.cleanup().await;
    Ok(())
}

/// `http.auth = "none"` believes the headers, so it is refused anywhere but loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_authentication_is_refused_off_loopback() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let started = MemosProcess::start(
        &env,
        "api",
        &[("MEMOS__HTTP__AUTH", "none"), ("MEMOS__HTTP__BIND", "0.0.0.0:0")],
    )
    .await;
    let error = match started {
        Ok(_) => anyhow::bail!("memos started with auth none on 0.0.0.0"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("not a loopback address"), "{error}");
    env.cleanup().await;
    Ok(())
}

/// A team namespace: the agents granted it (`--namespace`) write and read it, by id, in
/// listings, histories and searches; an agent not granted it sees nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_granted_a_team_namespace_read_it_and_no_one_else_does() -> anyhow::Result<()> {
    use memos_integration_tests::api::Keyed;

    let env = TestEnv::new().await?;
    let team = ["--namespace", "team-x"];
    let alice = issue_key(&env, "alice", "agent", &team)?;
    let bob = issue_key(&env, "bob", "agent", &team)?;
    let carol = issue_key(&env, "carol", "agent", &[])?;
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__HTTP__AUTH", "keys")]).await?;
    let base = memos.url("");
    let (alice, bob, carol) = (
        Keyed::new(&base, Some(&alice)),
        Keyed::new(&base, Some(&bob)),
        Keyed::new(&base, Some(&carol)),
    );

    let body = json!({"agent_id": "team-x", "content": "the team's release checklist"});
    let accepted = alice.call(Method::POST, "/v1/memories", Some(body), &[]).await?;
    assert_eq!(
        accepted.status, 202,
        "alice writes the team namespace: {}",
        accepted.body
    );
    let id = accepted.body["memory_id"].as_str().unwrap().to_owned();
    let by_id = format!("/v1/memories/{id}");
    eventually("the team memory is projected", WAIT, || async {
        Ok((alice.call(Method::GET, &by_id, None, &[]).await?.status == 200).then_some(()))
    })
    .await?;

    let search = json!({"agent_id": "bob", "query": "release checklist"});
    let carol_search = json!({"agent_id": "carol", "query": "release checklist"});
    let history = format!("{by_id}/history");
    let listing = "/v1/agents/team-x/memories";
    for (who, client, sees, search) in [
        ("bob", &bob, true, &search),
        ("carol", &carol, false, &carol_search),
    ] {
        let answer = client.call(Method::GET, &by_id, None, &[]).await?;
        assert_eq!(
            answer.status,
            if sees { 200 } else { 404 },
            "{who} by id: {}",
            answer.body
        );
        let answer = client.call(Method::GET, &history, None, &[]).await?;
        assert_eq!(
            answer.status,
            if sees { 200 } else { 404 },
            "{who} history: {}",
            answer.body
        );
        let answer = client.call(Method::GET, listing, None, &[]).await?;
        assert_eq!(answer.status, 200, "{who} listing: {}", answer.body);
        let listed: Vec<&str> = answer.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["memory_id"].as_str())
            .collect();
        assert_eq!(listed == [id.as_str()], sees, "{who} lists {listed:?}");
        let answer = client
            .call(Method::POST, "/v1/memories/search", Some(search.clone()), &[])
            .await?;
        assert_eq!(answer.status, 200, "{who} search: {}", answer.body);
        let found = answer.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["memory_id"] == id.as_str());
        assert_eq!(found, sees, "{who} finds the team memory: {}", answer.body);
    }
    // Carol may not write it either.
    let body = json!({"agent_id": "team-x", "content": "carol's note"});
    let refused = carol.call(Method::POST, "/v1/memories", Some(body), &[]).await?;
    assert_eq!(refused.status, 403, "{}", refused.body);
    Ok(())
}
