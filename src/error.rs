//! The one error type of Tollgate's HTTP surface, and its rendering: every error becomes a
//! status plus a JSON body carrying complete tracedata (404 has its own shape), in one place.

use serde_json::json;

use crate::trace::Tracedata;

/// An error answer: status, human-readable message, and what the shape needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// For 404: the resource asked for (the 404 body names it instead of a message).
    pub resource_id: Option<String>,
    /// For 429 (and 503): seconds the caller should wait.
    pub retry_after_seconds: Option<u64>,
    /// For 405: the methods the resource serves.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            resource_id: None,
            retry_after_seconds: None,
            allow: None,
        }
    }

    /// 400 naming the field and the rule it broke.
    pub fn invalid(field: &str, rule: impl std::fmt::Display) -> Self {
        Self::new(400, format!("{field}: {rule}"))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, message)
    }

    pub fn payment_required(message: impl Into<String>) -> Self {
        Self::new(402, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, message)
    }

    pub fn not_found(resource_id: impl Into<String>) -> Self {
        let resource_id = resource_id.into();
        ApiError {
            status: 404,
            message: format!("{resource_id} not found"),
            resource_id: Some(resource_id),
            retry_after_seconds: None,
            allow: None,
        }
    }

    pub fn too_many(message: impl Into<String>, retry_after_seconds: u64) -> Self {
        ApiError {
            retry_after_seconds: Some(retry_after_seconds.max(1)),
            ..Self::new(429, message)
        }
    }

    /// Tollgate itself is momentarily behind (503): the caller may retry after the wait.
    pub fn unavailable(message: impl Into<String>, retry_after_seconds: u64) -> Self {
        ApiError {
            retry_after_seconds: Some(retry_after_seconds.max(1)),
            ..Self::new(503, message)
        }
    }

    /// 405: the resource exists, but not for this method; `allow` lists those it serves.
    pub fn method_not_allowed(method: &http::Method, allow: &'static str) -> Self {
        ApiError {
            allow: Some(allow),
            ..Self::new(
                405,
                format!("method: {method} is not served here; use {allow}"),
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// The header fields that go with this error's status: `Retry-After` for a wait, and
    /// for a 401 the scheme that would be accepted (RFC 9110 11.6.1: a 401 must name one).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(s) = self.retry_after_seconds {
            headers.push(("Retry-After", s.to_string()));
        }
        if self.status == 401 {
            headers.push(("WWW-Authenticate", "Bearer".to_string()));
        }
        if let Some(allow) = self.allow {
            headers.push(("Allow", allow.to_string()));
        }
        headers
    }

    /// The JSON body for this error with the call's tracedata.
    pub fn body(&self, trace: &Tracedata) -> Vec<u8> {
        let value = match (&self.resource_id, self.status) {
            (Some(id), 404) => json!({"resource_id": id, "detail": {"tracedata": trace}}),
            _ => json!({"tracedata": trace, "message": self.message}),
        };
        serde_json::to_vec(&value).expect("error bodies always serialise")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceName;
    use chrono::Utc;

    fn trace() -> Tracedata {
        Tracedata {
            code: uuid::Uuid::nil(),
            client: "anonymous".into(),
            server: "t1".into(),
            service: ServiceName::ACCOUNT,
            operation: "token_generation".into(),
            time: crate::trace::in_timezone(Utc::now(), 0),
        }
    }

    #[test]
    fn general_errors_carry_message_and_tracedata() {
        let body: serde_json::Value = serde_json::from_slice(
            &ApiError::invalid("ttl_seconds", "must be >= 60").body(&trace()),
        )
        .unwrap();
        assert_eq!(body["message"], "ttl_seconds: must be >= 60");
        assert_eq!(body["tracedata"]["service"], "ACCOUNT");
        assert_eq!(body["tracedata"]["client"], "anonymous");
    }

    #[test]
    fn not_found_uses_the_resource_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&ApiError::not_found("abc").body(&trace())).unwrap();
        assert_eq!(body["resource_id"], "abc");
        assert_eq!(body["detail"]["tracedata"]["server"], "t1");
        assert!(body.get("message").is_none());
    }
}
