//! Who a request comes from: a bearer JWT's tenant and scopes, checked on every API route.
//!
//! - `AUTH_JWT_SECRET` (HS256) or `AUTH_JWT_PUBLIC_KEY` (a PEM file: RS256 for an RSA key,
//!   ES256 for a P-256 key) turns authentication on. With neither, it is off: every request
//!   belongs to the tenant `default` and holds every scope, and the service says so at start
//!   and in `/readyz`'s body.
//! - Claims: `tenant_id` (`[a-z0-9][a-z0-9-]{0,63}`), `scope` (space-separated), `exp`
//!   (required), `nbf` if present (60 s of clock skew are allowed); `aud` and `iss` when
//!   `AUTH_JWT_AUDIENCE` / `AUTH_JWT_ISSUER` are set. Unknown scope names are ignored.
//! - No token, a malformed, badly signed or expired one: `401` problem+json with
//!   `WWW-Authenticate: Bearer` (RFC 6750). A valid token without the route's scope: `403`.
//!
//! [`require`] is the middleware for a group of routes that need one scope; handlers read the
//! [`Principal`] from the request's extensions. Tokens are never logged nor put in spans.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use domain::TenantId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::Problem;

/// Shortest HS256 secret accepted: 256 bits, the hash's size (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// Clock skew allowed between the token issuer and this service, on `exp` and `nbf`.
pub const CLOCK_SKEW_SECONDS: u64 = 60;

/// A permission a token may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    OrdersRead,
    OrdersWrite,
    InventoryRead,
    InventoryWrite,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] =
        [Self::OrdersRead, Self::OrdersWrite, Self::InventoryRead, Self::InventoryWrite, Self::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrdersRead => "orders:read",
            Self::OrdersWrite => "orders:write",
            Self::InventoryRead => "inventory:read",
            Self::InventoryWrite => "inventory:write",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The scopes a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn all() -> Self {
        Self(Scope::ALL.iter().fold(0, |bits, s| bits | s.bit()))
    }

    /// The known scopes in a space-separated `scope` claim; others are ignored.
    pub fn parse(claim: &str) -> Self {
        Self(claim.split(' ').filter_map(Scope::parse).fold(0, |bits, s| bits | s.bit()))
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: TenantId,
    pub scopes: Scopes,
    /// The last second (Unix time) the token is accepted: its `exp` plus the clock skew
    /// allowed; `None` with authentication off. A response that lasts, such as an event
    /// stream, ends by then.
    pub accepted_until: Option<u64>,
}

/// The claims this service reads and [`mint`] writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub tenant_id: String,
    #[serde(default)]
    pub scope: String,
    pub exp: u64,
}

/// Authentication settings, shared by every HTTP service.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthSettings {
    /// HS256 secret of the bearer tokens (at least 32 bytes); turns authentication on.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true, conflicts_with = "auth_jwt_public_key")]
    pub auth_jwt_secret: Option<String>,
    /// PEM file of the public key of the bearer tokens (RSA: RS256, P-256: ES256); turns
    /// authentication on.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<PathBuf>,
    /// The `aud` tokens must name (unset: `aud` is not checked).
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    /// The `iss` tokens must carry (unset: `iss` is not checked).
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("AUTH_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret,
    #[error("set AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY, not both")]
    Both,
    #[error("reading AUTH_JWT_PUBLIC_KEY {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("AUTH_JWT_PUBLIC_KEY {path} is neither an RSA nor a P-256 public key in PEM")]
    Key { path: PathBuf },
    #[error("{0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

/// Checks bearer tokens, or lets every request in as the tenant `default` when off.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Option<Arc<Verifier>>,
}

struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("on", &self.is_on()).finish()
    }
}

impl Authenticator {
    /// Authentication off: every request is the tenant `default` with every scope.
    pub fn off() -> Self {
        Self { verifier: None }
    }

    pub fn from_settings(settings: &AuthSettings) -> Result<Self, AuthConfigError> {
        let (key, algorithm) = match (&settings.auth_jwt_secret, &settings.auth_jwt_public_key) {
            (None, None) => return Ok(Self::off()),
            (Some(_), Some(_)) => return Err(AuthConfigError::Both),
            (Some(secret), None) => {
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(AuthConfigError::ShortSecret);
                }
                (DecodingKey::from_secret(secret.as_bytes())?, Algorithm::HS256)
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| AuthConfigError::Read { path: path.clone(), source })?;
                public_key(&pem).ok_or_else(|| AuthConfigError::Key { path: path.clone() })?
            }
        };
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp"];
        required.extend(settings.auth_jwt_audience.as_ref().map(|_| "aud"));
        required.extend(settings.auth_jwt_issuer.as_ref().map(|_| "iss"));
        validation.set_required_spec_claims(&required);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = CLOCK_SKEW_SECONDS;
        match &settings.auth_jwt_audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.auth_jwt_issuer {
            validation.set_issuer(&[issuer]);
        }
        Ok(Self { verifier: Some(Arc::new(Verifier { key, validation })) })
    }

    pub fn is_on(&self) -> bool {
        self.verifier.is_some()
    }

    /// The principal of a request whose `Authorization` header is `authorization`.
    pub fn authenticate(&self, authorization: Option<&HeaderValue>) -> Result<Principal, AuthError> {
        if !self.is_on() {
            return self.verify(None);
        }
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Invalid("the Authorization header is not `Bearer <token>`"))?;
        self.verify(Some(token))
    }

    /// The principal of a bearer `token` that came some other way than the `Authorization`
    /// header (a query parameter or a cookie, for clients that cannot set headers).
    pub fn verify(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let Some(verifier) = &self.verifier else {
            return Ok(Principal { tenant: TenantId::default_tenant(), scopes: Scopes::all(), accepted_until: None });
        };
        let token = token.map(str::trim).filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            AuthError::Invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::InvalidSignature => "the token's signature does not verify",
                ErrorKind::InvalidAlgorithm => "the token is not signed with the expected algorithm",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim (exp, tenant_id)",
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                ErrorKind::InvalidAudience => "the token is not for this audience (aud)",
                ErrorKind::InvalidIssuer => "the token is not from the expected issuer (iss)",
                _ => "the token is malformed",
            })
        })?;
        let tenant = TenantId::parse(data.claims.tenant_id)
            .map_err(|_| AuthError::Invalid("the token's tenant_id does not match [a-z0-9][a-z0-9-]{0,63}"))?;
        Ok(Principal {
            tenant,
            scopes: Scopes::parse(&data.claims.scope),
            accepted_until: Some(data.claims.exp.saturating_add(CLOCK_SKEW_SECONDS)),
        })
    }
}

/// The key in a PEM file, and the algorithm it verifies.
fn public_key(pem: &[u8]) -> Option<(DecodingKey, Algorithm)> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Some((key, Algorithm::RS256));
    }
    DecodingKey::from_ec_pem(pem).ok().map(|key| (key, Algorithm::ES256))
}

/// A signing key for [`mint`]: an HS256 secret, or a private key in PEM (RSA: RS256,
/// P-256: ES256).
pub enum SigningKey<'a> {
    Secret(&'a str),
    PrivatePem(&'a [u8]),
}

/// A token for `tenant` with `scopes` (space-separated), expiring at `exp` (Unix seconds).
pub fn mint(key: SigningKey<'_>, tenant: &TenantId, scopes: &str, exp: u64) -> Result<String, AuthConfigError> {
    let (key, algorithm) = match key {
        SigningKey::Secret(secret) => {
            if secret.len() < MIN_SECRET_BYTES {
                return Err(AuthConfigError::ShortSecret);
            }
            (EncodingKey::from_secret(secret.as_bytes())?, Algorithm::HS256)
        }
        SigningKey::PrivatePem(pem) => match EncodingKey::from_rsa_pem(pem) {
            Ok(key) => (key, Algorithm::RS256),
            Err(_) => (EncodingKey::from_ec_pem(pem)?, Algorithm::ES256),
        },
    };
    let claims = Claims { tenant_id: tenant.as_str().to_owned(), scope: scopes.to_owned(), exp };
    Ok(jsonwebtoken::encode(&Header::new(algorithm), &claims, &key)?)
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the token lacks the scope {}", .0.as_str())]
    Forbidden(Scope),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let (problem, challenge) = match &self {
            Self::Missing => (
                Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized").detail("send `Authorization: Bearer <token>`"),
                "Bearer".to_owned(),
            ),
            Self::Invalid(why) => (
                Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized").detail(*why),
                format!("Bearer error=\"invalid_token\", error_description=\"{why}\""),
            ),
            Self::Forbidden(scope) => (
                Problem::new(StatusCode::FORBIDDEN, "Forbidden").detail(self.to_string()),
                format!("Bearer error=\"insufficient_scope\", scope=\"{}\"", scope.as_str()),
            ),
        };
        let mut response = problem.into_response();
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// Middleware for routes that need `scope`: authenticates the request and puts its
/// [`Principal`] in the request's extensions, or answers 401/403.
pub async fn require(State((auth, scope)): State<(Authenticator, Scope)>, mut req: Request, next: Next) -> Response {
    let principal = match auth.authenticate(req.headers().get(header::AUTHORIZATION)) {
        Ok(principal) => principal,
        Err(e) => return e.into_response(),
    };
    if !principal.scopes.contains(scope) {
        return AuthError::Forbidden(scope).into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// What a service says, at start and in `/readyz`'s body, when authentication is off.
pub const OFF_WARNING: &str = "authentication is off (neither AUTH_JWT_SECRET nor AUTH_JWT_PUBLIC_KEY is set): every request is the tenant `default` with every scope";

/// Logs [`OFF_WARNING`] if `auth` is off, and adds it to `readiness`'s notes.
pub fn announce(auth: &Authenticator, readiness: crate::Readiness) -> crate::Readiness {
    if auth.is_on() {
        return readiness;
    }
    tracing::warn!("{OFF_WARNING}");
    readiness.note(format!("warning: {OFF_WARNING}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0)
    }

    fn hs256() -> Authenticator {
        Authenticator::from_settings(&AuthSettings { auth_jwt_secret: Some(SECRET.into()), ..AuthSettings::default() })
            .expect("settings")
    }

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header")
    }

    fn tenant(s: &str) -> TenantId {
        TenantId::parse(s).expect("tenant")
    }

    #[test]
    fn a_minted_token_authenticates_with_its_tenant_and_scopes() {
        let exp = now() + 60;
        let token = mint(SigningKey::Secret(SECRET), &tenant("t-1"), "orders:read bogus admin", exp).expect("mint");
        let principal = hs256().authenticate(Some(&bearer(&token))).expect("valid");
        assert_eq!(principal.tenant, tenant("t-1"));
        assert_eq!(principal.accepted_until, Some(exp + CLOCK_SKEW_SECONDS));
        assert!(principal.scopes.contains(Scope::OrdersRead) && principal.scopes.contains(Scope::Admin));
        assert!(!principal.scopes.contains(Scope::OrdersWrite));
    }

    #[test]
    fn bad_tokens_are_refused_each_for_its_reason() {
        let auth = hs256();
        let other = mint(SigningKey::Secret("another secret, also 32 bytes long!"), &tenant("t"), "admin", now() + 60);
        let expired = mint(SigningKey::Secret(SECRET), &tenant("t"), "admin", now() - 3600);
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            auth.authenticate(Some(&bearer(&other.expect("mint")))),
            Err(AuthError::Invalid("the token's signature does not verify"))
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&expired.expect("mint")))),
            Err(AuthError::Invalid("the token has expired"))
        );
        assert!(matches!(auth.authenticate(Some(&bearer("a.b.c"))), Err(AuthError::Invalid(_))));
        assert!(matches!(auth.authenticate(Some(&HeaderValue::from_static("Basic dTpw"))), Err(AuthError::Invalid(_))));
        // A token without exp.
        let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
        let no_exp =
            jsonwebtoken::encode(&Header::default(), &serde_json::json!({"tenant_id": "t", "scope": "admin"}), &key);
        assert!(matches!(auth.authenticate(Some(&bearer(&no_exp.expect("encode")))), Err(AuthError::Invalid(_))));
        // A tenant outside the pattern.
        let bad_tenant =
            jsonwebtoken::encode(&Header::default(), &serde_json::json!({"tenant_id": "T 1", "exp": now() + 60}), &key);
        assert!(matches!(auth.authenticate(Some(&bearer(&bad_tenant.expect("encode")))), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn audience_issuer_and_not_before_are_checked() {
        let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
        let token =
            |claims: serde_json::Value| jsonwebtoken::encode(&Header::default(), &claims, &key).expect("encode");
        let base = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"tenant_id": "t", "scope": "admin", "exp": now() + 600});
            if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            token(claims)
        };
        let plain = hs256();
        // Without settings, an IdP's aud and iss are accepted; a future nbf is not.
        let idp = base(serde_json::json!({"aud": "orders-api", "iss": "https://idp.example"}));
        assert!(plain.authenticate(Some(&bearer(&idp))).is_ok());
        let early = base(serde_json::json!({"nbf": now() + 3600}));
        assert_eq!(
            plain.authenticate(Some(&bearer(&early))),
            Err(AuthError::Invalid("the token is not valid yet (nbf)"))
        );
        let strict = Authenticator::from_settings(&AuthSettings {
            auth_jwt_secret: Some(SECRET.into()),
            auth_jwt_audience: Some("orders-api".into()),
            auth_jwt_issuer: Some("https://idp.example".into()),
            ..AuthSettings::default()
        })
        .expect("settings");
        assert!(strict.authenticate(Some(&bearer(&idp))).is_ok());
        let other_aud = base(serde_json::json!({"aud": "billing", "iss": "https://idp.example"}));
        assert!(matches!(strict.authenticate(Some(&bearer(&other_aud))), Err(AuthError::Invalid(_))));
        let no_iss = base(serde_json::json!({"aud": "orders-api"}));
        assert!(matches!(strict.authenticate(Some(&bearer(&no_iss))), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn off_lets_everyone_in_as_default() {
        let principal = Authenticator::off().authenticate(None).expect("off");
        assert_eq!(principal.tenant.as_str(), "default");
        assert_eq!(principal.scopes, Scopes::all());
    }

    #[test]
    fn settings_are_checked() {
        let short = AuthSettings { auth_jwt_secret: Some("short".into()), ..AuthSettings::default() };
        assert!(matches!(Authenticator::from_settings(&short), Err(AuthConfigError::ShortSecret)));
        let both = AuthSettings {
            auth_jwt_secret: Some(SECRET.into()),
            auth_jwt_public_key: Some("/nonexistent".into()),
            ..AuthSettings::default()
        };
        assert!(matches!(Authenticator::from_settings(&both), Err(AuthConfigError::Both)));
        let missing = AuthSettings { auth_jwt_public_key: Some("/nonexistent".into()), ..AuthSettings::default() };
        assert!(matches!(Authenticator::from_settings(&missing), Err(AuthConfigError::Read { .. })));
    }

    #[test]
    fn refusals_carry_the_bearer_challenge() {
        let response = AuthError::Forbidden(Scope::OrdersWrite).into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let challenge = response.headers().get(header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
        assert_eq!(challenge, Some("Bearer error=\"insufficient_scope\", scope=\"orders:write\""));
        let response = AuthError::Missing.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers().get(header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()), Some("Bearer"));
    }
}
