//! JWT bearer tokens against the running service (`http.jwt` besides API keys): a token of
//! the identity provider writes as its `sub`; an agent's token cannot impersonate; expired,
//! forged, unsigned, confused-algorithm and role-less tokens are refused with `401`, counted
//! by reason and never logged; an API key still works next to them; a key added to or
//! withdrawn from the JWKS file takes effect on the running API.
//!
//! The identity provider's keys are fixed test keys, `integration-tests/fixtures/jwt/`
//! (generated once with openssl); the JWKS file is written by the test into a directory of
//! its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use memos_integration_tests::metrics_text;
use memos_integration_tests::process::issue_key;
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const ISSUER: &str = "https://idp.memos.test";
const AUDIENCE: &str = "memos-e2e";
const SIGNER_KEY: &str = include_str!("../../fixtures/jwt/rsa-signer.key.pem");
const SIGNER_PUB: &str = include_str!("../../fixtures/jwt/rsa-signer.pub.pem");
const OTHER_KEY: &str = include_str!("../../fixtures/jwt/rsa-other.key.pem");

fn jwk(kid: &str, private_pem: &str) -> Value {
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("fixture key");
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).expect("public part");
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).expect("JWK as JSON")
}

/// Replaces the JWKS file whole (write, then rename), as a deployment tool would, so the API
/// never reads half a file.
fn write_jwks(path: &Path, keys: &[Value]) -> anyhow::Result<()> {
    let staged = path.with_extension("tmp");
    std::fs::write(&staged, json!({ "keys": keys }).to_string())?;
    std::fs::rename(&staged, path)?;
    Ok(())
}

fn token(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

struct Idp {
    signer: EncodingKey,
    other: EncodingKey,
}

impl Idp {
    fn claims(sub: &str, role: &str, expires_in: i64) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({
            "sub": sub, "iss": ISSUER, "aud": AUDIENCE,
            "iat": now, "exp": now + expires_in,
            "memos_role": role,
        })
    }

    fn agent(&self, sub: &str) -> String {
        token(
            Algorithm::RS256,
            "idp-1",
            &self.signer,
            &Self::claims(sub, "agent", 300),
        )
    }
}

async fn call(
    http: &reqwest::Client,
    memos: &MemosProcess,
    bearer: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, Value)> {
    let mut request = http.request(method, memos.url(path));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
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

fn temp_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("memos-it-jwt-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn jwt_env(jwks: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("MEMOS__HTTP__AUTH", "keys".into()),
        ("MEMOS__HTTP__JWT__ALGORITHMS", "[RS256]".into()),
        ("MEMOS__HTTP__JWT__JWKS_FILE", jwks.display().to_string()),
        ("MEMOS__HTTP__JWT__ISSUER", ISSUER.into()),
        ("MEMOS__HTTP__JWT__AUDIENCE", AUDIENCE.into()),
        ("MEMOS__HTTP__JWT__JWKS_REFRESH", "200ms".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_is_its_subjects_principal_and_bad_tokens_are_refused_and_counted() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let dir = temp_dir()?;
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[jwk("idp-1", SIGNER_KEY)])?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let alice = format!("jwt-alice-{}", &run[..8]);
    let bob = format!("jwt-bob-{}", &run[..8]);
    let bob_key = issue_key(&env, &bob, "agent", &[])?;
    let extra = jwt_env(&jwks);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let memos = MemosProcess::start(&env, "all", &extra).await?;
    let http = reqwest::Client::new();
    let idp = Idp {
        signer: EncodingKey::from_rsa_pem(SIGNER_KEY.as_bytes())?,
        other: EncodingKey::from_rsa_pem(OTHER_KEY.as_bytes())?,
    };
    let metrics = || async {
        let (_, text) = call(&http, &memos, None, Method::GET, "/metrics", None, &[]).await?;
        anyhow::Ok(text.as_str().unwrap_or_default().to_owned())
    };
    let denied = |text: &str, reason: &str| {
        metrics_text::sum(text, "memos_http_denied_total", &[("reason", reason)]).unwrap_or(0.0)
    };
    let before = metrics().await?;
    let mut presented = Vec::new();

    // A valid token writes as its subject: the decided command's actor is `sub`.
    let alice_token = idp.agent(&alice);
    presented.push(alice_token.clone());
    let write = |agent: &str| Some(json!({"agent_id": agent, "content": format!("a memory of {agent}")}));
    let (status, accepted) = call(
        &http,
        &memos,
        Some(&alice_token),
        Method::POST,
        "/v1/memories",
        write(&alice),
        &[],
    )
    .await?;
    assert_eq!(status, 202, "{accepted}");
    let status_path = format!("/v1/commands/{}", accepted["command_id"].as_str().unwrap());
    let memory = format!("/v1/memories/{}", accepted["memory_id"].as_str().unwrap());
    let decided = eventually("the write is decided", WAIT, || async {
        let (status, body) = call(
            &http,
            &memos,
            Some(&alice_token),
            Method::GET,
            &status_path,
            None,
            &[],
        )
        .await?;
        Ok((status == 200 && body["status"] == "applied").then_some(body))
    })
    .await?;
    assert_eq!(decided["actor"], alice.as_str(), "the actor is the token's sub");
    let (status, _) = call(&http, &memos, Some(&alice_token), Method::GET, &memory, None, &[]).await?;
    assert_eq!(status, 200, "the owner reads its memory");

    // An agent's token cannot impersonate: another agent_id, X-Memos-Agent, X-Memos-Actor.
    for (method, path, body, headers) in [
        (Method::POST, "/v1/memories", write(&bob), vec![]),
        (
            Method::GET,
            memory.as_str(),
            None,
            vec![("x-memos-agent", bob.as_str())],
        ),
        (
            Method::POST,
            "/v1/memories",
            write(&alice),
            vec![("x-memos-actor", bob.as_str())],
        ),
    ] {
        let (status, body) = call(&http, &memos, Some(&alice_token), method, path, body, &headers).await?;
        assert_eq!(status, 403, "{path} {headers:?}: {body}");
        assert_eq!(body["code"], "forbidden");
    }
    // And bob's API key works next to JWTs, reading as bob (alice's memory is absent to it).
    let (status, _) = call(&http, &memos, Some(&bob_key), Method::GET, &memory, None, &[]).await?;
    assert_eq!(status, 404);
    let (status, _) = call(&http, &memos, Some(&bob_key), Method::GET, "/v1/tools", None, &[]).await?;
    assert_eq!(status, 200, "an API key still works");

    // Refused with 401, each under its reason.
    let expired = token(
        Algorithm::RS256,
        "idp-1",
        &idp.signer,
        &Idp::claims(&alice, "agent", -120),
    );
    let forged = token(
        Algorithm::RS256,
        "idp-1",
        &idp.other,
        &Idp::claims(&alice, "agent", 300),
    );
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!(
        "{}.{}.",
        part(&json!({"alg": "none", "typ": "JWT", "kid": "idp-1"})),
        part(&Idp::claims(&alice, "operator", 300))
    );
    // The classic confusion: HS256 with the RSA public key, which anyone has, as the secret.
    let confused = token(
        Algorithm::HS256,
        "idp-1",
        &EncodingKey::from_secret(SIGNER_PUB.as_bytes())?,
        &Idp::claims(&alice, "operator", 300),
    );
    let role_less = token(
        Algorithm::RS256,
        "idp-1",
        &idp.signer,
        &Idp::claims(&alice, "superuser", 300),
    );
    let mut wrong_audience = Idp::claims(&alice, "agent", 300);
    wrong_audience["aud"] = json!("another-api");
    let wrong_audience = token(Algorithm::RS256, "idp-1", &idp.signer, &wrong_audience);
    let cases = [
        ("expired", &expired, "expired_token"),
        ("signed by another key", &forged, "bad_token"),
        ("alg none", &unsigned, "bad_token"),
        ("HS256 with the public key", &confused, "bad_token"),
        ("another audience", &wrong_audience, "bad_token"),
        ("no memOS role", &role_less, "bad_role"),
    ];
    for (what, bad, _) in &cases {
        presented.push((*bad).clone());
        let (status, body) = call(
            &http,
            &memos,
            Some(bad),
            Method::POST,
            "/v1/memories",
            write(&alice),
            &[],
        )
        .await?;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["code"], "unauthorized", "{what}");
        assert!(
            !body.to_string().contains(bad.as_str()),
            "{what}: the answer echoes the token"
        );
    }
    let after = metrics().await?;
    for reason in ["expired_token", "bad_token", "bad_role"] {
        let expected = cases.iter().filter(|(_, _, r)| *r == reason).count() as f64;
        assert_eq!(
            denied(&after, reason) - denied(&before, reason),
            expected,
            "{reason}: {after}"
        );
    }
    // A `memos_` token is an API key, whatever JWTs are accepted.
    let (status, _) = call(
        &http,
        &memos,
        Some("memos_notakey"),
        Method::GET,
        "/v1/tools",
        None,
        &[],
    )
    .await?;
    assert_eq!(status, 401);
    let keyed = metrics().await?;
    assert_eq!(
        denied(&keyed, "malformed_key") - denied(&after, "malformed_key"),
        1.0
    );
    assert_eq!(denied(&keyed, "bad_token"), denied(&after, "bad_token"));

    // Rotation: a new key is accepted once it is in the file, an old one refused once it is
    // withdrawn, without a restart.
    let rotated = token(
        Algorithm::RS256,
        "idp-2",
        &idp.other,
        &Idp::claims(&alice, "agent", 300),
    );
    presented.push(rotated.clone());
    let tools = |bearer: String| {
        let http = &http;
        let memos = &memos;
        async move {
            anyhow::Ok(
                call(http, memos, Some(&bearer), Method::GET, "/v1/tools", None, &[])
                    .await?
                    .0,
            )
        }
    };
    assert_eq!(tools(rotated.clone()).await?, 401, "idp-2 is not published yet");
    write_jwks(&jwks, &[jwk("idp-1", SIGNER_KEY), jwk("idp-2", OTHER_KEY)])?;
    eventually("the added key is accepted", WAIT, || async {
        Ok((tools(rotated.clone()).await? == 200).then_some(()))
    })
    .await?;
    assert_eq!(tools(alice_token.clone()).await?, 200, "both keys are in force");
    write_jwks(&jwks, &[jwk("idp-2", OTHER_KEY)])?;
    eventually("the withdrawn key is refused", WAIT, || async {
        Ok((tools(alice_token.clone()).await? == 401).then_some(()))
    })
    .await?;
    assert_eq!(tools(rotated.clone()).await?, 200);
    // A broken file leaves the keys in force, and is counted.
    std::fs::write(&jwks, "{ not a JWKS")?;
    let failed = |text: &str| {
        metrics_text::sum(text, "memos_jwt_jwks_reloads_total", &[("outcome", "failed")]).unwrap_or(0.0)
    };
    eventually("the broken file is counted", WAIT, || async {
        Ok((failed(&metrics().await?) > 0.0).then_some(()))
    })
    .await?;
    assert_eq!(tools(rotated.clone()).await?, 200, "the keys read before stay");

    // No token reaches the log, accepted or refused.
    let log = memos.log_text();
    for token in &presented {
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(
            !log.contains(token.as_str()) && (signature.is_empty() || !log.contains(signature)),
            "a token is in the log"
        );
    }
    assert!(log.contains("request refused"), "refusals are logged");
    drop(memos);
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
    Ok(())
}

/// A JWT configuration that cannot be right stops the process at start, saying why: keys
/// that do not fit the algorithms, or JWTs with `http.auth = "none"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_configuration_that_does_not_fit_its_keys_is_refused_at_start() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let dir = temp_dir()?;
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[jwk("idp-1", SIGNER_KEY)])?;
    let mut extra = jwt_env(&jwks);
    extra.retain(|(k, _)| *k != "MEMOS__HTTP__JWT__ALGORITHMS");
    extra.push(("MEMOS__HTTP__JWT__ALGORITHMS", "[ES256]".into()));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let error = match MemosProcess::start(&env, "api", &extra).await {
        Ok(_) => anyhow::bail!("memos started with an RSA JWKS for ES256"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("holds no usable key"), "{error}");

    // JWTs with `auth = "none"` would be a credential nobody checks.
    let mut extra = jwt_env(&jwks);
    extra.retain(|(k, _)| *k != "MEMOS__HTTP__AUTH");
    extra.push(("MEMOS__HTTP__AUTH", "none".into()));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let error = match MemosProcess::start(&env, "api", &extra).await {
        Ok(_) => anyhow::bail!("memos started with http.jwt and auth none"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("checks no credential"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
    Ok(())
}
