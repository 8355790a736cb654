//! The operator check in front of every admin route that changes state or
//! costs CPU. A bearer token, compared in constant time: 401 when the
//! request carries none, 403 when it carries another, and 403 for everyone
//! when the process has no token configured (the endpoints are off). The
//! token is never logged or echoed; a refusal is logged with the caller's
//! address so an operator can see who tried.

use std::net::SocketAddr;

use axum::{
    Json,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::AdminState;

/// Who passed the check, for handlers that log what an operator did.
#[derive(Debug, Clone, Copy)]
pub struct Operator {
    /// The caller's address as the admin listener saw it.
    pub addr: Option<SocketAddr>,
}

/// Middleware: lets the request through only with `Authorization: Bearer
/// <admin.token>`, and hands the handler an [`Operator`].
pub async fn require_operator(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    pass_with(
        state.config.admin.token.expose(),
        request,
        next,
        |refusal| refusal,
    )
    .await
}

/// Middleware for `/faults` while the process is in a drill: only the
/// facilitator's `admin.drill_token` reads or sets the switches (the
/// trainee's `admin.token` still opens profiles and task dumps).
pub async fn require_drill_facilitator(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    let token = state.config.admin.drill_token.expose();
    pass_with(token, request, next, |_| Refusal::DrillHidden).await
}

/// Runs `next` if the request carries `token`; else logs the refusal (as
/// `answer` maps it) with the caller's address and answers it.
async fn pass_with(
    token: &str,
    mut request: Request,
    next: Next,
    answer: impl FnOnce(Refusal) -> Refusal,
) -> Response {
    let addr = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let route = format!("{} {}", request.method(), request.uri().path());
    match check(token, request.headers()) {
        Ok(()) => {
            request.extensions_mut().insert(Operator { addr });
            next.run(request).await
        }
        Err(refusal) => {
            let refusal = answer(refusal);
            tracing::warn!(?addr, %route, reason = refusal.reason(), "operator endpoint refused");
            refusal.into_response()
        }
    }
}

/// Why a request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// This process has no `admin.token`: operator endpoints are off.
    NoTokenConfigured,
    /// No `Authorization: Bearer …` header.
    Missing,
    /// A bearer token, but not this one.
    Wrong,
    /// In a drill, `/faults` without the drill token.
    DrillHidden,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::NoTokenConfigured => {
                "operator endpoints are off: this process has no admin.token configured"
            }
            Refusal::Missing => "operator endpoint: send `Authorization: Bearer <admin token>`",
            Refusal::Wrong => "the admin token does not match",
            Refusal::DrillHidden => {
                "a drill is running: the switches are hidden; the facilitator's drill token reads or sets them"
            }
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, code) = match self {
            Refusal::Missing => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Refusal::Wrong => (StatusCode::FORBIDDEN, "forbidden"),
            Refusal::NoTokenConfigured => (StatusCode::FORBIDDEN, "operator_endpoints_off"),
            Refusal::DrillHidden => (StatusCode::FORBIDDEN, "drill_hidden"),
        };
        let body = Json(json!({"error": self.reason(), "code": code}));
        if status == StatusCode::UNAUTHORIZED {
            (
                status,
                [(header::WWW_AUTHENTICATE, r#"Bearer realm="lab-admin""#)],
                body,
            )
                .into_response()
        } else {
            (status, body).into_response()
        }
    }
}

fn check(configured: &str, headers: &HeaderMap) -> Result<(), Refusal> {
    if configured.is_empty() {
        return Err(Refusal::NoTokenConfigured);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(Refusal::Missing)?;
    // Constant time in the bytes compared; only a length mismatch returns
    // early, which tells a caller the token's length and nothing else.
    if bool::from(presented.as_bytes().ct_eq(configured.as_bytes())) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const TOKEN: &str = "0123456789abcdef0123";

    fn with_authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("header value"),
        );
        headers
    }

    #[test]
    fn the_configured_token_passes_in_any_scheme_case() {
        assert_eq!(
            check(TOKEN, &with_authorization(&format!("Bearer {TOKEN}"))),
            Ok(())
        );
        assert_eq!(
            check(TOKEN, &with_authorization(&format!("bearer {TOKEN}"))),
            Ok(())
        );
    }

    #[test]
    fn no_header_or_another_scheme_is_missing() {
        assert_eq!(check(TOKEN, &HeaderMap::new()), Err(Refusal::Missing));
        assert_eq!(
            check(TOKEN, &with_authorization(&format!("Basic {TOKEN}"))),
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn another_token_or_a_prefix_is_wrong() {
        assert_eq!(
            check(TOKEN, &with_authorization("Bearer not-the-token-at-all")),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            check(
                TOKEN,
                &with_authorization(&format!("Bearer {}", &TOKEN[..10]))
            ),
            Err(Refusal::Wrong)
        );
    }

    #[test]
    fn without_a_configured_token_nobody_passes() {
        assert_eq!(
            check("", &with_authorization("Bearer ")),
            Err(Refusal::NoTokenConfigured)
        );
    }
}
