//! Who is asking: every `/v1` request is bound to a [`Caller`] before any handler runs.
//!
//! With `http.auth = "keys"` (the default) a request must carry `Authorization: Bearer <API
//! key>`; the key is checked against the key ring this process follows
//! (`memos_kafka::keys::follow`), and refused with `401` when it is missing, malformed,
//! unknown, revoked or expired. With `http.jwt` set, a bearer token that does not start with
//! `memos_` is verified as a JWT instead ([`crate::jwt`]: `401 expired_token`, `bad_token` or
//! `bad_role` when it is not valid); its `sub` is the principal. The principal then decides,
//! in one place each:
//! - the **actor and the subject of a command** ([`Caller::acting_for`], used by
//!   `commands::header` for every command): an agent acts only for itself (or a namespace it
//!   is granted), a service for the agents it is granted (recorded as `<agent> via
//!   <service>`), auditors and operators never; `X-Memos-Actor` is honoured only for
//!   services;
//! - the **reader of a query** ([`Caller::reader`], [`Caller::memory_reader`] adding an
//!   agent's team namespaces): an agent reads as itself, a service as
//!   the agent it names in `X-Memos-Agent` (one it is granted; a service granted every agent,
//!   `*`, reads everything without it), auditors and operators read everything;
//!   `X-Memos-Agent` naming anyone else is refused.
//!
//! Refusals are `401 unauthorized` or `403 forbidden` JSON errors, counted in
//! `memos_http_denied_total{reason}` and logged with the principal and what it asked for.
//! `http.auth = "none"` keeps the headers' word (a single-user laptop): the process refuses
//! to start with it on an address other than loopback.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use memos_kafka::keys::Followed;
use memos_postgres::queries::Reader;
use memos_runtime::keys::{self, Principal, Refusal, Role};
use memos_runtime::metrics as m;

use crate::error::ApiError;
use crate::jwt::JwtVerifier;

/// Header naming the agent a read is made for (services, and `auth = "none"`).
pub const AGENT_HEADER: &str = "x-memos-agent";
/// Header naming who issues a command (services, and `auth = "none"`).
pub const ACTOR_HEADER: &str = "x-memos-actor";

/// How requests are authenticated.
#[derive(Clone)]
pub enum Authenticator {
    /// Every request needs a key of this ring or, when `http.jwt` is set, a JWT `jwt` accepts.
    Keys {
        ring: Followed,
        jwt: Option<Arc<JwtVerifier>>,
    },
    /// The headers are believed (`http.auth = "none"`).
    None,
}

/// Who a request comes from.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `http.auth = "none"`: who the headers say.
    Unauthenticated,
    Principal(Arc<Principal>),
}

/// Every reason a refusal is counted under (`memos_http_denied_total{reason}`).
pub const DENIAL_REASONS: &[&str] = &[
    "no_credential",
    "malformed_key",
    "unknown_key",
    "revoked_key",
    "expired_key",
    "impersonation",
    "not_own_namespace",
    "not_granted",
    "read_only_role",
    "not_own_agent",
    "no_reader",
    "not_issuer",
    "expired_token",
    "bad_token",
    "bad_role",
];

/// A refusal, counted and logged.
pub fn deny(
    status: StatusCode,
    reason: &'static str,
    principal: Option<&str>,
    message: impl Into<String>,
) -> ApiError {
    let message = message.into();
    metrics::counter!(m::HTTP_DENIED, "reason" => reason).increment(1);
    tracing::warn!(reason, principal = principal.unwrap_or("-"), %message, "request refused");
    let code = if status == StatusCode::UNAUTHORIZED {
        "unauthorized"
    } else {
        "forbidden"
    };
    ApiError::new(status, code, message)
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request(format!("{name} is not text")).with_field(name))
        })
        .transpose()
}

/// Whether a task event or row is about `reader`: assigned to it (`agent`), or issued by it
/// or by a service for it (`actor`, `<reader> via <service>`).
pub fn involves(reader: &str, agent: Option<&str>, actor: Option<&str>) -> bool {
    agent == Some(reader)
        || actor.is_some_and(|a| {
            a == reader
                || a.strip_prefix(reader)
                    .is_some_and(|rest| rest.starts_with(" via "))
        })
}

/// The token of an `Authorization` value of the `Bearer` scheme; the scheme name is
/// case-insensitive (RFC 9110 section 11.1), and spaces may separate it from the token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The middleware: binds the request to its [`Caller`] or refuses it.
pub async fn authenticate(State(auth): State<Authenticator>, mut request: Request, next: Next) -> Response {
    let caller = match &auth {
        Authenticator::None => Caller::Unauthenticated,
        Authenticator::Keys { ring: followed, jwt } => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token);
            let Some(token) = presented else {
                return deny(
                    StatusCode::UNAUTHORIZED,
                    "no_credential",
                    None,
                    if jwt.is_some() {
                        "this API needs Authorization: Bearer <API key or JWT>"
                    } else {
                        "this API needs Authorization: Bearer <API key> (memosctl keys create)"
                    },
                )
                .into_response();
            };
            // API keys announce themselves by their prefix; any other token is a JWT.
            if let Some(jwt) = jwt.as_deref().filter(|_| !token.starts_with(keys::PREFIX)) {
                match jwt.verify(token) {
                    Ok(principal) => Caller::Principal(Arc::new(principal)),
                    Err(refusal) => {
                        return deny(
                            StatusCode::UNAUTHORIZED,
                            refusal.reason(),
                            refusal.subject(),
                            refusal.message(),
                        )
                        .into_response();
                    }
                }
            } else {
                let now = chrono::Utc::now().timestamp_millis();
                let verified = followed
                    .ring
                    .read()
                    .expect("key ring lock")
                    .verify(token, now)
                    .map(|(_, principal)| Arc::new(principal.clone()));
                match verified {
                    Ok(principal) => Caller::Principal(principal),
                    // A key issued a moment ago may not have been read yet at start.
                    Err(refusal @ Refusal::Unknown) if !followed.caught_up() => {
                        tracing::debug!(reason = refusal.as_str(), "key ring not read yet");
                        return ApiError::unavailable("the keys log has not been read yet; retry shortly")
                            .into_response();
                    }
                    Err(refusal) => {
                        return deny(
                            StatusCode::UNAUTHORIZED,
                            refusal.as_str(),
                            None,
                            "the API key is not valid (unknown, revoked or expired)",
                        )
                        .into_response();
                    }
                }
            }
        }
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("route without authentication", "no caller bound"))
    }
}

impl Caller {
    fn principal(&self) -> Option<&Principal> {
        match self {
            Caller::Unauthenticated => None,
            Caller::Principal(p) => Some(p),
        }
    }

    /// The name of the principal, for logs.
    pub fn name(&self) -> Option<&str> {
        self.principal().map(|p| p.name.as_str())
    }

    /// The actor of a command made for `subject` (the namespace or agent it acts on; `None`
    /// for commands that act for no agent: delegating, cancelling, templates, workflows).
    pub fn acting_for(&self, headers: &HeaderMap, subject: Option<&str>) -> Result<String, ApiError> {
        let claimed = header_text(headers, ACTOR_HEADER)?;
        let Some(principal) = self.principal() else {
            return Ok(claimed
                .map(str::to_owned)
                .unwrap_or_else(|| subject.unwrap_or("api").to_owned()));
        };
        let forbidden = |reason, message: String| {
            Err(deny(
                StatusCode::FORBIDDEN,
                reason,
                Some(&principal.name),
                message,
            ))
        };
        match principal.role {
            Role::Auditor | Role::Operator => forbidden(
                "read_only_role",
                format!("a {} key cannot issue commands", principal.role),
            ),
            Role::Agent => {
                if claimed.is_some_and(|c| c != principal.name) {
                    return forbidden(
                        "impersonation",
                        format!(
                            "X-Memos-Actor is for service keys; this key is agent {}",
                            principal.name
                        ),
                    );
                }
                match subject {
                    Some(s) if !principal.may_write(s) => forbidden(
                        "not_own_namespace",
                        format!("agent {} may not act for {s}", principal.name),
                    ),
                    _ => Ok(principal.name.clone()),
                }
            }
            Role::Service => {
                if let Some(agent) = claimed
                    && !principal.may_act_for(agent)
                {
                    return forbidden(
                        "not_granted",
                        format!("service {} may not act for {agent}", principal.name),
                    );
                }
                if let Some(subject) = subject
                    && !principal.may_write(subject)
                {
                    return forbidden(
                        "not_granted",
                        format!("service {} may not act for {subject}", principal.name),
                    );
                }
                Ok(match claimed.or(subject) {
                    Some(agent) => format!("{agent} via {}", principal.name),
                    None => principal.name.clone(),
                })
            }
        }
    }

    /// The agent a query reads as: `None` reads everything (auditors, operators, and
    /// `auth = "none"` without `X-Memos-Agent`).
    pub fn reader(&self, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
        self.reader_for(headers, None)
    }

    /// [`Caller::reader`] of a query about `agent` (named in its path, query or body): a
    /// service that names no reader reads as that agent, if it is granted it.
    pub fn reader_for(&self, headers: &HeaderMap, agent: Option<&str>) -> Result<Option<String>, ApiError> {
        let named = header_text(headers, AGENT_HEADER)?;
        let named = match (&self.principal().map(|p| p.role), named) {
            (Some(Role::Service), None) => agent,
            (_, named) => named,
        };
        let Some(principal) = self.principal() else {
            return Ok(named.map(str::to_owned));
        };
        match principal.role {
            Role::Auditor | Role::Operator => Ok(named.map(str::to_owned)),
            Role::Agent => match named {
                Some(n) if n != principal.name => Err(deny(
                    StatusCode::FORBIDDEN,
                    "impersonation",
                    Some(&principal.name),
                    format!(
                        "X-Memos-Agent is for service keys; this key is agent {}",
                        principal.name
                    ),
                )),
                _ => Ok(Some(principal.name.clone())),
            },
            Role::Service => match named {
                Some(n) if principal.may_act_for(n) => Ok(Some(n.to_owned())),
                Some(n) => Err(deny(
                    StatusCode::FORBIDDEN,
                    "not_granted",
                    Some(&principal.name),
                    format!("service {} may not read for {n}", principal.name),
                )),
                // Granted every agent, it may read as any of them: as all of them at once.
                None if principal.agents.contains("*") => Ok(None),
                None => Err(deny(
                    StatusCode::FORBIDDEN,
                    "no_reader",
                    Some(&principal.name),
                    "a service reads for an agent: name it in X-Memos-Agent",
                )),
            },
        }
    }

    /// The [`Reader`] of a memory query about `agent` ([`Caller::reader_for`]): an agent
    /// reading as itself also reads the team namespaces it is granted; a service reads as
    /// the agent it is for, without the service's own grants.
    pub fn memory_reader(
        &self,
        headers: &HeaderMap,
        agent: Option<&str>,
    ) -> Result<Option<Reader>, ApiError> {
        let reader = self.reader_for(headers, agent)?;
        Ok(reader.map(|name| match self.principal() {
            Some(p) if p.role == Role::Agent && p.name == name => {
                Reader::with_namespaces(name, p.namespaces.iter().cloned())
            }
            _ => Reader::agent(name),
        }))
    }

    /// Refuses unless the caller may read what belongs to `agent` (an inbox, an agent's
    /// listing): the agent itself, a service granted it, an auditor or operator.
    pub fn may_read_agent(&self, headers: &HeaderMap, agent: &str) -> Result<(), ApiError> {
        match self.reader_for(headers, Some(agent))? {
            Some(reader) if reader != agent => Err(deny(
                StatusCode::FORBIDDEN,
                "not_own_agent",
                self.name(),
                format!("{reader} may not read what belongs to agent {agent}"),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses unless the caller may cancel a task whose delegation (or workflow) was issued
    /// by one of `issuers` (their actors): one of them itself, or a service granted the
    /// agent it issued for. Auditors and operators issue no command ([`Caller::acting_for`]
    /// refuses them first).
    pub fn may_cancel(
        &self,
        headers: &HeaderMap,
        task_id: &str,
        issuers: &[Option<&str>],
    ) -> Result<(), ApiError> {
        let Some(principal) = self.principal() else {
            return Ok(());
        };
        let for_agent = header_text(headers, ACTOR_HEADER)?;
        // A service granted every agent acts for whoever issued it, recorded or not.
        let everyone = principal.role == Role::Service && principal.agents.contains("*");
        let allowed = everyone
            || issuers.iter().flatten().any(|issuer| {
                // `<agent> via <service>` was issued for the agent.
                let agent = issuer.split_once(" via ").map_or(*issuer, |(agent, _)| agent);
                match principal.role {
                    Role::Agent => agent == principal.name,
                    Role::Service => {
                        *issuer == principal.name
                            || principal.may_act_for(agent) && for_agent.is_none_or(|a| a == agent)
                    }
                    Role::Auditor | Role::Operator => false,
                }
            });
        if allowed {
            Ok(())
        } else {
            Err(deny(
                StatusCode::FORBIDDEN,
                "not_issuer",
                Some(&principal.name),
                format!(
                    "{} may not cancel task {task_id}: only whoever delegated it or started its workflow may",
                    principal.name
                ),
            ))
        }
    }

    /// Whether the caller may write `namespace` (with `auth = "none"`, anyone may).
    pub fn may_write(&self, namespace: &str) -> bool {
        self.principal().is_none_or(|p| p.may_write(namespace))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::http::HeaderValue;

    use super::*;

    fn caller(name: &str, role: Role, agents: &[&str]) -> Caller {
        Caller::Principal(Arc::new(Principal {
            name: name.into(),
            role,
            namespaces: ["team".to_owned()].into(),
            agents: agents.iter().map(|a| a.to_string()).collect::<BTreeSet<_>>(),
        }))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_actor_comes_from_the_key_and_headers_only_serve_services() {
        let alice = caller("alice", Role::Agent, &[]);
        assert_eq!(alice.acting_for(&headers(&[]), Some("alice")).unwrap(), "alice");
        assert_eq!(alice.acting_for(&headers(&[]), Some("team")).unwrap(), "alice");
        assert_eq!(
            alice.acting_for(&headers(&[]), Some("bob")).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        let root = headers(&[(ACTOR_HEADER, "root")]);
        assert_eq!(
            alice.acting_for(&root, Some("alice")).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(alice.reader(&headers(&[])).unwrap().as_deref(), Some("alice"));
        let as_bob = headers(&[(AGENT_HEADER, "bob")]);
        assert_eq!(alice.reader(&as_bob).unwrap_err().status, StatusCode::FORBIDDEN);

        let ingest = caller("ingest", Role::Service, &["bob"]);
        assert_eq!(
            ingest.acting_for(&headers(&[]), Some("bob")).unwrap(),
            "bob via ingest"
        );
        assert_eq!(
            ingest
                .acting_for(&headers(&[]), Some("alice"))
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(ingest.reader(&as_bob).unwrap().as_deref(), Some("bob"));
        assert!(
            ingest.reader(&headers(&[])).is_err(),
            "a service names whom it reads for"
        );

        let auditor = caller("audit", Role::Auditor, &[]);
        assert_eq!(auditor.reader(&headers(&[])).unwrap(), None, "reads everything");
        assert!(auditor.acting_for(&headers(&[]), Some("audit")).is_err());

        assert!(involves("alice", Some("alice"), None));
        assert!(involves("alice", None, Some("alice via ingest")));
        assert!(!involves("alice", Some("bob"), Some("alicia via ingest")));
        assert!(!involves("ali", None, Some("alice via ingest")));

        // A service reads as the agent a query is about when it names none.
        assert_eq!(
            ingest.reader_for(&headers(&[]), Some("bob")).unwrap().as_deref(),
            Some("bob")
        );
        assert!(ingest.reader_for(&headers(&[]), Some("alice")).is_err());
        assert!(ingest.may_read_agent(&headers(&[]), "bob").is_ok());
        assert!(alice.may_read_agent(&headers(&[]), "bob").is_err());

        // Cancelling: whoever delegated (or started the workflow), or a service for it.
        let none = headers(&[]);
        assert!(alice.may_cancel(&none, "t", &[Some("alice"), None]).is_ok());
        assert!(
            alice
                .may_cancel(&none, "t", &[Some("bob"), Some("alice via ingest")])
                .is_ok()
        );
        assert!(alice.may_cancel(&none, "t", &[Some("bob"), None]).is_err());
        assert!(alice.may_cancel(&none, "t", &[None, None]).is_err());
        assert!(ingest.may_cancel(&none, "t", &[Some("bob")]).is_ok());
        assert!(ingest.may_cancel(&none, "t", &[Some("ingest")]).is_ok());
        assert!(ingest.may_cancel(&none, "t", &[Some("alice")]).is_err());
        let for_carol = headers(&[(ACTOR_HEADER, "carol")]);
        assert!(ingest.may_cancel(&for_carol, "t", &[Some("bob")]).is_err());
        assert!(auditor.may_cancel(&none, "t", &[Some("audit")]).is_err());
        let all = Caller::Principal(Arc::new(Principal {
            name: "dev".into(),
            role: Role::Service,
            namespaces: Default::default(),
            agents: ["*".to_owned()].into(),
        }));
        assert!(all.may_cancel(&none, "t", &[None, None]).is_ok());

        let open = Caller::Unauthenticated;
        assert_eq!(open.acting_for(&root, Some("alice")).unwrap(), "root");
        assert_eq!(open.reader(&as_bob).unwrap().as_deref(), Some("bob"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        for value in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR   s3cret",
        ] {
            assert_eq!(bearer_token(value), Some("s3cret"), "{value}");
        }
        for value in ["Basic s3cret", "Bearer", "Bearer ", "Bearers3cret", "s3cret"] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }
}
