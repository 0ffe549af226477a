//! JWT bearer tokens: the second way into `/v1`, for shops with an identity provider.
//!
//! Guarantees, for every token [`JwtVerifier::verify`] accepts:
//! - It is signed, with one of the pinned `http.jwt.algorithms`, by a key this process was
//!   configured with (the JWKS file, chosen by the token's `kid`; one PEM public key; or the
//!   HMAC secret). The token cannot choose how it is checked: `alg: none` cannot be
//!   configured, the algorithms are all of one family (checked at start, so an RSA public key
//!   is never used as an HMAC secret), a JWKS key is used only for its own family, curve and
//!   `alg`, and keys a token carries itself (`jwk`, `jku`, `x5u` headers) are never used.
//! - Its `exp` has not passed, its `nbf` (when present) has come, both within `leeway`; its
//!   `iss` is the configured issuer and its `aud` names the configured audience; all of
//!   `exp`, `iss`, `aud` and `sub` are present.
//! - Its principal is `sub` (a valid name without ` via `, which would read as a service's
//!   actor) with exactly one role from the role claim; a token without one is refused, never
//!   given a default role. Namespaces and agents come only from their claims.
//!
//! Refusals are [`Refusal`]s: `expired_token`, `bad_token` (signature, algorithm, key,
//! issuer, audience, form) or `bad_role`. Their messages never contain the token.
//!
//! There is no revocation list: a token lives until its `exp`. Keys are rotated (or a
//! compromised one withdrawn) in the JWKS file, which [`JwtVerifier::spawn_refresh`] re-reads
//! every `jwks_refresh`; a file that cannot be read or holds no usable key leaves the keys
//! read before in force, and is logged and counted.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use memos_runtime::config::{JwtAlgorithm, JwtConfig};
use memos_runtime::keys::{Principal, Role};
use memos_runtime::metrics as m;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

/// Why a token was refused; [`Refusal::reason`] is its `memos_http_denied_total` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Signed and well-formed, but past its `exp` (beyond the leeway).
    Expired,
    /// Not a token of this API: form, algorithm, key, signature, issuer, audience, claims.
    BadToken(String),
    /// A valid token of `sub` whose role claim names no role, or more than one.
    BadRole { subject: String, message: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Expired => "expired_token",
            Refusal::BadToken(_) => "bad_token",
            Refusal::BadRole { .. } => "bad_role",
        }
    }

    /// What the client is told (never the token itself).
    pub fn message(&self) -> String {
        match self {
            Refusal::Expired => "the JWT has expired".into(),
            Refusal::BadToken(why) => format!("the JWT is not valid: {why}"),
            Refusal::BadRole { message, .. } => message.clone(),
        }
    }

    /// The token's verified subject, when the refusal came after its signature was checked.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Refusal::BadRole { subject, .. } => Some(subject),
            _ => None,
        }
    }
}

fn bad(why: impl Into<String>) -> Refusal {
    Refusal::BadToken(why.into())
}

/// A key a token may be checked with, and the one algorithm it is for when its JWK says so.
struct VerifyingKey {
    key: DecodingKey,
    algorithm: Option<Algorithm>,
}

enum Keys {
    /// `key_file` or `secret`: every token is checked with it.
    One(VerifyingKey),
    /// `jwks_file`: by `kid`, replaced whole on each successful re-read.
    Jwks {
        path: PathBuf,
        by_kid: RwLock<Arc<HashMap<String, VerifyingKey>>>,
    },
}

/// Exports `memos_jwt_jwks_reloads_total` from zero, JWT configured or not, so that a
/// failure is an increase a rule can see from the first one.
pub fn export_metrics() {
    for outcome in ["loaded", "failed"] {
        metrics::counter!(m::JWT_JWKS_RELOADS, "outcome" => outcome).increment(0);
    }
}

/// Names of the claims a principal is read from.
struct ClaimNames {
    role: String,
    namespaces: String,
    agents: String,
}

/// Verifies JWTs as `http.jwt` says (see the module documentation).
pub struct JwtVerifier {
    validation: Validation,
    family: AlgorithmFamily,
    keys: Keys,
    claims: ClaimNames,
    refresh: Duration,
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::HS384 => Algorithm::HS384,
        JwtAlgorithm::HS512 => Algorithm::HS512,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

fn family_name(family: AlgorithmFamily) -> &'static str {
    match family {
        AlgorithmFamily::Hmac => "HMAC",
        AlgorithmFamily::Rsa => "RSA",
        AlgorithmFamily::Ec => "EC",
        AlgorithmFamily::Ed => "EdDSA",
    }
}

impl JwtVerifier {
    /// Checks `http.jwt` and reads its keys; every error says which setting is wrong.
    pub fn from_config(config: &JwtConfig) -> anyhow::Result<JwtVerifier> {
        let mut algorithms: Vec<Algorithm> = Vec::new();
        for a in config.algorithms.iter().copied().map(algorithm) {
            if !algorithms.contains(&a) {
                algorithms.push(a);
            }
        }
        let Some(&first) = algorithms.first() else {
            bail!(
                "http.jwt.algorithms is empty: pin the algorithms your identity provider signs with, e.g. [\"RS256\"]"
            );
        };
        let family = first.family();
        if let Some(other) = algorithms.iter().find(|a| a.family() != family) {
            bail!(
                "http.jwt.algorithms mixes {first:?} and {other:?}: pin algorithms of one family, so that no token can choose how it is checked"
            );
        }
        ensure!(!config.issuer.trim().is_empty(), "http.jwt.issuer is empty");
        ensure!(!config.audience.trim().is_empty(), "http.jwt.audience is empty");
        for (setting, name) in [
            ("roles_claim", &config.roles_claim),
            ("namespaces_claim", &config.namespaces_claim),
            ("agents_claim", &config.agents_claim),
        ] {
            ensure!(!name.trim().is_empty(), "http.jwt.{setting} is empty");
        }
        ensure!(
            !config.jwks_refresh.is_zero(),
            "http.jwt.jwks_refresh must be more than 0s"
        );

        let sources = [
            config.jwks_file.as_ref().map(|_| "jwks_file"),
            config.key_file.as_ref().map(|_| "key_file"),
            config.secret.as_ref().map(|_| "secret"),
        ];
        let sources: Vec<&str> = sources.into_iter().flatten().collect();
        ensure!(
            sources.len() == 1,
            "http.jwt needs exactly one of jwks_file, key_file and secret; {}",
            if sources.is_empty() {
                "none is set".to_owned()
            } else {
                format!("{} are set", sources.join(" and "))
            }
        );
        let pinned = || format!("{algorithms:?}");
        let keys = if let Some(secret) = &config.secret {
            ensure!(
                family == AlgorithmFamily::Hmac,
                "http.jwt.secret is an HMAC key, but algorithms {} are {}: use key_file or jwks_file for them",
                pinned(),
                family_name(family)
            );
            // RFC 7518 section 3.2: a key at least as long as the hash output.
            let needed = algorithms
                .iter()
                .map(|a| match a {
                    Algorithm::HS384 => 48,
                    Algorithm::HS512 => 64,
                    _ => 32,
                })
                .max()
                .unwrap_or(32);
            ensure!(
                secret.expose().len() >= needed,
                "http.jwt.secret is {} bytes; {} need at least {needed}",
                secret.expose().len(),
                pinned()
            );
            let key = DecodingKey::from_secret(secret.expose().as_bytes()).context("http.jwt.secret")?;
            Keys::One(VerifyingKey { key, algorithm: None })
        } else {
            ensure!(
                family != AlgorithmFamily::Hmac,
                "algorithms {} are HMAC: their key is http.jwt.secret, not a public key file",
                pinned()
            );
            if let Some(path) = &config.key_file {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read http.jwt.key_file {}", path.display()))?;
                let text = String::from_utf8_lossy(&pem);
                ensure!(
                    text.contains("-----BEGIN PUBLIC KEY-----")
                        || text.contains("-----BEGIN RSA PUBLIC KEY-----"),
                    "http.jwt.key_file {} is not a PEM public key (-----BEGIN PUBLIC KEY-----); give the identity provider's public key, never a private one",
                    path.display()
                );
                let key = match family {
                    AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
                    AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_ed_pem(&pem),
                }
                .map_err(|e| {
                    anyhow::anyhow!(
                        "http.jwt.key_file {} is not an {} public key, as algorithms {} need: {e}",
                        path.display(),
                        family_name(family),
                        pinned()
                    )
                })?;
                Keys::One(VerifyingKey { key, algorithm: None })
            } else {
                let path = config.jwks_file.clone().expect("one source is set");
                let set = read_jwks(&path, &algorithms)?;
                Keys::Jwks {
                    path,
                    by_kid: RwLock::new(Arc::new(set)),
                }
            }
        };

        let mut validation = Validation::new(first);
        validation.algorithms = algorithms;
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(JwtVerifier {
            validation,
            family,
            keys,
            claims: ClaimNames {
                role: config.roles_claim.clone(),
                namespaces: config.namespaces_claim.clone(),
                agents: config.agents_claim.clone(),
            },
            refresh: config.jwks_refresh,
        })
    }

    /// The principal a token stands for, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, Refusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| bad("not a signed JWT (malformed, or an algorithm that is never accepted)"))?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(bad(format!(
                "signed with {:?}; this API accepts only {:?}",
                header.alg, self.validation.algorithms
            )));
        }
        let claims = match &self.keys {
            Keys::One(key) => self.decode(token, header.alg, key)?,
            Keys::Jwks { by_kid, .. } => {
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| bad("the token names no key (kid)"))?;
                let set = by_kid.read().expect("JWKS lock").clone();
                let key = set
                    .get(kid)
                    .ok_or_else(|| bad(format!("no key {kid:?} in the JWKS")))?;
                self.decode(token, header.alg, key)?
            }
        };
        self.principal(claims)
    }

    fn decode(&self, token: &str, alg: Algorithm, key: &VerifyingKey) -> Result<Map<String, Value>, Refusal> {
        if key.algorithm.is_some_and(|a| a != alg) {
            return Err(bad(format!("the key is not for {alg:?}")));
        }
        jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::ImmatureSignature => bad("not valid yet (nbf)"),
                ErrorKind::InvalidSignature => bad("the signature does not verify"),
                ErrorKind::InvalidIssuer => bad("wrong issuer (iss)"),
                ErrorKind::InvalidAudience => bad("wrong audience (aud)"),
                ErrorKind::MissingRequiredClaim(claim) => bad(format!("the {claim} claim is missing")),
                ErrorKind::InvalidClaimFormat(claim) => bad(format!("the {claim} claim is malformed")),
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
                    bad("the algorithm does not fit the key")
                }
                _ => bad("malformed"),
            })
    }

    fn principal(&self, mut claims: Map<String, Value>) -> Result<Principal, Refusal> {
        let Some(Value::String(name)) = claims.remove("sub") else {
            return Err(bad("sub is not a string"));
        };
        if let Err(e) = memos_schemas::validate::check_name("sub", &name) {
            return Err(bad(e.to_string()));
        }
        if name.contains(" via ") {
            return Err(bad(
                "sub may not contain \" via \" (it reads as a service acting for an agent)",
            ));
        }
        let role_claim = &self.claims.role;
        let roles: BTreeSet<Role> = match claims.get(role_claim) {
            Some(Value::String(role)) => role.parse().into_iter().collect(),
            // An identity provider's roles claim often lists roles of other applications too.
            Some(Value::Array(values)) => values
                .iter()
                .filter_map(Value::as_str)
                .filter_map(|r| r.parse().ok())
                .collect(),
            _ => BTreeSet::new(),
        };
        let role = match (roles.len(), roles.first()) {
            (1, Some(&role)) => role,
            (0, _) => {
                return Err(Refusal::BadRole {
                    message: format!(
                        "the JWT of {name} names no role in its {role_claim} claim (agent, service, auditor or operator)"
                    ),
                    subject: name,
                });
            }
            _ => {
                return Err(Refusal::BadRole {
                    message: format!(
                        "the JWT of {name} names {} roles in its {role_claim} claim; a principal has exactly one",
                        roles.len()
                    ),
                    subject: name,
                });
            }
        };
        let namespaces = names(&claims, &self.claims.namespaces)?;
        let agents = names(&claims, &self.claims.agents)?;
        Ok(Principal {
            name,
            role,
            namespaces,
            agents,
        })
    }

    /// Re-reads the JWKS file (when there is one) and puts its keys in force; on an error the
    /// keys read before stay. The number of usable keys now in force.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let Keys::Jwks { path, by_kid } = &self.keys else {
            return Ok(1);
        };
        let result = read_jwks(path, &self.validation.algorithms);
        metrics::counter!(m::JWT_JWKS_RELOADS, "outcome" => if result.is_ok() { "loaded" } else { "failed" })
            .increment(1);
        let set = result?;
        let count = set.len();
        let mut current = by_kid.write().expect("JWKS lock");
        let changed = {
            let mut old: Vec<&String> = current.keys().collect();
            let mut new: Vec<&String> = set.keys().collect();
            old.sort();
            new.sort();
            old != new
        };
        if changed {
            let mut kids: Vec<&String> = set.keys().collect();
            kids.sort();
            tracing::info!(path = %path.display(), ?kids, "JWKS keys changed");
        }
        *current = Arc::new(set);
        Ok(count)
    }

    /// Re-reads the JWKS file every `jwks_refresh` until `shutdown`; nothing to do for one key.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !matches!(self.keys, Keys::Jwks { .. }) {
            return None;
        }
        let verifier = Arc::clone(self);
        Some(tokio::spawn(async move {
            let mut every = tokio::time::interval(verifier.refresh);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                let reloaded = {
                    let verifier = Arc::clone(&verifier);
                    tokio::task::spawn_blocking(move || verifier.reload()).await
                };
                match reloaded {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %format!("{e:#}"), "JWKS not reloaded; the keys read before stay in force")
                    }
                    Err(e) => tracing::error!(error = %e, "JWKS reload panicked"),
                }
            }
        }))
    }

    /// The algorithm family every accepted token is signed with.
    pub fn family(&self) -> AlgorithmFamily {
        self.family
    }
}

/// A claim listing names: absent is none; one string is one.
fn names(claims: &Map<String, Value>, claim: &str) -> Result<BTreeSet<String>, Refusal> {
    let values: Vec<&Value> = match claims.get(claim) {
        None | Some(Value::Null) => return Ok(BTreeSet::new()),
        Some(Value::Array(values)) => values.iter().collect(),
        Some(value) => vec![value],
    };
    values
        .into_iter()
        .map(|v| match v.as_str() {
            Some(name) if memos_schemas::validate::check_name("name", name).is_ok() => Ok(name.to_owned()),
            _ => Err(bad(format!("the {claim} claim must be a list of names"))),
        })
        .collect()
}

/// The usable keys of a JWKS file for `algorithms`: public keys of their family with a
/// `kid`, meant for signatures, and (when the JWK says) for one of the algorithms and of
/// the curve they need. Others are skipped with a warning; none usable is an error.
fn read_jwks(path: &Path, algorithms: &[Algorithm]) -> anyhow::Result<HashMap<String, VerifyingKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read http.jwt.jwks_file {}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text).with_context(|| {
        format!(
            "http.jwt.jwks_file {} is not a JWKS ({{\"keys\": [...]}})",
            path.display()
        )
    })?;
    let family = algorithms.first().map(|a| a.family());
    let mut usable = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        let skip = |why: &str| tracing::warn!(path = %path.display(), kid = %kid, "JWKS key skipped: {why}");
        if kid.is_empty() {
            skip("it has no kid");
            continue;
        }
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            skip("it is not for signatures");
            continue;
        }
        let key_family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
            AlgorithmParameters::OctetKey(_) => {
                skip("a symmetric key is taken only from http.jwt.secret");
                continue;
            }
            _ => {
                skip("unsupported key type");
                continue;
            }
        };
        if Some(key_family) != family {
            skip("not of the family of http.jwt.algorithms");
            continue;
        }
        let algorithm = match jwk.common.key_algorithm {
            None => None,
            Some(alg) => match Algorithm::try_from(alg) {
                Ok(alg) if algorithms.contains(&alg) => Some(alg),
                _ => {
                    skip("its alg is not one of http.jwt.algorithms");
                    continue;
                }
            },
        };
        // An EC key verifies only its own curve's algorithm.
        let algorithm = match (&jwk.algorithm, algorithm) {
            (AlgorithmParameters::EllipticCurve(ec), alg) => {
                let by_curve = match ec.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => {
                        skip("unsupported curve");
                        continue;
                    }
                };
                if alg.is_some_and(|a| a != by_curve) || !algorithms.contains(&by_curve) {
                    skip("its curve does not fit http.jwt.algorithms");
                    continue;
                }
                Some(by_curve)
            }
            (_, alg) => alg,
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => {
                if usable
                    .insert(kid.clone(), VerifyingKey { key, algorithm })
                    .is_some()
                {
                    bail!(
                        "http.jwt.jwks_file {} holds two keys with kid {kid:?}",
                        path.display()
                    );
                }
            }
            Err(e) => skip(&format!("not a valid key: {e}")),
        }
    }
    ensure!(
        !usable.is_empty(),
        "http.jwt.jwks_file {} holds no usable key with a kid for algorithms {algorithms:?}",
        path.display()
    );
    Ok(usable)
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{EncodingKey, Header};
    use memos_runtime::config::Secret;
    use serde_json::json;

    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../integration-tests/fixtures/jwt/",
                $name
            ))
        };
    }
    const SIGNER_KEY: &str = fixture!("rsa-signer.key.pem");
    const SIGNER_PUB: &str = fixture!("rsa-signer.pub.pem");
    const OTHER_KEY: &str = fixture!("rsa-other.key.pem");
    const OTHER_PUB: &str = fixture!("rsa-other.pub.pem");
    const EC_KEY: &str = fixture!("ec-signer.key.pem");
    const EC_PUB: &str = fixture!("ec-signer.pub.pem");
    const ED_KEY: &str = fixture!("ed-signer.key.pem");
    const ED_PUB: &str = fixture!("ed-signer.pub.pem");

    const ISSUER: &str = "https://idp.test";
    const AUDIENCE: &str = "memos";

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn claims(sub: &str, role: Value) -> Value {
        json!({
            "sub": sub, "iss": ISSUER, "aud": AUDIENCE,
            "iat": now(), "exp": now() + 300,
            "memos_role": role,
        })
    }

    fn rs256(kid: &str, pem: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn jwk(kid: &str, pem: &str, alg: Algorithm) -> Value {
        let key = match alg.family() {
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        };
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        serde_json::to_value(jwk).unwrap()
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("memos-jwt-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn config(algorithms: &[JwtAlgorithm]) -> JwtConfig {
        JwtConfig {
            algorithms: algorithms.to_vec(),
            jwks_file: None,
            key_file: None,
            secret: None,
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            leeway: Duration::from_secs(5),
            jwks_refresh: Duration::from_secs(60),
            roles_claim: "memos_role".into(),
            namespaces_claim: "memos_namespaces".into(),
            agents_claim: "memos_agents".into(),
        }
    }

    /// RS256 with a JWKS holding the signer's key as kid `a`.
    fn verifier() -> (JwtVerifier, PathBuf) {
        let jwks = json!({"keys": [jwk("a", SIGNER_KEY, Algorithm::RS256)]});
        let path = temp_file("jwks.json", &jwks.to_string());
        let mut config = config(&[JwtAlgorithm::RS256]);
        config.jwks_file = Some(path.clone());
        (JwtVerifier::from_config(&config).unwrap(), path)
    }

    fn reason(result: Result<Principal, Refusal>) -> &'static str {
        result.expect_err("refused").reason()
    }

    #[test]
    fn a_valid_token_is_its_subjects_principal() {
        let (v, _) = verifier();
        let mut c = claims("alice", json!("agent"));
        c["memos_namespaces"] = json!(["team-x"]);
        let p = v.verify(&rs256("a", SIGNER_KEY, &c)).unwrap();
        assert_eq!(p.name, "alice");
        assert_eq!(p.role, Role::Agent);
        assert_eq!(p.namespaces, ["team-x".to_owned()].into());
        assert!(p.agents.is_empty());

        let mut c = claims("ingest", json!(["offline_access", "service"]));
        c["memos_agents"] = json!("alice");
        let p = v.verify(&rs256("a", SIGNER_KEY, &c)).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("ingest", Role::Service));
        assert!(p.may_act_for("alice") && !p.may_act_for("bob"));
        assert_eq!(v.family(), AlgorithmFamily::Rsa);
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let (v, _) = verifier();
        let mut c = claims("alice", json!("agent"));
        c["exp"] = json!(now() - 60);
        assert_eq!(reason(v.verify(&rs256("a", SIGNER_KEY, &c))), "expired_token");
        // Within the leeway it is still good: clocks differ.
        c["exp"] = json!(now() - 1);
        assert!(v.verify(&rs256("a", SIGNER_KEY, &c)).is_ok());
        c["exp"] = json!(now() + 300);
        c["nbf"] = json!(now() + 120);
        assert_eq!(
            reason(v.verify(&rs256("a", SIGNER_KEY, &c))),
            "bad_token",
            "not yet valid"
        );
    }

    #[test]
    fn a_token_signed_by_another_key_is_refused() {
        let (v, _) = verifier();
        let c = claims("alice", json!("agent"));
        let forged = rs256("a", OTHER_KEY, &c);
        assert_eq!(v.verify(&forged), Err(bad("the signature does not verify")));
        assert_eq!(
            reason(v.verify(&rs256("b", OTHER_KEY, &c))),
            "bad_token",
            "unknown kid"
        );
        let mut header = Header::new(Algorithm::RS256);
        header.kid = None;
        let no_kid = jsonwebtoken::encode(
            &header,
            &c,
            &EncodingKey::from_rsa_pem(SIGNER_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(reason(v.verify(&no_kid)), "bad_token");
        // A key the token carries itself is never used.
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("a".into());
        header.jwk = Some(serde_json::from_value(jwk("a", OTHER_KEY, Algorithm::RS256)).unwrap());
        let self_signed = jsonwebtoken::encode(
            &header,
            &c,
            &EncodingKey::from_rsa_pem(OTHER_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(reason(v.verify(&self_signed)), "bad_token");
    }

    #[test]
    fn an_unsigned_token_is_refused() {
        let (v, _) = verifier();
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let c = claims("alice", json!("agent"));
        for alg in ["none", "None", "NONE"] {
            let header = json!({"alg": alg, "typ": "JWT", "kid": "a"});
            for signature in ["", "e30"] {
                let token = format!("{}.{}.{signature}", part(&header), part(&c));
                assert_eq!(reason(v.verify(&token)), "bad_token", "{alg} {signature:?}");
            }
        }
        // A valid token with its signature stripped.
        let token = rs256("a", SIGNER_KEY, &c);
        let stripped = &token[..token.rfind('.').unwrap() + 1];
        assert_eq!(reason(v.verify(stripped)), "bad_token");
        for garbage in ["", "memos", "a.b", "a.b.c", "...."] {
            assert_eq!(reason(v.verify(garbage)), "bad_token", "{garbage:?}");
        }
    }

    /// The classic confusion: an HS256 token whose "secret" is the RSA public key, which
    /// anyone has. Refused because HS256 is not pinned, with a JWKS and with a key file.
    #[test]
    fn an_algorithm_outside_the_pinned_ones_is_refused() {
        let c = claims("alice", json!("operator"));
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("a".into());
        let confused = jsonwebtoken::encode(
            &header,
            &c,
            &EncodingKey::from_secret(SIGNER_PUB.as_bytes()).unwrap(),
        )
        .unwrap();
        let (v, _) = verifier();
        assert_eq!(
            v.verify(&confused),
            Err(bad("signed with HS256; this API accepts only [RS256]"))
        );

        let mut with_file = config(&[JwtAlgorithm::RS256]);
        with_file.key_file = Some(temp_file("signer.pem", SIGNER_PUB));
        let v = JwtVerifier::from_config(&with_file).unwrap();
        assert_eq!(reason(v.verify(&confused)), "bad_token");
        assert!(
            v.verify(&rs256("any", SIGNER_KEY, &c)).is_ok(),
            "one key: no kid needed"
        );
        assert_eq!(reason(v.verify(&rs256("any", OTHER_KEY, &c))), "bad_token");

        // RS384 is RSA too, but not pinned.
        let mut header = Header::new(Algorithm::RS384);
        header.kid = Some("a".into());
        let rs384 = jsonwebtoken::encode(
            &header,
            &c,
            &EncodingKey::from_rsa_pem(SIGNER_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(reason(v.verify(&rs384)), "bad_token");
    }

    #[test]
    fn a_wrong_issuer_or_audience_is_refused() {
        let (v, _) = verifier();
        for (claim, value, why) in [
            ("iss", json!("https://elsewhere"), "wrong issuer (iss)"),
            ("aud", json!("another-api"), "wrong audience (aud)"),
            ("aud", json!(["another-api", "more"]), "wrong audience (aud)"),
        ] {
            let mut c = claims("alice", json!("agent"));
            c[claim] = value;
            assert_eq!(v.verify(&rs256("a", SIGNER_KEY, &c)), Err(bad(why)), "{claim}");
        }
        let mut c = claims("alice", json!("agent"));
        c["aud"] = json!(["another-api", AUDIENCE]);
        assert!(
            v.verify(&rs256("a", SIGNER_KEY, &c)).is_ok(),
            "one of its audiences"
        );
        for claim in ["iss", "aud", "sub", "exp"] {
            let mut c = claims("alice", json!("agent"));
            c.as_object_mut().unwrap().remove(claim);
            assert_eq!(
                reason(v.verify(&rs256("a", SIGNER_KEY, &c))),
                "bad_token",
                "without {claim}"
            );
        }
    }

    #[test]
    fn a_token_without_exactly_one_role_is_refused() {
        let (v, _) = verifier();
        for role in [
            json!(null),
            json!("root"),
            json!(""),
            json!(["admin"]),
            json!(["agent", "operator"]),
            json!(7),
            json!({"role": "agent"}),
        ] {
            let mut c = claims("alice", role.clone());
            if role.is_null() {
                c.as_object_mut().unwrap().remove("memos_role");
            }
            let refusal = v.verify(&rs256("a", SIGNER_KEY, &c)).unwrap_err();
            assert_eq!(refusal.reason(), "bad_role", "{role}");
            assert_eq!(refusal.subject(), Some("alice"));
        }
        for sub in ["", "bob via ingest", "a\u{7}b"] {
            let c = claims(sub, json!("agent"));
            assert_eq!(
                reason(v.verify(&rs256("a", SIGNER_KEY, &c))),
                "bad_token",
                "{sub:?}"
            );
        }
        let mut c = claims("alice", json!("agent"));
        c["memos_namespaces"] = json!([1, 2]);
        assert_eq!(reason(v.verify(&rs256("a", SIGNER_KEY, &c))), "bad_token");
    }

    #[test]
    fn rotating_the_jwks_file_takes_effect_on_reload() {
        let (v, path) = verifier();
        let c = claims("alice", json!("agent"));
        let new_token = rs256("b", OTHER_KEY, &c);
        let old_token = rs256("a", SIGNER_KEY, &c);
        assert!(v.verify(&new_token).is_err());

        let both =
            json!({"keys": [jwk("a", SIGNER_KEY, Algorithm::RS256), jwk("b", OTHER_KEY, Algorithm::RS256)]});
        std::fs::write(&path, both.to_string()).unwrap();
        assert_eq!(v.reload().unwrap(), 2);
        assert!(v.verify(&new_token).is_ok() && v.verify(&old_token).is_ok());

        let only_new = json!({"keys": [jwk("b", OTHER_KEY, Algorithm::RS256)]});
        std::fs::write(&path, only_new.to_string()).unwrap();
        assert_eq!(v.reload().unwrap(), 1);
        assert_eq!(reason(v.verify(&old_token)), "bad_token", "a withdrawn key");

        // A broken file keeps the keys in force.
        std::fs::write(&path, "{not json").unwrap();
        assert!(v.reload().is_err());
        assert!(v.verify(&new_token).is_ok());
    }

    #[test]
    fn ec_keys_verify_their_own_curve() {
        let jwks = json!({"keys": [jwk("e", EC_KEY, Algorithm::ES256)]});
        let mut config = config(&[JwtAlgorithm::ES256]);
        config.jwks_file = Some(temp_file("jwks.json", &jwks.to_string()));
        let v = JwtVerifier::from_config(&config).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("e".into());
        let c = claims("alice", json!("auditor"));
        let token =
            jsonwebtoken::encode(&header, &c, &EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap()).unwrap();
        assert_eq!(v.verify(&token).unwrap().role, Role::Auditor);

        let mut with_file = config.clone();
        with_file.jwks_file = None;
        with_file.key_file = Some(temp_file("ec.pem", EC_PUB));
        assert!(
            JwtVerifier::from_config(&with_file)
                .unwrap()
                .verify(&token)
                .is_ok()
        );
    }

    #[test]
    fn ed25519_keys_verify_eddsa_tokens_from_a_jwks_or_a_key_file() {
        let jwks = json!({"keys": [jwk("d", ED_KEY, Algorithm::EdDSA)]});
        let mut config = config(&[JwtAlgorithm::EdDSA]);
        config.jwks_file = Some(temp_file("jwks.json", &jwks.to_string()));
        let v = JwtVerifier::from_config(&config).unwrap();
        assert_eq!(v.family(), AlgorithmFamily::Ed);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("d".into());
        let c = claims("alice", json!("agent"));
        let token =
            jsonwebtoken::encode(&header, &c, &EncodingKey::from_ed_pem(ED_KEY.as_bytes()).unwrap()).unwrap();
        assert_eq!(v.verify(&token).unwrap().name, "alice");

        let mut with_file = config.clone();
        with_file.jwks_file = None;
        with_file.key_file = Some(temp_file("ed.pem", ED_PUB));
        let from_file = JwtVerifier::from_config(&with_file).unwrap();
        assert!(from_file.verify(&token).is_ok());

        // The same claims signed by an RSA key under the same kid: refused by both.
        let mut forged = Header::new(Algorithm::RS256);
        forged.kid = Some("d".into());
        let forged = jsonwebtoken::encode(
            &forged,
            &c,
            &EncodingKey::from_rsa_pem(SIGNER_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.verify(&forged).is_err());
        assert!(from_file.verify(&forged).is_err());
        // A tampered EdDSA token (another subject, the original signature): refused.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(claims("mallory", json!("admin")).to_string());
        assert_eq!(reason(v.verify(&parts.join("."))), "bad_token");
    }

    #[test]
    fn a_configuration_that_does_not_fit_is_refused_at_start() {
        let error =
            |config: &JwtConfig| format!("{:#}", JwtVerifier::from_config(config).err().expect("refused"));
        let rsa_file = temp_file("rsa.pem", SIGNER_PUB);

        let mut c = config(&[]);
        c.key_file = Some(rsa_file.clone());
        assert!(error(&c).contains("algorithms is empty"));

        let mut c = config(&[JwtAlgorithm::RS256, JwtAlgorithm::HS256]);
        c.key_file = Some(rsa_file.clone());
        assert!(error(&c).contains("mixes"), "{}", error(&c));

        let c = config(&[JwtAlgorithm::RS256]);
        assert!(error(&c).contains("none is set"));
        let mut c = config(&[JwtAlgorithm::RS256]);
        c.key_file = Some(rsa_file.clone());
        c.secret = Some(Secret::new("x".repeat(64)));
        assert!(error(&c).contains("key_file and secret are set"));

        let mut c = config(&[JwtAlgorithm::HS256]);
        c.key_file = Some(rsa_file.clone());
        assert!(error(&c).contains("http.jwt.secret"), "{}", error(&c));
        let mut c = config(&[JwtAlgorithm::RS256]);
        c.secret = Some(Secret::new("x".repeat(64)));
        assert!(error(&c).contains("is an HMAC key"));
        let mut c = config(&[JwtAlgorithm::HS512]);
        c.secret = Some(Secret::new("x".repeat(32)));
        assert!(error(&c).contains("need at least 64"));

        let mut c = config(&[JwtAlgorithm::ES256]);
        c.key_file = Some(rsa_file.clone());
        assert!(error(&c).contains("not an EC public key"), "{}", error(&c));
        let mut c = config(&[JwtAlgorithm::RS256]);
        c.key_file = Some(temp_file("private.pem", SIGNER_KEY));
        assert!(error(&c).contains("not a PEM public key"));
        let mut c = config(&[JwtAlgorithm::RS256]);
        c.key_file = Some(temp_file("other.pem", OTHER_PUB));
        c.issuer = " ".into();
        assert!(error(&c).contains("issuer is empty"));

        // A JWKS holding only keys of another family, or without kids, has none to use.
        let mut c = config(&[JwtAlgorithm::ES256]);
        let rsa_jwks = json!({"keys": [jwk("a", SIGNER_KEY, Algorithm::RS256)]});
        c.jwks_file = Some(temp_file("jwks.json", &rsa_jwks.to_string()));
        assert!(error(&c).contains("no usable key"), "{}", error(&c));
        let mut c = config(&[JwtAlgorithm::RS256]);
        let mut no_kid = jwk("a", SIGNER_KEY, Algorithm::RS256);
        no_kid.as_object_mut().unwrap().remove("kid");
        c.jwks_file = Some(temp_file("jwks.json", &json!({"keys": [no_kid]}).to_string()));
        assert!(error(&c).contains("no usable key"));
        let mut c = config(&[JwtAlgorithm::RS256]);
        c.jwks_file = Some(PathBuf::from("/nonexistent/jwks.json"));
        assert!(error(&c).contains("cannot read http.jwt.jwks_file"));

        // HS256 with a secret of the right size works.
        let mut c = config(&[JwtAlgorithm::HS256]);
        c.secret = Some(Secret::new("s".repeat(32)));
        let v = JwtVerifier::from_config(&c).unwrap();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("alice", json!("agent")),
            &EncodingKey::from_secret("s".repeat(32).as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.verify(&token).is_ok());
    }
}
