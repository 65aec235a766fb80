//! Authentication of HTTP Subscriber endpoints: the bearer token a Subscriber's `tokenSecret`
//! holds, and its comparison with what a caller presents, in constant time so the answer's
//! timing does not reveal how much of a guess was right.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

/// Reads the token (key `token`, surrounding whitespace trimmed: files written by editors and
/// `echo` end in a newline) from Secret `secret` in `namespace`.
pub async fn read_token(client: &Client, namespace: &str, secret: &str) -> Result<String, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let s = api
        .get(secret)
        .await
        .map_err(|e| format!("reading token Secret {secret}: {e}"))?;
    let token = s
        .data
        .and_then(|d| d.get("token").cloned())
        .ok_or_else(|| format!("token Secret {secret} has no key \"token\""))?;
    String::from_utf8(token.0)
        .map(|t| t.trim().to_string())
        .map_err(|_| format!("token in Secret {secret} is not UTF-8"))
}

/// Whether a caller presenting `bearer` may post to an endpoint that requires `token` (an
/// endpoint without a token is open).
pub fn authorized(token: Option<&str>, bearer: Option<&str>) -> bool {
    match token {
        None => true,
        Some(token) => bearer.is_some_and(|b| constant_time_eq(b.as_bytes(), token.as_bytes())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_exact_match() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn an_endpoint_with_a_token_needs_that_token() {
        assert!(authorized(None, None));
        assert!(authorized(None, Some("anything")));
        assert!(authorized(Some("s3cret"), Some("s3cret")));
        assert!(!authorized(Some("s3cret"), None));
        assert!(!authorized(Some("s3cret"), Some("")));
        assert!(!authorized(Some("s3cret"), Some("s3cre")));
    }
}
