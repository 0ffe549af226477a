//! The route walk: every route of the API's router, enumerated from
//! `memos_api::server::routes` (the table the router is built from, each route with its
//! policy), called against the running service with `http.auth = "keys"` as anonymous,
//! another agent, an auditor, the owner and a service granted the owner. Each answer must be
//! the one the route's policy says; a route without a case here fails the walk; every refusal
//! is counted in `memos_http_denied_total`; every accepted command is decided with the
//! authenticated actor in its audit trail.

use std::collections::BTreeMap;
use std::time::Duration;

use memos_api::server::{Policy, routes};
use memos_integration_tests::api::{Answer, Keyed};
use memos_integration_tests::process::issue_key;
use memos_integration_tests::{MemosProcess, TestEnv, eventually, metrics_text};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Anonymous,
    /// Another agent (bob), asking about alice's things.
    Other,
    Auditor,
    /// alice.
    Owner,
    /// A service granted alice (ingest).
    Service,
}

/// Refusals first, so that what the allowed callers change comes after.
const CALLERS: [Who; 5] = [Who::Anonymous, Who::Other, Who::Auditor, Who::Owner, Who::Service];

/// What alice owns before the walk.
struct Fixtures {
    memory: String,
    /// One memory per caller allowed to forget (so that each forgets one still there).
    forget_owner: String,
    forget_service: String,
    write_command: String,
    task: String,
    template: String,
    workflow: String,
}

impl Fixtures {
    /// Ids another agent must not learn anything about.
    fn private(&self) -> [&str; 5] {
        [
            &self.memory,
            &self.write_command,
            &self.task,
            &self.template,
            &self.workflow,
        ]
    }
}

/// One request of the walk.
struct Call {
    path: String,
    body: Option<Value>,
}

/// The request `who` sends for a route, or `None` when the walk has no case for it.
fn call_for(method: &Method, route: &str, who: Who, fx: &Fixtures, n: usize) -> Option<Call> {
    let unique = format!("walk-{n}-{}", Uuid::now_v7());
    let command = Uuid::now_v7().to_string();
    let (path, body) = match (method.as_str(), route) {
        (
            "GET",
            "/healthz" | "/readyz" | "/metrics" | "/v1/tools" | "/v1/agents" | "/v1/orchestrator/stats",
        ) => (route.to_owned(), None),
        ("POST", "/v1/memories") => (
            route.to_owned(),
            Some(
                json!({"agent_id": "alice", "content": format!("written in the walk {n}"), "command_id": command}),
            ),
        ),
        ("POST", "/v1/memories/search") => (
            route.to_owned(),
            Some(json!({"agent_id": "alice", "query": "walk"})),
        ),
        ("GET", "/v1/memories/{id}") => (format!("/v1/memories/{}", fx.memory), None),
        ("PATCH", "/v1/memories/{id}") => (
            format!("/v1/memories/{}", fx.memory),
            Some(
                json!({"agent_id": "alice", "content": format!("updated in the walk {n}"), "command_id": command}),
            ),
        ),
        ("POST", "/v1/memories/{id}/forget") => {
            let target = match who {
                Who::Owner => &fx.forget_owner,
                Who::Service => &fx.forget_service,
                _ => &fx.memory,
            };
            (
                format!("/v1/memories/{target}/forget"),
                Some(json!({"agent_id": "alice", "command_id": command})),
            )
        }
        ("GET", "/v1/memories/{id}/history") => (format!("/v1/memories/{}/history", fx.memory), None),
        ("GET", "/v1/agents/{agent}/memories") => ("/v1/agents/alice/memories".into(), None),
        ("GET", "/v1/agents/{agent}/recent") => ("/v1/agents/alice/recent".into(), None),
        ("POST", "/v1/shares" | "/v1/shares/revoke") => (
            route.to_owned(),
            Some(
                json!({"agent_id": "alice", "grantee": "carol", "memory_id": fx.memory, "command_id": command}),
            ),
        ),
        ("POST", "/v1/tools") => (
            route.to_owned(),
            Some(
                json!({"agent_id": "alice", "name": unique, "description": "a tool of the walk", "command_id": command}),
            ),
        ),
        ("GET", "/v1/commands/{id}") => (format!("/v1/commands/{}", fx.write_command), None),
        ("POST", "/v1/agents") => (
            route.to_owned(),
            Some(
                json!({"agent_id": "alice", "capabilities": ["walk"], "max_concurrent": 8, "command_id": command}),
            ),
        ),
        ("DELETE", "/v1/agents/{agent}") => ("/v1/agents/alice".into(), Some(json!({"command_id": command}))),
        ("POST", "/v1/agents/{agent}/heartbeat") => (
            "/v1/agents/alice/heartbeat".into(),
            Some(json!({"command_id": command})),
        ),
        ("GET", "/v1/agents/{agent}/inbox") => ("/v1/agents/alice/inbox".into(), None),
        ("POST", "/v1/tasks") => (
            route.to_owned(),
            Some(
                json!({"task_id": unique, "required_capabilities": ["nobody-has-it"], "command_id": command}),
            ),
        ),
        ("GET", "/v1/tasks") => ("/v1/tasks?agent_id=alice".into(), None),
        ("GET", "/v1/tasks/{id}") => (format!("/v1/tasks/{}", fx.task), None),
        ("POST", "/v1/tasks/{id}/start") => (
            format!("/v1/tasks/{}/start", fx.task),
            Some(json!({"agent_id": "alice", "command_id": command})),
        ),
        ("POST", "/v1/tasks/{id}/complete") => (
            format!("/v1/tasks/{}/complete", fx.task),
            Some(json!({"agent_id": "alice", "result": {"walk": n}, "command_id": command})),
        ),
        ("POST", "/v1/tasks/{id}/fail") => (
            format!("/v1/tasks/{}/fail", fx.task),
            Some(json!({"agent_id": "alice", "error": "walked", "command_id": command})),
        ),
        ("POST", "/v1/tasks/{id}/cancel") => (
            format!("/v1/tasks/{}/cancel", fx.task),
            Some(json!({"reason": "the walk", "command_id": command})),
        ),
        ("POST", "/v1/workflow-templates") => (
            route.to_owned(),
            Some(
                json!({"name": unique, "steps": [{"step_id": "a", "capability": "nobody-has-it"}], "command_id": command}),
            ),
        ),
        ("GET", "/v1/workflow-templates/{name}") => (format!("/v1/workflow-templates/{}", fx.template), None),
        ("POST", "/v1/workflows") => (
            route.to_owned(),
            Some(json!({"workflow_id": unique, "template": fx.template, "command_id": command})),
        ),
        ("GET", "/v1/workflows/{id}") => (format!("/v1/workflows/{}", fx.workflow), None),
        _ => return None,
    };
    Some(Call { path, body })
}

/// What the policy says `who` gets.
#[derive(Debug, PartialEq)]
enum Expect {
    Status(u16),
    /// Not told apart from absent: `404`, or a `200` that names none of alice's private ids.
    Hidden,
}

fn expected(policy: Policy, who: Who) -> Expect {
    use Expect::Status;
    match (policy, who) {
        (Policy::Open, _) => Status(200),
        (_, Who::Anonymous) => Status(401),
        (Policy::ActsForSubject | Policy::TaskIssuer, Who::Owner | Who::Service) => Status(202),
        (Policy::ActsForSubject | Policy::TaskIssuer, Who::Other | Who::Auditor) => Status(403),
        (Policy::AnyWriter, Who::Auditor) => Status(403),
        (Policy::AnyWriter, _) => Status(202),
        (Policy::AgentOwned, Who::Other) => Status(403),
        (Policy::Visible, Who::Other) => Expect::Hidden,
        (Policy::AgentOwned | Policy::Visible | Policy::AnyPrincipal, _) => Status(200),
    }
}

/// The actor an accepted command must be decided with.
fn actor(policy: Policy, who: Who) -> &'static str {
    match (policy, who) {
        (_, Who::Owner) => "alice",
        (_, Who::Other) => "bob",
        (Policy::ActsForSubject, Who::Service) => "alice via ingest",
        _ => "ingest",
    }
}

/// Commands change what later calls see: forgetting, cancelling and deregistering go last.
fn destructive(method: &Method, path: &str) -> bool {
    *method == Method::DELETE || path.ends_with("/cancel") || path.ends_with("/forget")
}

async fn accepted(answer: Answer, what: &str) -> anyhow::Result<Value> {
    anyhow::ensure!(answer.status == 202, "{what}: {} {}", answer.status, answer.body);
    Ok(answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_caller_as_its_policy_says() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let keys = [
        (Who::Other, issue_key(&env, "bob", "agent", &[])?),
        (Who::Auditor, issue_key(&env, "audit", "auditor", &[])?),
        (Who::Owner, issue_key(&env, "alice", "agent", &[])?),
        (
            Who::Service,
            issue_key(&env, "ingest", "service", &["--agent", "alice"])?,
        ),
    ];
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__HTTP__AUTH", "keys")]).await?;
    let base = memos.url("");
    let mut clients = BTreeMap::from([(Who::Anonymous, Keyed::new(&base, None))]);
    for (who, key) in &keys {
        clients.insert(*who, Keyed::new(&base, Some(key)));
    }
    let alice = &clients[&Who::Owner];
    let auditor = &clients[&Who::Auditor];

    // alice's things, projected before the walk.
    let write = |content: &str| json!({"agent_id": "alice", "content": content});
    let mut memories = Vec::new();
    for content in ["alice's private memory", "to forget", "to forget too"] {
        let body = accepted(
            alice
                .call(Method::POST, "/v1/memories", Some(write(content)), &[])
                .await?,
            "a fixture memory",
        )
        .await?;
        memories.push(body);
    }
    let registered = accepted(
        alice
            .call(
                Method::POST,
                "/v1/agents",
                Some(json!({"agent_id": "alice", "capabilities": ["walk"], "max_concurrent": 8})),
                &[],
            )
            .await?,
        "alice's registration",
    )
    .await?;
    let template = format!("walk-template-{}", Uuid::now_v7());
    let defined = accepted(
        alice
            .call(
                Method::POST,
                "/v1/workflow-templates",
                Some(json!({"name": template, "steps": [{"step_id": "a", "capability": "nobody-has-it"}]})),
                &[],
            )
            .await?,
        "the template",
    )
    .await?;
    let task = format!("walk-task-{}", Uuid::now_v7());
    let delegated = accepted(
        alice
            .call(
                Method::POST,
                "/v1/tasks",
                Some(json!({"task_id": task, "required_capabilities": ["walk"], "preferred_agent": "alice"})),
                &[],
            )
            .await?,
        "the task",
    )
    .await?;
    let task_commands = [&registered, &defined, &delegated]
        .iter()
        .map(|b| b["command_id"].as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(",");
    // The workflow needs its template decided first.
    eventually("alice's task commands are decided", WAIT, || async {
        let answer = alice
            .call(
                Method::GET,
                "/v1/agents/alice/inbox",
                None,
                &[("x-memos-command", &task_commands)],
            )
            .await?;
        Ok((answer.status == 200).then_some(()))
    })
    .await?;
    let workflow = format!("walk-workflow-{}", Uuid::now_v7());
    let started = accepted(
        alice
            .call(
                Method::POST,
                "/v1/workflows",
                Some(json!({"workflow_id": workflow, "template": template})),
                &[],
            )
            .await?,
        "the workflow",
    )
    .await?;
    let started_command = started["command_id"].as_str().unwrap_or_default().to_owned();
    eventually("the workflow is decided", WAIT, || async {
        let path = format!("/v1/workflows/{workflow}");
        let answer = alice
            .call(Method::GET, &path, None, &[("x-memos-command", &started_command)])
            .await?;
        Ok((answer.status == 200).then_some(()))
    })
    .await?;
    let last = memories
        .last()
        .and_then(|m| m["position"].as_str())
        .unwrap_or_default()
        .to_owned();
    for memory in &memories {
        let path = format!(
            "/v1/memories/{}",
            memory["memory_id"].as_str().unwrap_or_default()
        );
        let answer = alice
            .call(Method::GET, &path, None, &[("x-memos-position", &last)])
            .await?;
        anyhow::ensure!(
            answer.status == 200,
            "fixture memory: {} {}",
            answer.status,
            answer.body
        );
    }
    let id = |i: usize, field: &str| memories[i][field].as_str().unwrap_or_default().to_owned();
    let fx = Fixtures {
        memory: id(0, "memory_id"),
        forget_owner: id(1, "memory_id"),
        forget_service: id(2, "memory_id"),
        write_command: id(0, "command_id"),
        task,
        template,
        workflow,
    };

    // The walk.
    let mut table = routes();
    table.sort_by_key(|r| destructive(&r.method, &r.path));
    let mut unwalked = Vec::new();
    let mut wrong = Vec::new();
    let mut refusals = 0;
    let mut commands = Vec::new();
    let mut n = 0;
    for route in &table {
        for who in CALLERS {
            n += 1;
            let Some(call) = call_for(&route.method, &route.path, who, &fx, n) else {
                unwalked.push(format!("{} {}", route.method, route.path));
                break;
            };
            // A service names the agent it reads for; it acts for the body's or path's agent.
            let headers: &[(&str, &str)] = if who == Who::Service && route.method == Method::GET {
                &[("x-memos-agent", "alice")]
            } else {
                &[]
            };
            let answer = clients[&who]
                .call(route.method.clone(), &call.path, call.body.clone(), headers)
                .await?;
            let want = expected(route.policy, who);
            let text = answer.body.to_string();
            let right = match &want {
                Expect::Status(code) => answer.status == *code,
                Expect::Hidden => {
                    answer.status == 404
                        || (answer.status == 200 && fx.private().iter().all(|id| !text.contains(id)))
                }
            };
            if !right {
                wrong.push(format!(
                    "{} {} ({:?}) as {who:?}: want {want:?}, got {} {}",
                    route.method,
                    call.path,
                    route.policy,
                    answer.status,
                    text.chars().take(300).collect::<String>()
                ));
            }
            if [401, 403].contains(&answer.status) {
                refusals += 1;
                if answer.body["code"]
                    != if answer.status == 401 {
                        "unauthorized"
                    } else {
                        "forbidden"
                    }
                {
                    wrong.push(format!(
                        "{} {} as {who:?}: refusal without its JSON code: {text}",
                        route.method, call.path
                    ));
                }
            }
            if answer.status == 202
                && let Some(command) = answer.body["command_id"].as_str()
            {
                commands.push((
                    command.to_owned(),
                    actor(route.policy, who),
                    format!("{} {}", route.method, route.path),
                ));
            }
        }
    }
    anyhow::ensure!(
        unwalked.is_empty(),
        "routes the walk has no case for (add one to call_for, and check the route's policy): {unwalked:?}"
    );
    anyhow::ensure!(
        wrong.is_empty(),
        "answers other than the policy's:\n{}",
        wrong.join("\n")
    );

    // Every refusal is counted, once.
    let metrics = clients[&Who::Anonymous]
        .call(Method::GET, "/metrics", None, &[])
        .await?;
    let counted = metrics_text::sum(
        metrics.body.as_str().unwrap_or_default(),
        "memos_http_denied_total",
        &[],
    )
    .unwrap_or(0.0);
    assert_eq!(
        counted, refusals as f64,
        "memos_http_denied_total against the refusals answered"
    );

    // Every accepted command is decided with the authenticated actor.
    for (command, want, route) in &commands {
        let path = format!("/v1/commands/{command}");
        let decided = eventually(&format!("{route}'s command is decided"), WAIT, || async {
            let answer = auditor.call(Method::GET, &path, None, &[]).await?;
            Ok((answer.status == 200 && answer.body["status"] != "pending").then_some(answer.body))
        })
        .await?;
        let actors: Vec<&str> = match decided["events"].as_array() {
            Some(events) => events.iter().filter_map(|e| e["actor"].as_str()).collect(),
            None => decided["actor"].as_str().into_iter().collect(),
        };
        assert!(
            !actors.is_empty() && actors.iter().all(|a| a == want),
            "{route}: command {command} decided with actors {actors:?}, want {want}: {decided}"
        );
    }
    env.cleanup().await;
    Ok(())
}

/// `http.operations_bind`: `/metrics` and `/readyz` answer on their own address without a
/// key, and only there; `/healthz` on both; `/v1` only on the main address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_move_to_the_operations_address_when_one_is_set() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut memos = MemosProcess::start(
        &env,
        "api",
        &[
            ("MEMOS__HTTP__AUTH", "keys"),
            ("MEMOS__HTTP__OPERATIONS_BIND", "127.0.0.1:0"),
        ],
    )
    .await?;
    let line = memos.wait_for_log("operations endpoint listening", WAIT).await?;
    let line: Value = serde_json::from_str(&line)?;
    let operations = format!(
        "http://{}",
        line["fields"]["addr"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no addr in {line}"))?
    );
    let main = memos.url("");
    anyhow::ensure!(
        operations != main,
        "the operations address is the main one: {main}"
    );
    let status = |url: String| async move { anyhow::Ok(reqwest::get(url).await?.status().as_u16()) };

    assert_eq!(status(format!("{operations}/healthz")).await?, 200);
    assert_eq!(status(format!("{main}/healthz")).await?, 200);
    // Ready or degraded, but answered, and with no key.
    let ready = status(format!("{operations}/readyz")).await?;
    assert!(ready == 200 || ready == 503, "/readyz answered {ready}");
    let metrics = reqwest::get(format!("{operations}/metrics")).await?;
    assert_eq!(metrics.status().as_u16(), 200);
    assert!(metrics.text().await?.contains("memos_http_denied_total"));
    for path in ["/metrics", "/readyz"] {
        assert_eq!(
            status(format!("{main}{path}")).await?,
            404,
            "{path} on the main address"
        );
    }
    assert_eq!(
        status(format!("{operations}/v1/tools")).await?,
        404,
        "/v1 on the operations address"
    );
    assert_eq!(
        status(format!("{main}/v1/tools")).await?,
        401,
        "/v1 still needs a key"
    );
    Ok(())
}
