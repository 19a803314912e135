//! The account API (/account/*), served by Tollgate itself: tokens and passwords (`identity`),
//! usage (`usage`: quota, statistics, report, audit, captured data) and the system endpoints
//! (`system`). It takes a parsed request and returns a complete response; pingora stays in
//! `proxy`. Every error carries tracedata with service ACCOUNT.

mod identity;
mod system;
mod usage;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::app::App;
use crate::error::ApiError;
use crate::model::ServiceName;
use crate::store::UserRecord;
use crate::trace::{self, Tracedata};

pub struct AccountRequest<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub query: &'a str,
    pub authorization: Option<&'a [u8]>,
    pub content_type: Option<&'a [u8]>,
    /// The codings the caller takes (`Accept-Encoding`), for captures served as they came.
    pub accept_encoding: Option<&'a [u8]>,
    /// The body, or why it could not be read (too large, malformed chunks, the client stopped
    /// sending): the error an operation that reads a body answers with.
    pub body: Result<Bytes, ApiError>,
    pub client_ip: Option<IpAddr>,
    pub code: Uuid,
}

pub struct AccountResponse {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl AccountResponse {
    fn json<T: serde::Serialize>(value: &T) -> AccountResponse {
        AccountResponse {
            status: 200,
            content_type: "application/json".into(),
            headers: Vec::new(),
            body: Bytes::from(serde_json::to_vec(value).expect("API models always serialise")),
        }
    }

    fn file(content_type: &str, body: Bytes, filename: Option<String>) -> AccountResponse {
        AccountResponse {
            status: 200,
            content_type: content_type.into(),
            headers: filename
                .map(|f| {
                    vec![(
                        "Content-Disposition",
                        format!("attachment; filename=\"{f}\""),
                    )]
                })
                .unwrap_or_default(),
            body,
        }
    }
}

/// A request in progress; operations are named as the official client names its methods: who asked (once known) and which operation, for tracedata.
struct Call<'a> {
    app: &'a App,
    req: AccountRequest<'a>,
    operation: &'static str,
    user: Option<Arc<UserRecord>>,
    /// The username tried at login, for the error's `client` before anyone is authenticated.
    tried: Option<String>,
}

impl Call<'_> {
    fn caller(&mut self) -> Result<Arc<UserRecord>, ApiError> {
        let user = self.app.authority.authenticate(self.req.authorization)?;
        self.user = Some(user.clone());
        Ok(user)
    }

    fn body<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(self.raw_body()?)
    }

    fn raw_body(&self) -> Result<&Bytes, ApiError> {
        self.req.body.as_ref().map_err(Clone::clone)
    }

    /// The query's parameters; a name given twice is refused rather than one of its values
    /// picked silently.
    fn query(&self) -> Result<Vec<(String, String)>, ApiError> {
        let query = parse_query(self.req.query)
            .map_err(|name| ApiError::invalid(&name, "must be UTF-8 once percent-decoded"))?;
        for (i, (name, _)) in query.iter().enumerate() {
            if query[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(ApiError::invalid(name, "given more than once"));
            }
        }
        Ok(query)
    }

    fn tracedata(&self) -> Tracedata {
        let (client, tz) = match (&self.user, &self.tried) {
            (Some(u), _) => (trace::client_label(&u.company_key, &u.username), u.timezone),
            // Only a name that could be an account's: the client reads `client` as `\w+`.
            (None, Some(name))
                if name.len() >= 2 && name.len() <= 256 && crate::model::is_word(name) =>
            {
                (name.clone(), 0)
            }
            _ => (trace::ANONYMOUS.to_string(), 0),
        };
        Tracedata {
            code: self.req.code,
            client,
            server: self.app.config.server.name.clone(),
            service: ServiceName::ACCOUNT,
            operation: self.operation.into(),
            time: trace::in_timezone(Utc::now(), tz),
        }
    }
}

/// Parses JSON into `T`, naming the field and the rule when it does not fit.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // The request models are objects; serde would also fill one from an array, in order.
    if body.trim_ascii_start().first() == Some(&b'[') {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A number too large for any type is a syntax error to serde_json, but its field is
        // known and is the better name.
        let out_of_range = inner.to_string().starts_with("number out of range");
        let field = if path == "."
            || path.contains('?')
            || path.is_empty()
            || inner.is_eof()
            || (inner.is_syntax() && !out_of_range)
        {
            "body".to_string()
        } else {
            path
        };
        let rule = inner.to_string();
        // serde_json appends " at line L column C"; the field name says more to a caller.
        let rule = rule.split(" at line ").next().unwrap_or(&rule);
        // A missing field is named as the field, not as the object that lacks it.
        if let Some(missing) = rule
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            let missing = match field.as_str() {
                "body" => missing.to_string(),
                object => format!("{object}.{missing}"),
            };
            return ApiError::invalid(&missing, "is required");
        }
        // An integer beyond the field's 64 bits: "invalid value: integer N, expected i64", or,
        // beyond any 64 bits, "invalid type: floating point" (serde_json reads it as a float),
        // would read as if N were not an integer.
        let number = rule
            .strip_prefix("invalid value: integer `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(number, _)| number.to_string())
            .or_else(|| {
                rule.starts_with("invalid type: floating point")
                    .then(|| integer_ending_at(body, inner.line(), inner.column()))
                    .flatten()
            });
        if let Some(number) = number {
            return ApiError::invalid(&field, format!("{number} is out of range"));
        }
        ApiError::invalid(&field, plain_json_types(rule))
    })?;
    // One JSON value and only whitespace after it: a second object or stray bytes are not
    // silently ignored.
    de.end()
        .map_err(|_| ApiError::invalid("body", "trailing characters after the JSON value"))?;
    Ok(value)
}

/// The integer literal (digits, perhaps after '-') that ends at 1-based `line` and `column`
/// of `body`, where serde_json reports a value it could not take; None for any other token.
fn integer_ending_at(body: &[u8], line: usize, column: usize) -> Option<String> {
    let line_start = if line <= 1 {
        0
    } else {
        body.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(line - 2)?
            .0
            + 1
    };
    let end = (line_start + column).min(body.len());
    let start = body[..end]
        .iter()
        .rposition(|b| !(b.is_ascii_digit() || b"-+.eE".contains(b)))
        .map_or(0, |i| i + 1);
    let token = std::str::from_utf8(&body[start..end]).ok()?;
    let digits = token.strip_prefix('-').unwrap_or(token);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| token.to_string())
}

/// serde's message with its Rust type names ("expected i64", "expected struct AccountInfo")
/// in JSON's words.
fn plain_json_types(rule: &str) -> String {
    let Some((before, expected)) = rule.split_once("expected ") else {
        return rule.to_string();
    };
    let json = if expected.starts_with("struct ") || expected.starts_with("map") {
        "a JSON object"
    } else if let Some(kind) = ["i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"]
        .iter()
        .find(|t| expected == **t || expected.starts_with(&format!("{t} ")))
    {
        if kind.starts_with('u') {
            "a non-negative integer"
        } else {
            "an integer"
        }
    } else if expected.starts_with("f64") || expected.starts_with("f32") {
        "a number"
    } else if expected.starts_with("a boolean") || expected.starts_with("bool") {
        "true or false"
    } else {
        return rule.to_string();
    };
    format!("{before}expected {json}")
}

/// Query pairs, percent-decoded (`+` as space).
///
/// # Errors
///
/// The name (as far as it decodes) of the first pair whose name or value is not UTF-8 once
/// decoded: such a value is refused rather than matched with replacement characters.
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8()
                    .map(|d| d.into_owned())
            };
            let lossy = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            match (decode(k), decode(v)) {
                (Ok(k), Ok(v)) => Ok((k, v)),
                _ => Err(lossy(k)),
            }
        })
        .collect()
}

/// Checks a string's length in characters.
fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n < min || n > max {
        return Err(ApiError::invalid(
            field,
            format!("must be {min}..{max} characters, got {n}"),
        ));
    }
    Ok(())
}

/// Checks a stored text field: its length, and no control characters (NUL, BEL, line breaks
/// and the like have no place in a name, an e-mail address or a phone number).
fn check_text(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    check_len(field, value, min, max)?;
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be blank"));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_word(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    check_len(field, value, min, max)?;
    if !crate::model::is_word(value) {
        return Err(ApiError::invalid(
            field,
            "must match \\w+ (letters, digits, underscore)",
        ));
    }
    Ok(())
}

/// Serves one account API request.
pub async fn handle(app: &App, req: AccountRequest<'_>) -> AccountResponse {
    let method = req.method.clone();
    let path = req.path.to_string();
    let mut call = Call {
        app,
        req,
        operation: "account",
        user: None,
        tried: None,
    };
    let result = route(&mut call, &method, &path).await;
    match result {
        Ok(response) => response,
        Err(error) => {
            // An error before the operation looked at the token (no such operation, a bad
            // query) still names a caller whose token is good.
            if call.user.is_none() {
                call.user = app.authority.authenticate(call.req.authorization).ok();
            }
            let body = error.body(&call.tracedata());
            let headers = error.headers();
            AccountResponse {
                status: error.status,
                content_type: "application/json".into(),
                headers,
                body: Bytes::from(body),
            }
        }
    }
}

async fn route(
    call: &mut Call<'_>,
    method: &http::Method,
    path: &str,
) -> Result<AccountResponse, ApiError> {
    use http::Method as M;
    let rest = path.strip_prefix("/account/").unwrap_or("");
    let endpoint = |op: &'static str, call: &mut Call<'_>| call.operation = op;
    match (method, rest) {
        (&M::POST, "token/generation") => {
            endpoint("run_token_generation", call);
            identity::token_generation(call).await
        }
        (&M::POST, "token/validation") => {
            endpoint("run_token_validation", call);
            identity::token_validation(call)
        }
        (&M::POST, "password") => {
            endpoint("change_password", call);
            identity::password_change(call).await
        }
        (&M::GET, "info") => {
            endpoint("read_info", call);
            identity::info_get(call)
        }
        (&M::PUT, "info") => {
            endpoint("update_info", call);
            identity::info_put(call)
        }
        (&M::GET, "quota") => {
            endpoint("read_quota", call);
            usage::quota(call)
        }
        (&M::GET, "statistics") => {
            endpoint("generate_statistics", call);
            usage::statistics(call).await
        }
        (&M::GET, "report") => {
            endpoint("read_report", call);
            usage::report(call).await
        }
        (&M::GET, "audit") => {
            endpoint("read_audit", call);
            usage::audit(call).await
        }
        (&M::GET, r) if r.starts_with("data/") => {
            endpoint("read_data", call);
            usage::data(call, &r["data/".len()..]).await
        }
        (&M::GET, "system/version") => {
            endpoint("version", call);
            Ok(system::version())
        }
        (&M::GET, "system/check") => {
            endpoint("check", call);
            Ok(system::check(call.app).await)
        }
        (&M::GET, r) if r.starts_with("file/") => {
            endpoint("file", call);
            system::file(call.app, &r["file/".len()..])
        }
        (method, rest) => {
            endpoint("account_lookup", call);
            Err(match allowed_methods(rest) {
                Some(allow) => ApiError::method_not_allowed(method, allow),
                None => ApiError::not_found(path.to_string()),
            })
        }
    }
}

/// The methods an account API resource serves (the `Allow` of a 405), `None` for a path that
/// is none of its resources. Reads also serve HEAD.
pub fn allowed_methods(rest: &str) -> Option<&'static str> {
    match rest {
        "token/generation" | "token/validation" | "password" => Some("POST"),
        "info" => Some("GET, HEAD, PUT"),
        "quota" | "statistics" | "report" | "audit" | "system/version" | "system/check" => {
            Some("GET, HEAD")
        }
        r if r.starts_with("data/") || r.starts_with("file/") => Some("GET, HEAD"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Req {
        username: String,
        ttl_seconds: Option<i64>,
    }

    #[test]
    fn text_fields_must_say_something() {
        assert_eq!(
            check_text("name", "   ", 2, 256).unwrap_err().message,
            "name: must not be blank"
        );
        assert!(check_text("name", " Jo ", 2, 256).is_ok());
    }

    #[test]
    fn a_number_out_of_range_names_its_field() {
        let e = parse_json::<Req>(br#"{"username": "a", "ttl_seconds": 1e400}"#).unwrap_err();
        assert_eq!(e.message, "ttl_seconds: number out of range");
    }

    #[test]
    fn json_errors_name_the_field_and_rule() {
        let e = parse_json::<Req>(br#"{"username": 5}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.starts_with("username: invalid type"),
            "{}",
            e.message
        );
        let e = parse_json::<Req>(br#"{"ttl_seconds": 5}"#).unwrap_err();
        assert_eq!(e.message, "username: is required");
        let e = parse_json::<Req>(br#"{"username": "a1", "ttl_seconds": 18446744073709551615}"#)
            .unwrap_err();
        assert_eq!(
            e.message,
            "ttl_seconds: 18446744073709551615 is out of range"
        );
        for (number, pretty) in [
            ("18446744073709551616", false),
            ("-9223372036854775809", false),
            ("100000000000000000000000000000", true),
        ] {
            let body = if pretty {
                format!("{{\n  \"username\": \"a1\",\n  \"ttl_seconds\": {number}\n}}")
            } else {
                format!(r#"{{"username": "a1", "ttl_seconds": {number}}}"#)
            };
            let e = parse_json::<Req>(body.as_bytes()).unwrap_err();
            assert_eq!(e.message, format!("ttl_seconds: {number} is out of range"));
        }
        // A number written as a float is not an integer, however large.
        let e = parse_json::<Req>(br#"{"username": "a1", "ttl_seconds": 1e30}"#).unwrap_err();
        assert!(e.message.contains("expected an integer"), "{}", e.message);
        let e = parse_json::<Req>(br#""just a string""#).unwrap_err();
        assert!(
            e.message.starts_with("body: invalid type: string"),
            "{}",
            e.message
        );
        let e = parse_json::<Req>(b"{not json").unwrap_err();
        assert!(e.message.starts_with("body: "), "{}", e.message);
        for trailing in [
            &br#"{"username": "a1"} xx"#[..],
            br#"{"username": "a1"}{"username": "b2"}"#,
            b"{\"username\": \"a1\"}\x00\xff",
        ] {
            let e = parse_json::<Req>(trailing).unwrap_err();
            assert_eq!(
                e.message, "body: trailing characters after the JSON value",
                "{trailing:?}"
            );
        }
        assert!(parse_json::<Req>(b"{\"username\": \"a1\"} \r\n\t ").is_ok());
    }

    #[test]
    fn json_errors_speak_of_json_types_not_rust_ones() {
        let e = parse_json::<Req>(br#"{"username": "a1", "ttl_seconds": "soon"}"#).unwrap_err();
        assert_eq!(
            e.message,
            r#"ttl_seconds: invalid type: string "soon", expected an integer"#
        );
        let e = parse_json::<Req>(br#""just a string""#).unwrap_err();
        assert_eq!(
            e.message,
            r#"body: invalid type: string "just a string", expected a JSON object"#
        );
        let e = parse_json::<Req>(br#"{"username": true}"#).unwrap_err();
        assert_eq!(
            e.message,
            "username: invalid type: boolean `true`, expected a string"
        );
    }

    #[test]
    fn query_pairs_are_decoded() {
        assert_eq!(
            parse_query("limit=10&operation_id=%ff%fe"),
            Err("operation_id".into())
        );
        assert_eq!(parse_query("a%ff=1"), Err("a\u{fffd}".into()));
        assert_eq!(
            parse_query("from=2025-01-02T03%3A04%3A05%2B0300&limit=10&x"),
            Ok(vec![
                ("from".into(), "2025-01-02T03:04:05+0300".into()),
                ("limit".into(), "10".into()),
                ("x".into(), "".into())
            ])
        );
    }
}
