//! Tracing a call through Tollgate: the tracecode every call carries, the tracedata block every
//! answer and audit record quotes, and the stage an exchange occupies within a process.
//! Capturing bodies happens in `proxy`; storing them is `store`'s.

use std::sync::Arc;

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use uuid::Uuid;

use crate::model::ServiceName;

/// Stages a process keeps: 0, 1, 2, and 3 for the latest exchange from the fourth on.
pub const MAX_STAGE: u8 = 3;

/// The stage the `exchange_index`-th exchange (0-based) of a process is stored under: later
/// exchanges overwrite stage 3, so stage 3 always holds the latest (a polled final result).
pub fn stage_of(exchange_index: u32) -> u8 {
    exchange_index.min(MAX_STAGE as u32) as u8
}

/// A fresh tracecode for a new process.
pub fn new_tracecode() -> Uuid {
    Uuid::new_v4()
}

/// The longest `client` the API's Tracedata allows.
pub const MAX_CLIENT_CHARS: usize = 256;

const CLIENT_SEPARATOR: &str = "_|_";

/// Characters in the whole `company_|_username` label, before any shortening.
pub fn client_label_chars(company_key: &str, username: &str) -> usize {
    company_key.chars().count() + CLIENT_SEPARATOR.len() + username.chars().count()
}

/// Whether an account's company key and username make a tracedata client label that fits
/// [`MAX_CLIENT_CHARS`]; the rule, to be reported against the company key, when they do not.
/// Every way of making or changing an account holds to it, so labels are never cut.
pub fn check_client_label(company_key: &str, username: &str) -> Result<(), String> {
    let label = client_label_chars(company_key, username);
    if label > MAX_CLIENT_CHARS {
        return Err(format!(
            "with the username, the tracedata client company_key_|_username must be at most \
             {MAX_CLIENT_CHARS} characters ({label} here)"
        ));
    }
    Ok(())
}

/// `company_|_username`. Both parts may be 256 characters, the label at most
/// [`MAX_CLIENT_CHARS`]: a label that would be longer (only accounts made before the account
/// API refused such pairs) keeps the username whole and as much of the company key as fits.
pub fn client_label(company_key: &str, username: &str) -> String {
    // Bytes bound characters: the common label needs no counting (it is made on every call).
    if company_key.len() + CLIENT_SEPARATOR.len() + username.len() <= MAX_CLIENT_CHARS {
        return format!("{company_key}{CLIENT_SEPARATOR}{username}");
    }
    let room = MAX_CLIENT_CHARS.saturating_sub(CLIENT_SEPARATOR.len() + username.chars().count());
    let company: String = company_key.chars().take(room.max(1)).collect();
    let mut label = format!("{company}{CLIENT_SEPARATOR}{username}");
    if label.chars().count() > MAX_CLIENT_CHARS {
        label = label.chars().take(MAX_CLIENT_CHARS).collect();
    }
    label
}

/// The caller's label before anyone is authenticated.
pub const ANONYMOUS: &str = "anonymous";

/// The block every error body and audit action carries, so a user can quote one code.
#[derive(Debug, Clone, Serialize)]
pub struct Tracedata {
    pub code: Uuid,
    pub client: String,
    pub server: Arc<str>,
    pub service: ServiceName,
    pub operation: Arc<str>,
    #[serde(serialize_with = "serialize_time")]
    pub time: DateTime<FixedOffset>,
}

fn serialize_time<S: Serializer>(t: &DateTime<FixedOffset>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

/// RFC 3339 with the offset spelled `+03:00` and whole seconds, as the API's examples show.
pub fn format_time(t: &DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, false)
}

/// A UTC instant seen from a user's timezone (hours east of UTC, -12..12).
pub fn in_timezone(t: DateTime<Utc>, utc_offset_hours: i32) -> DateTime<FixedOffset> {
    let offset = FixedOffset::east_opt(utc_offset_hours.clamp(-12, 12) * 3600)
        .unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero offset is valid"));
    t.with_timezone(&offset)
}

/// Who owns a process and how many exchanges it has had. The store holds the durable copy;
/// this is the working set, so a follow-up that arrives before the next store flush still
/// finds its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEntry {
    pub owner: Arc<str>,
    pub company_key: Arc<str>,
    /// UTC day of the first exchange.
    pub day: i32,
    pub exchanges: u32,
    last_used: std::time::Instant,
}

const SHARDS: usize = 32;
const SHARD_SOFT_CAP: usize = 4096;
const IDLE_EVICT: std::time::Duration = std::time::Duration::from_secs(600);

/// The in-memory map of recent processes, sharded so that calls do not queue on one lock.
pub struct ProcessRegistry {
    shards: Vec<parking_lot::Mutex<std::collections::HashMap<Uuid, ProcessEntry>>>,
}

impl Default for ProcessRegistry {
    fn default() -> Self {
        ProcessRegistry {
            shards: (0..SHARDS).map(|_| Default::default()).collect(),
        }
    }
}

/// The owner check of a follow-up failed: the process is unknown or someone else's.
#[derive(Debug, PartialEq, Eq)]
pub struct NotYours;

impl ProcessRegistry {
    fn shard(
        &self,
        code: &Uuid,
    ) -> &parking_lot::Mutex<std::collections::HashMap<Uuid, ProcessEntry>> {
        &self.shards[code.as_bytes()[15] as usize % SHARDS]
    }

    /// Registers the first exchange of a new process; returns its entry (exchanges = 1).
    pub fn start(&self, code: Uuid, owner: &str, company_key: &str, day: i32) -> ProcessEntry {
        let entry = ProcessEntry {
            owner: owner.into(),
            company_key: company_key.into(),
            day,
            exchanges: 1,
            last_used: std::time::Instant::now(),
        };
        let mut shard = self.shard(&code).lock();
        if shard.len() >= SHARD_SOFT_CAP {
            // Evict so that at least half the shard is free again: the scan then happens once
            // per SHARD_SOFT_CAP / 2 inserts, not on every one. Evicted processes are still in
            // the store, where a follow-up finds them.
            let now = std::time::Instant::now();
            shard.retain(|_, e| now.duration_since(e.last_used) < IDLE_EVICT);
            if shard.len() >= SHARD_SOFT_CAP / 2 {
                let mut ages: Vec<std::time::Instant> =
                    shard.values().map(|e| e.last_used).collect();
                let middle = ages.len() / 2;
                let (_, cutoff, _) = ages.select_nth_unstable(middle);
                let cutoff = *cutoff;
                shard.retain(|_, e| e.last_used > cutoff);
            }
        }
        shard.insert(code, entry.clone());
        entry
    }

    /// Checks that `caller` (or anyone when `admin`) may follow up an existing process, loading
    /// it with `load` when it is not in memory, and returns it as it stands (the exchange is
    /// counted by [`ProcessRegistry::advance`] once it is sent on). Anyone else: NotYours.
    pub fn follow_up(
        &self,
        code: Uuid,
        caller: &str,
        admin: bool,
        load: impl FnOnce() -> Option<(String, String, i32, u32)>,
    ) -> Result<ProcessEntry, NotYours> {
        let mut shard = self.shard(&code).lock();
        let entry = match shard.entry(code) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let (owner, company_key, day, exchanges) = load().ok_or(NotYours)?;
                v.insert(ProcessEntry {
                    owner: owner.into(),
                    company_key: company_key.into(),
                    day,
                    exchanges,
                    last_used: std::time::Instant::now(),
                })
            }
        };
        if !admin && &*entry.owner != caller {
            return Err(NotYours);
        }
        entry.last_used = std::time::Instant::now();
        Ok(entry.clone())
    }

    /// Counts an exchange of a followed-up process as sent on and returns the process with it
    /// counted. `seen` is what [`ProcessRegistry::follow_up`] returned, put back should the
    /// process have been evicted from memory since.
    pub fn advance(&self, code: Uuid, seen: ProcessEntry) -> ProcessEntry {
        let mut shard = self.shard(&code).lock();
        let entry = shard.entry(code).or_insert(seen);
        entry.exchanges += 1;
        entry.last_used = std::time::Instant::now();
        entry.clone()
    }
}

/// What stands in stored captures where a redacted value was.
pub const REDACTED: &str = "***";

/// Replaces the values at `pointers` in a captured `payload` by [`REDACTED`] (quoted), for
/// what is stored (never for what is forwarded).
///
/// The text is copied token by token: everything else stays byte for byte as sent (member
/// order, numbers, escapes, whitespace), and a body no pointer names is kept as it is. Text
/// that is not JSON (UTF-8 that does not start, after byte order marks and whitespace, with
/// `{` or `[`) is kept as it is: there is nothing to point into. Bytes that are not such text
/// (compressed, UTF-16, binary) are not stored at all, and marked truncated: the upstream may
/// read JSON in them that cannot be masked here. JSON that ends or breaks part way (a capture
/// cut at `max_capture_bytes`, trailing text, a second document) is masked as
/// far as it can be read and cut where it stops being JSON, and marked truncated: a value that
/// could not be read as JSON is never stored, so no redacted value reaches the store whole.
/// What is stored never passes `max_bytes` (a short value's mask is longer than the value).
///
/// A coded body (`Content-Encoding` gzip or deflate) is read decoded. When nothing in it is
/// masked and it decodes whole, it is kept as sent; otherwise what is stored is the decoded
/// text, masked, without its coding (a cut stream's undecoded tail could hold a value). A body
/// in a coding that cannot be read is not stored.
pub fn redact(payload: &mut crate::store::Payload, pointers: &[String], max_bytes: usize) {
    use crate::coding::{self, Codings};
    if pointers.is_empty() {
        return;
    }
    let Some(field) = payload.content_encoding.as_deref() else {
        return redact_plain(payload, pointers, max_bytes);
    };
    let Codings::Readable(codings) = Codings::of_field(field) else {
        payload.body = bytes::Bytes::new();
        payload.truncated = true;
        payload.content_encoding = None;
        return;
    };
    let (decoded, whole) = coding::decode_prefix(&codings, &payload.body, max_bytes);
    let decoded = bytes::Bytes::from(decoded);
    let mut plain = crate::store::Payload {
        content_type: payload.content_type.clone(),
        content_encoding: None,
        truncated: payload.truncated || !whole,
        body: decoded.clone(),
    };
    redact_plain(&mut plain, pointers, max_bytes);
    if !whole || plain.truncated != payload.truncated || plain.body != decoded {
        *payload = plain;
    }
}

fn redact_plain(payload: &mut crate::store::Payload, pointers: &[String], max_bytes: usize) {
    let body = &payload.body[..];
    let start = skip_bom_and_whitespace(body);
    if !matches!(body.get(start), Some(b'{' | b'[')) {
        // Text that is not JSON has nothing to point into. Bytes that are not text (compressed,
        // UTF-16, binary) may still be JSON to the upstream, and cannot be redacted here: they
        // are not stored.
        // (A capture cut at max_capture_bytes may end inside a character.)
        let text = match std::str::from_utf8(body) {
            Ok(text) => !text.contains('\0'),
            Err(e) => e.error_len().is_none() && !body[..e.valid_up_to()].contains(&0),
        };
        if !text {
            payload.body = bytes::Bytes::new();
            payload.truncated = true;
        }
        return;
    }
    let mut p = PartialJson {
        src: body,
        pos: start,
        out: Vec::with_capacity(body.len()),
        pointers,
        masked: false,
    };
    p.out.extend_from_slice(&body[..start]);
    let mut path = String::new();
    // Err: the text ended or broke; `out` holds what was read up to there, masked.
    let read = p.value(&mut path, 0).is_ok() && {
        p.copy_whitespace();
        p.pos == body.len()
    };
    if read && !p.masked {
        return;
    }
    let mut out = p.out;
    let mut cut = !read;
    if out.len() > max_bytes {
        out.truncate(max_bytes);
        cut = true;
    }
    payload.body = bytes::Bytes::from(out);
    payload.truncated |= cut;
}

/// Where JSON text would start: after any byte order marks and whitespace.
fn skip_bom_and_whitespace(body: &[u8]) -> usize {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let mut at = 0;
    loop {
        if body[at..].starts_with(BOM) {
            at += BOM.len();
        } else if body.get(at).is_some_and(u8::is_ascii_whitespace) {
            at += 1;
        } else {
            return at;
        }
    }
}

/// Deepest nesting [`redact`] follows; deeper text is cut off.
const MAX_REDACT_DEPTH: usize = 128;

/// JSON text copied token by token, with the values `pointers` name masked: stops at the
/// first byte that is not JSON.
struct PartialJson<'a> {
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    pointers: &'a [String],
    /// A value was masked.
    masked: bool,
}

/// The text ended, or stopped being JSON.
struct Stop;

impl PartialJson<'_> {
    fn peek(&self) -> Result<u8, Stop> {
        self.src.get(self.pos).copied().ok_or(Stop)
    }

    fn copy_whitespace(&mut self) {
        while let Some(b) = self.src.get(self.pos).filter(|b| b.is_ascii_whitespace()) {
            self.out.push(*b);
            self.pos += 1;
        }
    }

    fn copy_byte(&mut self, want: u8) -> Result<(), Stop> {
        if self.peek()? != want {
            return Err(Stop);
        }
        self.out.push(want);
        self.pos += 1;
        Ok(())
    }

    fn value(&mut self, path: &mut String, depth: usize) -> Result<(), Stop> {
        self.copy_whitespace();
        if self.pointers.iter().any(|p| p == path) {
            self.masked = true;
            self.out.push(b'"');
            self.out.extend_from_slice(REDACTED.as_bytes());
            self.out.push(b'"');
            return self.skip_value();
        }
        if depth >= MAX_REDACT_DEPTH {
            return Err(Stop);
        }
        match self.peek()? {
            b'{' => self.object(path, depth),
            b'[' => self.array(path, depth),
            b'"' => self.copy_string().map(|_| ()),
            _ => self.copy_scalar(),
        }
    }

    fn object(&mut self, path: &mut String, depth: usize) -> Result<(), Stop> {
        self.copy_byte(b'{')?;
        self.copy_whitespace();
        if self.peek()? == b'}' {
            return self.copy_byte(b'}');
        }
        loop {
            self.copy_whitespace();
            let key_text = self.copy_string()?;
            let key: String = serde_json::from_slice(key_text).map_err(|_| Stop)?;
            self.copy_whitespace();
            self.copy_byte(b':')?;
            let len = path.len();
            path.push('/');
            path.push_str(&key.replace('~', "~0").replace('/', "~1"));
            self.value(path, depth + 1)?;
            path.truncate(len);
            self.copy_whitespace();
            match self.peek()? {
                b',' => self.copy_byte(b',')?,
                b'}' => return self.copy_byte(b'}'),
                _ => return Err(Stop),
            }
        }
    }

    fn array(&mut self, path: &mut String, depth: usize) -> Result<(), Stop> {
        self.copy_byte(b'[')?;
        self.copy_whitespace();
        if self.peek()? == b']' {
            return self.copy_byte(b']');
        }
        for index in 0usize.. {
            let len = path.len();
            path.push('/');
            path.push_str(&index.to_string());
            self.value(path, depth + 1)?;
            path.truncate(len);
            self.copy_whitespace();
            match self.peek()? {
                b',' => self.copy_byte(b',')?,
                b']' => return self.copy_byte(b']'),
                _ => return Err(Stop),
            }
        }
        Err(Stop)
    }

    /// Copies a string token, quotes included; returns its text in the source.
    fn copy_string(&mut self) -> Result<&[u8], Stop> {
        let start = self.pos;
        self.copy_byte(b'"')?;
        loop {
            let b = self.peek()?;
            self.out.push(b);
            self.pos += 1;
            match b {
                b'"' => return Ok(&self.src[start..self.pos]),
                b'\\' => {
                    let escaped = self.peek()?;
                    self.out.push(escaped);
                    self.pos += 1;
                }
                _ => {}
            }
        }
    }

    /// Copies a number, `true`, `false` or `null`.
    fn copy_scalar(&mut self) -> Result<(), Stop> {
        if !matches!(self.peek()?, b'-' | b'0'..=b'9' | b't' | b'f' | b'n') {
            return Err(Stop);
        }
        let start = self.pos;
        while let Some(b) = self
            .src
            .get(self.pos)
            .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            self.out.push(*b);
            self.pos += 1;
        }
        if self.pos == start {
            return Err(Stop);
        }
        Ok(())
    }

    /// Passes over one value without copying it.
    fn skip_value(&mut self) -> Result<(), Stop> {
        let mut depth = 0usize;
        loop {
            let b = self.peek()?;
            match b {
                b'"' => {
                    self.pos += 1;
                    loop {
                        match self.peek()? {
                            b'"' => break,
                            b'\\' => self.pos += 2,
                            _ => self.pos += 1,
                        }
                    }
                    self.pos += 1;
                }
                b'{' | b'[' => {
                    depth += 1;
                    self.pos += 1;
                }
                b'}' | b']' => {
                    if depth == 0 {
                        return Ok(());
                    }
                    depth -= 1;
                    self.pos += 1;
                }
                b',' if depth == 0 => return Ok(()),
                b if b.is_ascii_whitespace() && depth == 0 => return Ok(()),
                _ => self.pos += 1,
            }
            if depth == 0 && matches!(self.src.get(self.pos - 1), Some(b'"' | b'}' | b']')) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Payload;

    #[test]
    fn the_client_label_fits_the_tracedata_limit_and_keeps_the_username() {
        assert_eq!(client_label("acme", "alice"), "acme_|_alice");
        let (company, user) = ("c".repeat(256), "u".repeat(200));
        let label = client_label(&company, &user);
        assert_eq!(label.len(), MAX_CLIENT_CHARS);
        assert!(label.ends_with(&format!("_|_{user}")), "{label}");
        let exact = client_label(&"c".repeat(53), &user);
        assert_eq!(exact, format!("{}_|_{user}", "c".repeat(53)));
        // A username of the full 256 leaves room for nothing else: still at most 256.
        assert_eq!(
            client_label(&company, &"u".repeat(256)).chars().count(),
            MAX_CLIENT_CHARS
        );
    }

    #[test]
    fn cut_json_is_masked_as_far_as_it_goes_and_never_keeps_a_redacted_value() {
        let masked = |body: &str, pointers: &[&str]| -> String {
            let pointers: Vec<String> = pointers.iter().map(|p| p.to_string()).collect();
            let out = redacted(body.as_bytes(), &pointers, usize::MAX);
            assert!(out.truncated, "{body}: a cut body is marked");
            String::from_utf8(out.body.to_vec()).unwrap()
        };
        assert_eq!(
            masked(r#"{"secret": "hunter2", "pad":"xxxx"#, &["/secret"]),
            r#"{"secret": "***", "pad":"xxxx"#
        );
        assert_eq!(
            masked(r#"{"a":1,"secret":"hun"#, &["/secret"]),
            r#"{"a":1,"secret":"***""#
        );
        assert_eq!(
            masked(r#"{"a":1,"secret":"#, &["/secret"]),
            r#"{"a":1,"secret":"***""#
        );
        assert_eq!(
            masked(
                r#"{"auth":{"key":"k1","x":[1,2]},"list":[{"key":"s"},{"key":"t"#,
                &["/auth/key", "/list/1/key"]
            ),
            r#"{"auth":{"key":"***","x":[1,2]},"list":[{"key":"s"},{"key":"***""#
        );
        assert_eq!(
            masked(r#"{"auth":{"key":"k1","o":{"p":[1]}},"z":tr"#, &["/auth"]),
            r#"{"auth":"***","z":tr"#
        );
        // Keys are compared decoded, and escaped as RFC 6901 says.
        assert_eq!(
            masked(r#"{"se\u0063ret":"v","a/b":"w","c"#, &["/secret", "/a~1b"]),
            r#"{"se\u0063ret":"***","a/b":"***","c"#
        );
        // Where the text stops being JSON, the rest is dropped: it cannot be pointed into.
        assert_eq!(
            masked(r#"{"a":1 "secret":"v"}"#, &["/secret"]),
            r#"{"a":1 "#
        );
        assert_eq!(
            masked(r#"[{"secret":"v"}, oops "secret""#, &["/0/secret"]),
            r#"[{"secret":"***"}, "#
        );
        // Trailing text, a second document: cut where the first value ends.
        assert_eq!(
            masked("{\"a\":1} and then some text", &["/b"]),
            "{\"a\":1} "
        );
        assert_eq!(
            masked("{\"tok\":\"A\"}\n{\"tok\":\"B\"}\n", &["/tok"]),
            "{\"tok\":\"***\"}\n"
        );
    }

    fn redacted(body: &[u8], pointers: &[String], max_bytes: usize) -> Payload {
        let mut payload = Payload {
            content_encoding: None,
            content_type: None,
            truncated: false,
            body: bytes::Bytes::copy_from_slice(body),
        };
        redact(&mut payload, pointers, max_bytes);
        payload
    }

    #[test]
    fn redaction_keeps_every_other_byte_as_sent() {
        let pointers = vec!["/tok".to_string(), "/list/1".to_string()];
        let body = br#"{ "z":1,"tok":"S","n":1.0, "e":1e2,"big":123456789012345678901234567890,"s":"\u00e9\/","list":[0,{"k":"v"},2],"tok":"again" }"#;
        let out = redacted(body, &pointers, usize::MAX);
        assert_eq!(
            std::str::from_utf8(&out.body).unwrap(),
            r#"{ "z":1,"tok":"***","n":1.0, "e":1e2,"big":123456789012345678901234567890,"s":"\u00e9\/","list":[0,"***",2],"tok":"***" }"#
        );
        assert!(!out.truncated);
        // Nothing to mask: the very bytes are kept.
        let out = redacted(br#"{"a" : 1.50}"#, &pointers, usize::MAX);
        assert_eq!(&out.body[..], br#"{"a" : 1.50}"#);
        // A byte order mark does not hide the body from redaction.
        let out = redacted(
            b"\xEF\xBB\xBF{\"tok\":\"SECRET_BOM\"}",
            &pointers,
            usize::MAX,
        );
        assert_eq!(&out.body[..], b"\xEF\xBB\xBF{\"tok\":\"***\"}");
        // Not JSON at all: kept as it is, nothing to point into.
        let out = redacted(b"secret=abc&x=1", &pointers, usize::MAX);
        assert_eq!(
            (&out.body[..], out.truncated),
            (&b"secret=abc&x=1"[..], false)
        );
        // Marks and whitespace in any order before the JSON.
        let out = redacted(b" \xEF\xBB\xBF\n{\"tok\":\"S\"}", &pointers, usize::MAX);
        assert_eq!(&out.body[..], b" \xEF\xBB\xBF\n{\"tok\":\"***\"}");
        // Bytes that are not text cannot be masked, and are not stored: UTF-16 JSON with its
        // mark, a gzip stream, NULs.
        let utf16: Vec<u8> = "\u{feff}{\"tok\":\"S\"}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        for body in [&utf16[..], b"\x1f\x8b\x08\x00\xff\xfe", b"\0{\0\"\0t"] {
            let out = redacted(body, &pointers, usize::MAX);
            assert_eq!((&out.body[..], out.truncated), (&b""[..], true), "{body:?}");
        }
        // Text cut inside a character (at max_capture_bytes) is still text.
        let out = redacted("<p>caf\u{e9}</p>".as_bytes().split_at(7).0, &pointers, 7);
        assert_eq!(&out.body[..], b"<p>caf\xC3");
        // The mask of a short value never takes what is stored past the limit.
        let body = br#"{"pad":"xxxxxxxxxx","tok":1}"#;
        let out = redacted(body, &pointers, body.len());
        assert_eq!(&out.body[..], &br#"{"pad":"xxxxxxxxxx","tok":"*"#[..]);
        assert!(out.truncated);
    }

    #[test]
    fn coded_captures_are_redacted_decoded() {
        use std::io::Write;
        let gzip = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let pointers = vec!["/tok".to_string()];
        let coded = |body: Vec<u8>, encoding: &str| Payload {
            content_encoding: Some(encoding.into()),
            content_type: Some("application/json".into()),
            truncated: false,
            body: body.into(),
        };
        // A value to mask: the decoded text is stored, masked, without the coding.
        let mut p = coded(gzip(br#"{"tok":"SECRET","a":1}"#), "gzip");
        redact(&mut p, &pointers, 1 << 20);
        assert_eq!(&p.body[..], br#"{"tok":"***","a":1}"#);
        assert_eq!((p.content_encoding, p.truncated), (None, false));
        // Nothing to mask: the very bytes sent, coding and all.
        let sent = gzip(br#"{"a":1}"#);
        let mut p = coded(sent.clone(), "gzip");
        redact(&mut p, &pointers, 1 << 20);
        assert_eq!(
            (&p.body[..], p.content_encoding.as_deref()),
            (&sent[..], Some("gzip"))
        );
        // A stream cut part way (a capture at max_capture_bytes): what decodes, masked, cut.
        let long: String = format!(r#"{{"pad":"{}","tok":"SECRET"}}"#, "x".repeat(5000));
        let sent = gzip(long.as_bytes());
        let mut p = coded(sent[..sent.len() - 8].to_vec(), "gzip");
        p.truncated = true;
        redact(&mut p, &pointers, 1 << 20);
        assert!(p.truncated && p.content_encoding.is_none());
        assert!(!String::from_utf8_lossy(&p.body).contains("SECRET"));
        // More than the capture may hold once decoded: cut at the limit.
        let mut p = coded(gzip(long.as_bytes()), "gzip");
        redact(&mut p, &pointers, 100);
        assert_eq!((p.body.len(), p.truncated), (100, true));
        // A coding that cannot be read: nothing is stored.
        let mut p = coded(b"\x1b\x00 opaque".to_vec(), "br");
        redact(&mut p, &pointers, 1 << 20);
        assert_eq!((&p.body[..], p.truncated), (&b""[..], true));
    }

    #[test]
    fn a_capture_cut_at_any_byte_keeps_no_redacted_value() {
        let body = r#" {"list":[{"key":"S3CRETa","n":-1.5e3},{"key":"S3CRETb","ok":true}],"auth":{"key":"S3CRETc","esc":"a\"b"},"tail":null} "#;
        let pointers: Vec<String> = ["/list/0/key", "/list/1/key", "/auth"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let whole = redacted(body.as_bytes(), &pointers, usize::MAX);
        assert!(!String::from_utf8_lossy(&whole.body).contains("S3CRET"));
        assert!(!whole.truncated);
        for cut in 0..body.len() {
            let out = redacted(&body.as_bytes()[..cut], &pointers, usize::MAX);
            let text = String::from_utf8_lossy(&out.body);
            // Not even a prefix of a secret longer than what its key already gives away.
            assert!(!text.contains("S3C"), "cut at {cut}: {text}");
            // A cut body is copied as it was up to the first mask.
            let before_mask = text.split("\"***\"").next().unwrap();
            assert!(body.starts_with(before_mask), "cut at {cut}: {text}");
        }
    }

    #[test]
    fn stages_saturate_at_three() {
        let stages: Vec<u8> = (0..6).map(stage_of).collect();
        assert_eq!(stages, vec![0, 1, 2, 3, 3, 3]);
    }

    #[test]
    fn time_has_offset_with_colon_and_whole_seconds() {
        let t = DateTime::parse_from_rfc3339("2024-02-21T06:30:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_time(&in_timezone(t, 3)), "2024-02-21T09:30:00+03:00");
        assert_eq!(format_time(&in_timezone(t, 0)), "2024-02-21T06:30:00+00:00");
        assert_eq!(
            format_time(&in_timezone(t, -12)),
            "2024-02-20T18:30:00-12:00"
        );
    }

    #[test]
    fn follow_ups_count_exchanges_and_keep_strangers_out() {
        let r = ProcessRegistry::default();
        let code = Uuid::new_v4();
        r.start(code, "alice", "acme", 100);
        assert_eq!(r.follow_up(code, "bob", false, || None), Err(NotYours));
        let seen = r.follow_up(code, "alice", false, || None).unwrap();
        assert_eq!(seen.exchanges, 1, "checked, not counted yet");
        // A follow-up refused after the check never advances; one sent on does.
        assert_eq!(
            r.follow_up(code, "alice", false, || None)
                .unwrap()
                .exchanges,
            1
        );
        assert_eq!(r.advance(code, seen).exchanges, 2);
        let seen = r.follow_up(code, "root", true, || None).unwrap();
        assert_eq!(r.advance(code, seen).exchanges, 3);
        let unknown = Uuid::new_v4();
        assert_eq!(r.follow_up(unknown, "alice", false, || None), Err(NotYours));
        let stored = r
            .follow_up(unknown, "alice", false, || {
                Some(("alice".into(), "acme".into(), 99, 4))
            })
            .unwrap();
        assert_eq!(stored.exchanges, 4);
        // Evicted between the check and the send: put back, then counted.
        let evicted = ProcessRegistry::default();
        assert_eq!(evicted.advance(unknown, stored).exchanges, 5);
    }

    #[test]
    fn redaction_replaces_only_the_named_values() {
        let body = br#"{"auth":{"key":"s3cret"},"locations":[1,2]}"#;
        let out = redacted(body, &["/auth/key".into(), "/missing".into()], usize::MAX);
        let v: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v["auth"]["key"], REDACTED);
        assert_eq!(v["locations"], serde_json::json!([1, 2]));
        assert_eq!(
            &redacted(b"not json", &["/a".into()], usize::MAX).body[..],
            b"not json"
        );
    }

    #[test]
    fn a_full_shard_is_halved_not_rescanned_on_every_insert() {
        let r = ProcessRegistry::default();
        // Codes whose last byte is 0 all land in shard 0.
        let code = |i: u32| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            Uuid::from_bytes(b)
        };
        for i in 0..SHARD_SOFT_CAP as u32 {
            r.start(code(i), "alice", "acme", 1);
        }
        let len = |r: &ProcessRegistry| r.shards[0].lock().len();
        assert_eq!(len(&r), SHARD_SOFT_CAP);
        r.start(code(u32::MAX), "alice", "acme", 1);
        assert!(len(&r) <= SHARD_SOFT_CAP / 2 + 1, "{}", len(&r));
        assert!(r.shards[0].lock().contains_key(&code(u32::MAX)));
    }
}
