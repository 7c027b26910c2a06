//! The OpenAPI 3.1 document every HTTP service serves at `GET /openapi.json`: what the services
//! share (problem documents, bearer authentication, `/healthz` and `/readyz`) merged into each
//! service's own paths, and the route that serves it.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::OpenApi as Document;
use utoipa::OpenApi;

use crate::Problem;

/// The security scheme the documents' operations name.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    paths(crate::health::healthz, crate::health::readyz),
    components(schemas(Problem)),
    modifiers(&BearerScheme),
    tags((name = "operations", description = "Probes; `/metrics` is on the admin listener (`ADMIN_ADDR`)")),
)]
struct Shared;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".to_owned());
        http.description = Some(
            "A JWT with `tenant_id`, `scope` (space-separated) and `exp`, signed with AUTH_JWT_SECRET \
             (HS256) or the key of AUTH_JWT_PUBLIC_KEY (RS256, ES256); not needed when authentication is off"
                .to_owned(),
        );
        components.add_security_scheme(BEARER, SecurityScheme::Http(http));
    }
}

/// The refusals every authenticated operation may answer, for its `responses(...)`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Refusals {
    /// No token, or a bad one (`WWW-Authenticate: Bearer`)
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthenticated(Problem),
    /// The token lacks the operation's scope
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// A dependency is unavailable, or the service is starting or misconfigured (see /readyz)
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// `service`'s document: its own paths and schemas (`own`), the shared ones, and its title
/// and version.
pub fn document(service: &str, description: &str, mut own: Document) -> Document {
    own.merge(Shared::openapi());
    own.info.title = service.to_owned();
    own.info.version = env!("CARGO_PKG_VERSION").to_owned();
    own.info.description = Some(description.to_owned());
    own.info.license = None;
    own.info.contact = None;
    own
}

/// `GET /openapi.json`: `document` as JSON, rendered once.
pub fn route<S: Clone + Send + Sync + 'static>(document: &Document) -> Router<S> {
    let body = document.to_json().unwrap_or_else(|_| "{}".to_owned());
    Router::new().route(
        "/openapi.json",
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_openapi_3_1_with_the_shared_parts() {
        let doc = document("svc", "what it does", utoipa::openapi::OpenApiBuilder::new().build());
        let json: serde_json::Value = serde_json::from_str(&doc.to_json().expect("json")).expect("parse");
        assert_eq!(json["openapi"], "3.1.0");
        assert_eq!(json["info"]["title"], "svc");
        assert!(json["paths"]["/healthz"]["get"].is_object(), "{json}");
        assert!(json["paths"]["/readyz"]["get"].is_object(), "{json}");
        assert_eq!(json["components"]["securitySchemes"][BEARER]["scheme"], "bearer");
        assert_eq!(json["components"]["schemas"]["Problem"]["properties"]["type"]["type"], "string");
    }
}

/// The differences between `document`'s operations and the ones `api_md` (docs/API.md) gives
/// a heading of their own (`` ### `POST /orders` ``) in its section `## <section>`: each
/// operation documented in one and not the other. The shared probes are documented once, in
/// the common section, and left out.
pub fn undocumented(document: &Document, api_md: &str, section: &str) -> Vec<String> {
    let mut in_document: Vec<String> = document
        .paths
        .paths
        .iter()
        .flat_map(|(path, item)| {
            let operations =
                [&item.get, &item.put, &item.post, &item.delete, &item.options, &item.head, &item.patch, &item.trace];
            METHODS.into_iter().zip(operations).filter(|(_, op)| op.is_some()).map(move |(m, _)| format!("{m} {path}"))
        })
        .filter(|op| !is_shared(op))
        .collect();
    let heading = format!("## {section}");
    let body = api_md.split("\n## ").find(|s| format!("## {s}").starts_with(&heading)).unwrap_or_default();
    let mut in_docs: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("### `")?.strip_suffix('`').map(str::to_owned))
        .filter(|op| METHODS.iter().any(|m| op.starts_with(&format!("{m} "))))
        .filter(|op| !is_shared(op))
        .collect();
    in_document.sort();
    in_docs.sort();
    let mut out: Vec<String> =
        in_document.iter().filter(|op| !in_docs.contains(op)).map(|op| format!("{op}: not in docs/API.md")).collect();
    out.extend(in_docs.iter().filter(|op| !in_document.contains(op)).map(|op| format!("{op}: not in the document")));
    out
}

/// The methods of a path item, in the order of its fields.
const METHODS: [&str; 8] = ["GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"];

/// Whether `operation` (`GET /healthz`) is one of the shared probes, documented once.
fn is_shared(operation: &str) -> bool {
    operation.ends_with(" /healthz") || operation.ends_with(" /readyz")
}

#[cfg(test)]
mod documented {
    use super::*;

    #[test]
    fn an_operation_missing_on_either_side_is_named() {
        let doc: Document = serde_json::from_value(serde_json::json!({
            "openapi": "3.1.0",
            "info": {"title": "svc", "version": "1"},
            "paths": {
                "/healthz": {"get": {"responses": {}}},
                "/things": {"get": {"responses": {}}, "post": {"responses": {}}},
            },
        }))
        .expect("a document");
        let md = "# API\n## svc (x)\n### `GET /things`\n### `POST /gone`\n## other\n### `POST /things`\n";
        // /healthz is shared and left out; POST /things is in another service's section.
        assert_eq!(
            undocumented(&doc, md, "svc"),
            vec!["POST /things: not in docs/API.md".to_owned(), "POST /gone: not in the document".to_owned()]
        );
        let complete = "# API\n## svc\n### `GET /things`\n### `POST /things`\n";
        assert!(undocumented(&doc, complete, "svc").is_empty());
    }
}
