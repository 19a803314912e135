//! GET /account/system/version, /account/system/check and /account/file/{filename}.

use bytes::Bytes;
use serde_json::json;

use super::AccountResponse;
use crate::app::App;
use crate::error::ApiError;

pub fn version() -> AccountResponse {
    // The API bounds `major` to 1..100: a 0.x crate reports major 1 until it is 1.0.
    let major: u64 = env!("CARGO_PKG_VERSION_MAJOR")
        .parse::<u64>()
        .unwrap_or(1)
        .max(1);
    let minor: u64 = env!("CARGO_PKG_VERSION_MINOR")
        .parse::<u64>()
        .unwrap_or(0)
        .min(111);
    AccountResponse::json(
        &json!({"major": major, "minor": minor, "build": env!("CARGO_PKG_VERSION")}),
    )
}

/// 1 when the store answers and takes writes and every upstream accepts a connection; each
/// failing part takes its share off.
pub async fn check(app: &App) -> AccountResponse {
    let mut parts = 1usize;
    let mut healthy = usize::from(app.store.healthy() && !app.writer.failing());
    for upstream in &app.config.upstreams {
        parts += 1;
        let wait = upstream
            .connect_timeout
            .min(std::time::Duration::from_millis(500));
        let reachable = matches!(
            tokio::time::timeout(wait, tokio::net::TcpStream::connect(upstream.address)).await,
            Ok(Ok(_))
        );
        healthy += usize::from(reachable);
    }
    let health = healthy as f64 / parts as f64;
    AccountResponse::json(&json!({ "health": (health * 1000.0).round() / 1000.0 }))
}

/// Whether `name` is a plain name of an HTML document: 6..128 characters of letters, digits,
/// `_`, `-`, `.`, not starting with a dot, ending in `.html` or `.htm`, with no separators in
/// any encoding. Only documents are served: whatever else an operator leaves in the folder (a
/// config, a key) stays private.
fn is_plain_name(name: &str) -> bool {
    (6..=128).contains(&name.chars().count())
        && !name.starts_with('.')
        && (name.ends_with(".html") || name.ends_with(".htm"))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.contains("..")
}

pub fn file(app: &App, raw_name: &str) -> Result<AccountResponse, ApiError> {
    // Names are checked after decoding, so %2e%2e%2f and friends are refused like ../ is.
    let name = percent_encoding::percent_decode_str(raw_name).decode_utf8_lossy();
    if !is_plain_name(&name) {
        return Err(ApiError::not_found(raw_name.to_string()));
    }
    let not_found = || ApiError::not_found(raw_name.to_string());
    // A link in the folder is served only when it stays inside it: one to /etc/passwd, or to
    // a file beside the folder, is not documentation.
    let dir = std::fs::canonicalize(&app.config.docs_dir).map_err(|_| not_found())?;
    let path = std::fs::canonicalize(dir.join(name.as_ref())).map_err(|_| not_found())?;
    if !path.starts_with(&dir) {
        return Err(not_found());
    }
    let body = std::fs::read(&path).map_err(|_| not_found())?;
    Ok(AccountResponse::file(
        "text/html; charset=utf-8",
        Bytes::from(body),
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::is_plain_name;

    #[test]
    fn only_plain_names_pass() {
        assert!(is_plain_name("file_en.html"));
        assert!(is_plain_name("guide.htm"));
        for bad in [
            "a.htm",
            "../etc/passwd",
            "..%2fetc",
            "a/b/c.html",
            ".hidden.html",
            "file\\en.html",
            "file..html",
            "файл_en.html",
            "jwt-secret",
            "tollgate.toml",
            "file_en.html.bak",
        ] {
            assert!(!is_plain_name(bad), "{bad}");
        }
        assert!(!is_plain_name(&"a".repeat(129)));
    }
}
