//! A small client for the memOS HTTP API, for tests.

use std::time::Duration;

use serde_json::{Value, json};

use crate::eventually;

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

/// An answer: status code, JSON body and the `Retry-After` header, if any.
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    async fn answer(response: reqwest::Response) -> anyhow::Result<Answer> {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    /// POST a JSON body, optionally as `actor` (X-Memos-Actor).
    pub async fn post(&self, path: &str, body: Value, actor: Option<&str>) -> anyhow::Result<Answer> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(actor) = actor {
            request = request.header("x-memos-actor", actor);
        }
        Self::answer(request.send().await?).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> anyhow::Result<Answer> {
        Self::answer(
            self.http
                .patch(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await?,
        )
        .await
    }

    /// GET as `reader` (X-Memos-Agent), after `position` (X-Memos-Position) when given.
    pub async fn get(
        &self,
        path: &str,
        reader: Option<&str>,
        position: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(reader) = reader {
            request = request.header("x-memos-agent", reader);
        }
        if let Some(position) = position {
            request = request.header("x-memos-position", position);
        }
        Self::answer(request.send().await?).await
    }

    /// Writes a memory and returns the 202 body (command_id, memory_id, position, ...).
    pub async fn write(&self, agent: &str, content: &str, extra: Value) -> anyhow::Result<Value> {
        let mut body = json!({"agent_id": agent, "content": content});
        if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
            map.extend(more);
        }
        let answer = self.post("/v1/memories", body, None).await?;
        anyhow::ensure!(
            answer.status == 202,
            "write answered {}: {}",
            answer.status,
            answer.body
        );
        Ok(answer.body)
    }

    /// Waits until the projector decided `command_id`; returns the status body.
    pub async fn decided(&self, command_id: &str) -> anyhow::Result<Value> {
        eventually("the command to be decided", Duration::from_secs(60), || async {
            let answer = self
                .get(&format!("/v1/commands/{command_id}"), None, None)
                .await?;
            anyhow::ensure!(answer.status == 200, "status answered {}", answer.status);
            Ok((answer.body["status"] != "pending").then_some(answer.body))
        })
        .await
    }
}

/// A caller of the API with an API key (or none: anonymous).
#[derive(Clone)]
pub struct Keyed {
    pub http: reqwest::Client,
    pub base: String,
    pub key: Option<String>,
}

impl Keyed {
    pub fn new(base: &str, key: Option<&str>) -> Keyed {
        Keyed {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            key: key.map(str::to_owned),
        }
    }

    /// Sends `method path` with the key as a bearer token, `headers` and a JSON `body`.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        Api::answer(request.send().await?).await
    }
}
