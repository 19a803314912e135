//! Content codings (RFC 9110 8.4): which ones a body says it carries, and decoding the two that
//! callers and upstreams use in practice, gzip and deflate, with a bound on what comes out.
//!
//! Tollgate forwards and captures bodies as they were sent, codings and all. It decodes only to
//! read them: to count a request's points, to redact a capture, to convert one to JSON or XLSX.

use std::io::Read;

use flate2::bufread::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

/// What `Accept-Encoding` names on a 415: the codings Tollgate can read.
pub const READABLE: &str = "gzip, deflate";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
}

impl Coding {
    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The codings a `Content-Encoding` field lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Codings {
    /// In the order they were applied (RFC 9110 8.4: the field lists them so); empty for none
    /// or `identity` alone.
    Readable(Vec<Coding>),
    /// The first coding Tollgate cannot read, as the field spelled it.
    Unreadable(String),
}

impl Codings {
    /// Reads the field's values (it may be repeated): comma-separated tokens, case-insensitive;
    /// `identity` and empty elements add nothing, `x-gzip` is `gzip` (RFC 9110 8.4.1.3).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Codings {
        let mut codings = Vec::new();
        for value in values {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                let coding = if token.is_empty() || token.eq_ignore_ascii_case(b"identity") {
                    continue;
                } else if token.eq_ignore_ascii_case(b"gzip")
                    || token.eq_ignore_ascii_case(b"x-gzip")
                {
                    Coding::Gzip
                } else if token.eq_ignore_ascii_case(b"deflate") {
                    Coding::Deflate
                } else {
                    return Codings::Unreadable(String::from_utf8_lossy(token).into_owned());
                };
                codings.push(coding);
            }
        }
        Codings::Readable(codings)
    }

    /// Reads the `Content-Encoding` fields of a message.
    pub fn of_headers(headers: &http::HeaderMap) -> Codings {
        let values = headers.get_all(http::header::CONTENT_ENCODING);
        Codings::parse(values.iter().map(|v| v.as_bytes()))
    }

    /// Parses a field value as stored with a capture.
    pub fn of_field(value: &str) -> Codings {
        Codings::parse([value.as_bytes()])
    }

    /// Whether the body is as it reads: no coding at all.
    pub fn is_identity(&self) -> bool {
        matches!(self, Codings::Readable(c) if c.is_empty())
    }
}

/// The `Content-Encoding` of a captured body as it is stored with it: the field's values
/// joined, or `None` for a body without a coding.
pub fn field(headers: &http::HeaderMap) -> Option<String> {
    if Codings::of_headers(headers).is_identity() {
        return None;
    }
    let values = headers.get_all(http::header::CONTENT_ENCODING);
    let texts: Vec<_> = values
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect();
    Some(texts.join(", "))
}

/// Whether a caller whose `Accept-Encoding` is `accept` takes a body in the codings `field`
/// lists (RFC 9110 12.5.3): without the field, any; with it, each coding must be listed, or
/// `*` be, with a weight above 0 (an empty field takes none). `x-gzip` is `gzip`.
pub fn accepts(accept: Option<&[u8]>, field: &str) -> bool {
    let Some(accept) = accept else {
        return true;
    };
    let same = |token: &str| match token {
        "x-gzip" => "gzip".to_string(),
        other => other.to_string(),
    };
    let accept = String::from_utf8_lossy(accept).to_ascii_lowercase();
    let listed: Vec<(String, bool)> = accept
        .split(',')
        .filter_map(|element| {
            let mut parts = element.split(';');
            let token = parts.next()?.trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (!token.is_empty()).then(|| (same(token), !refused))
        })
        .collect();
    let taken = |name: &str| listed.iter().find(|(t, _)| t == name).map(|(_, ok)| *ok);
    field
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .all(|c| taken(&same(&c)).or_else(|| taken("*")).unwrap_or(false))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Decoding would give more than the limit.
    #[error("decodes to more than {0} bytes")]
    TooLarge(usize),
    /// The coded stream is broken: the coding named and the decoder's reason.
    #[error("not valid {coding} data ({reason})")]
    Invalid {
        coding: &'static str,
        reason: String,
    },
}

/// Decodes `body`, coded with `codings` in that order, to at most `limit` bytes.
///
/// # Errors
///
/// [`DecodeError::TooLarge`] past `limit` (at every step, so nothing larger is ever held), and
/// [`DecodeError::Invalid`] for a stream that is broken, cut short, or followed by other bytes.
pub fn decode(codings: &[Coding], body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut data = std::borrow::Cow::Borrowed(body);
    // The last coding applied is the first taken off.
    for &coding in codings.iter().rev() {
        data = std::borrow::Cow::Owned(decode_one(coding, &data, limit)?);
    }
    Ok(data.into_owned())
}

/// As much of a prefix of a coded body as decodes: for a capture cut at `max_capture_bytes`,
/// whose stream ends early. Returns the bytes and whether they are the whole body (the stream
/// was complete and within `limit`).
pub fn decode_prefix(codings: &[Coding], body: &[u8], limit: usize) -> (Vec<u8>, bool) {
    let mut data = body.to_vec();
    let mut whole = true;
    for &coding in codings.iter().rev() {
        let (mut out, read, all_taken) = inflate(coding, &data, limit);
        whole &= read.is_ok() && out.len() <= limit && all_taken;
        out.truncate(limit);
        data = out;
    }
    (data, whole)
}

/// Decodes one coding to at most `limit + 1` bytes (one past the limit tells it was passed):
/// what came out, how the reading ended, and whether the stream took all of `body`.
fn inflate(coding: Coding, body: &[u8], limit: usize) -> (Vec<u8>, std::io::Result<usize>, bool) {
    let mut out = Vec::new();
    let mut rest = body;
    let read = reader(coding, &mut rest)
        .take(limit as u64 + 1)
        .read_to_end(&mut out);
    (out, read, rest.is_empty())
}

/// A decoder over `rest`, which it advances past the input it takes.
fn reader<'a, 'b>(coding: Coding, rest: &'a mut &'b [u8]) -> Box<dyn Read + 'a> {
    match coding {
        // Several gzip members one after another are one body (RFC 1952 2.2).
        Coding::Gzip => Box::new(MultiGzDecoder::new(rest)),
        // HTTP's deflate is the zlib format (RFC 9110 8.4.1.2); some senders send the raw
        // deflate stream without its zlib header, which readers accept too.
        Coding::Deflate if is_zlib_header(rest) => Box::new(ZlibDecoder::new(rest)),
        Coding::Deflate => Box::new(DeflateDecoder::new(rest)),
    }
}

/// RFC 1950 2.2: method 8 (deflate), a window of at most 32 KiB, and the check bits.
fn is_zlib_header(body: &[u8]) -> bool {
    match body {
        [cmf, flg, ..] => {
            cmf & 0x0F == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

fn decode_one(coding: Coding, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let invalid = |reason: String| DecodeError::Invalid {
        coding: coding.name(),
        reason,
    };
    let (out, read, all_taken) = inflate(coding, body, limit);
    read.map_err(|e| invalid(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge(limit));
    }
    // A deflate stream ends by itself: bytes after it are not part of the body. (A gzip body's
    // trailing bytes already failed, read as the header of a next member.)
    if !all_taken {
        return Err(invalid("bytes after the end of the stream".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn the_field_lists_codings_in_the_order_applied() {
        let parse = |values: &[&str]| Codings::parse(values.iter().map(|v| v.as_bytes()));
        assert_eq!(parse(&[]), Codings::Readable(vec![]));
        assert!(parse(&["identity"]).is_identity());
        assert!(parse(&[" , identity ,"]).is_identity());
        assert_eq!(parse(&["GZIP"]), Codings::Readable(vec![Coding::Gzip]));
        assert_eq!(parse(&["x-gzip"]), Codings::Readable(vec![Coding::Gzip]));
        assert_eq!(
            parse(&["gzip, Deflate"]),
            Codings::Readable(vec![Coding::Gzip, Coding::Deflate])
        );
        // A repeated field is one list.
        assert_eq!(
            parse(&["deflate", "gzip"]),
            Codings::Readable(vec![Coding::Deflate, Coding::Gzip])
        );
        assert_eq!(parse(&["gzip, br"]), Codings::Unreadable("br".into()));
        assert_eq!(parse(&["zstd"]), Codings::Unreadable("zstd".into()));
        assert_eq!(parse(&["gzip;q=1"]), Codings::Unreadable("gzip;q=1".into()));
    }

    #[test]
    fn a_caller_takes_a_coding_it_lists_or_has_no_field_for() {
        let takes = |accept: Option<&str>, field: &str| accepts(accept.map(str::as_bytes), field);
        assert!(takes(None, "gzip"));
        assert!(takes(Some("gzip, deflate, br"), "gzip"));
        assert!(takes(Some("GZIP;q=0.5"), "x-gzip"));
        assert!(takes(Some("deflate, gzip"), "gzip, deflate"));
        assert!(takes(Some("*"), "gzip"));
        assert!(takes(Some("br, *;q=0.1"), "deflate"));
        assert!(!takes(Some(""), "gzip"), "an empty field takes no coding");
        assert!(!takes(Some("identity"), "gzip"));
        assert!(!takes(Some("gzip;q=0"), "gzip"));
        assert!(!takes(Some("*, gzip;q=0"), "gzip"));
        assert!(!takes(Some("gzip"), "gzip, deflate"));
        assert!(takes(Some("identity"), "identity"));
    }

    #[test]
    fn gzip_and_both_forms_of_deflate_decode() {
        let text = br#"{"locations":[{"key":"a"},{"key":"b"}]}"#;
        assert_eq!(decode(&[Coding::Gzip], &gzip(text), 1 << 20).unwrap(), text);
        assert_eq!(
            decode(&[Coding::Deflate], &zlib(text), 1 << 20).unwrap(),
            text
        );
        assert_eq!(
            decode(&[Coding::Deflate], &raw_deflate(text), 1 << 20).unwrap(),
            text
        );
        // Two gzip members are one body.
        let two = [gzip(b"{\"a\":"), gzip(b"1}")].concat();
        assert_eq!(decode(&[Coding::Gzip], &two, 100).unwrap(), b"{\"a\":1}");
        // gzip applied first, then deflate: deflate comes off first.
        let stacked = zlib(&gzip(text));
        assert_eq!(
            decode(&[Coding::Gzip, Coding::Deflate], &stacked, 1 << 20).unwrap(),
            text
        );
        assert_eq!(decode(&[], text, 1 << 20).unwrap(), text);
    }

    #[test]
    fn decoding_stops_at_the_limit() {
        // A megabyte of zeros is a kilobyte of gzip: the decoder never holds more than asked.
        let bomb = gzip(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 4096);
        assert_eq!(
            decode(&[Coding::Gzip], &bomb, 1000),
            Err(DecodeError::TooLarge(1000))
        );
        assert_eq!(
            decode(&[Coding::Gzip], &bomb, 1 << 20).unwrap().len(),
            1 << 20
        );
        let (prefix, whole) = decode_prefix(&[Coding::Gzip], &bomb, 1000);
        assert_eq!((prefix.len(), whole), (1000, false));
    }

    #[test]
    fn broken_streams_are_invalid_and_their_prefix_still_reads() {
        let text: Vec<u8> = (0..2000)
            .flat_map(|i: u32| format!("{i},").into_bytes())
            .collect();
        let coded = gzip(&text);
        let invalid = |r: Result<Vec<u8>, DecodeError>| {
            matches!(r, Err(DecodeError::Invalid { coding: "gzip", .. }))
        };
        assert!(invalid(decode(
            &[Coding::Gzip],
            &coded[..coded.len() / 2],
            1 << 20
        )));
        assert!(invalid(decode(
            &[Coding::Gzip],
            b"{\"not\":\"gzip\"}",
            1 << 20
        )));
        assert!(invalid(decode(
            &[Coding::Gzip],
            &[coded.clone(), b"junk".to_vec()].concat(),
            1 << 20
        )));
        let after = [zlib(b"{}"), b"{}".to_vec()].concat();
        assert!(matches!(
            decode(&[Coding::Deflate], &after, 100),
            Err(DecodeError::Invalid {
                coding: "deflate",
                ..
            })
        ));
        // A capture cut part way: what its bytes hold comes back, marked not whole.
        let (prefix, whole) = decode_prefix(&[Coding::Gzip], &coded[..coded.len() / 2], 1 << 20);
        assert!(!whole);
        assert!(!prefix.is_empty() && text.starts_with(&prefix));
        assert_eq!(
            decode_prefix(&[Coding::Gzip], &coded, 1 << 20),
            (text, true)
        );
    }
}
