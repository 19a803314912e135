//! The upstream leg, done by Tollgate itself rather than pingora's proxy loop, because the
//! whole body is read (and points admitted) before the upstream is contacted, and pingora 0.9
//! cannot replay a buffered body over 64 KiB. It writes the request on a pooled connection,
//! reads the response head, and streams the response body to the caller while capturing a copy.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::ServerSession as Session;
use pingora::protocols::Stream;

use super::pool::Upstream;
use crate::coding;

/// How the upstream leg failed, for the caller's status and the metrics' `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Could not connect (refused, unreachable): 502.
    Connect,
    /// Connected, but the exchange broke (reset, malformed answer): 502.
    Protocol,
    /// The total timeout passed before the response head: 504.
    Timeout,
}

impl UpstreamFailure {
    pub fn status(self) -> u16 {
        match self {
            UpstreamFailure::Timeout => 504,
            _ => 502,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Protocol => "protocol",
            UpstreamFailure::Timeout => "timeout",
        }
    }
}

/// What the caller saw and what was captured of it.
pub struct Exchange {
    pub status: u16,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub captured: BytesMut,
    pub capture_truncated: bool,
    /// From the request being written to the response head arriving.
    pub upstream_time: Duration,
    /// The upstream broke off or stalled after its head: the answer is incomplete by its fault.
    pub upstream_failed: bool,
    /// The response's last piece, not yet written: the caller settles and records the call
    /// first, then ends the response with [`end_response`]. `None` when the answer broke off.
    pub held_end: Option<Option<Bytes>>,
    /// The head of an answer without a body (a 204, a 304, an answer to HEAD, a length of
    /// 0), not yet written either: written, it would end the answer before its record.
    pub held_head: Option<Box<ResponseHeader>>,
    /// The route's total deadline, which the held end's writing keeps too.
    pub deadline: Instant,
}

/// Headers that belong to one connection, never forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// The items of the comma-separated list a header's values make (RFC 9110 5.6.1), trimmed,
/// empty ones included. Bytes, not text: a value with one non-ASCII item still gives the others.
pub(super) fn list_items(
    headers: &http::HeaderMap,
    name: http::header::HeaderName,
) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// What a message's `Transfer-Encoding` names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum TransferCoding {
    /// No `Transfer-Encoding` field.
    Absent,
    /// One `chunked`, the only coding Tollgate takes off.
    Chunked,
    /// The field, with no coding in it.
    Empty,
    /// Any other coding, or more than one (RFC 9112 6.1).
    Other,
}

pub(super) fn transfer_coding(headers: &http::HeaderMap) -> TransferCoding {
    if !headers.contains_key(http::header::TRANSFER_ENCODING) {
        return TransferCoding::Absent;
    }
    let mut codings =
        list_items(headers, http::header::TRANSFER_ENCODING).filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => TransferCoding::Empty,
        // Pingora frames a message as chunked by the last element of the last field alone: an
        // empty element after `chunked` (`chunked,`, or an empty field after it) would have
        // it read the body unframed while the field says chunked, a message boundary two
        // readers see apart. Such a field is refused, not passed on.
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked") => {
            let last = headers
                .get_all(http::header::TRANSFER_ENCODING)
                .into_iter()
                .next_back()
                .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
                .map(<[u8]>::trim_ascii);
            if last.is_some_and(|l| l.eq_ignore_ascii_case(b"chunked")) {
                TransferCoding::Chunked
            } else {
                TransferCoding::Other
            }
        }
        _ => TransferCoding::Other,
    }
}

/// The fields a `Connection` header names as the connection's own, to be dropped with it
/// (RFC 9110 7.6.1); never those that frame or address the message, which Tollgate sets itself.
fn connection_options(headers: &http::HeaderMap) -> Vec<http::HeaderName> {
    list_items(headers, http::header::CONNECTION)
        .filter_map(|name| http::HeaderName::from_bytes(name).ok())
        .filter(|name| {
            *name != http::header::HOST
                && *name != http::header::CONTENT_LENGTH
                && *name != http::header::TRANSFER_ENCODING
        })
        .collect()
}

/// The caller's request as the upstream gets it: its request line and header fields written
/// once, ready for the wire (a retry sends the same bytes).
pub struct Outgoing {
    pub method: http::Method,
    wire: BytesMut,
    /// The same head for pingora's session, which must see a HEAD go out (see
    /// [`Request::exchange_head`]); built for HEAD requests only.
    head: Option<RequestHeader>,
}

/// Writes the caller's request head for the upstream: hop-by-hop fields (and those the
/// caller's `Connection` names) and caller-sent copies of Tollgate's own headers dropped, the
/// target in origin form, `Host` set when the caller sent none (to `upstream_host`), the
/// buffered body's length set, identity headers added. The fields are written straight from
/// the caller's head, in its order and case: cloning the head and editing it, each edit a
/// header-map lookup, was a sixth of a pass-through call's instructions. `None`: a target or
/// an added value that cannot go on the wire.
pub fn upstream_request(
    caller: &RequestHeader,
    upstream_host: &str,
    body_len: usize,
    added: &[(&'static str, &str)],
    dropped: &[&str],
) -> Option<Outgoing> {
    use bytes::BufMut;
    let target: &[u8] = if matches!(caller.raw_path(), [b'/', ..] | b"*") {
        caller.raw_path()
    } else {
        // An absolute-form target (RFC 9112 3.2.2; pingora checked its authority against Host
        // and kept its path in the URI) goes on in origin form.
        caller
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/")
            .as_bytes()
    };
    if target
        .iter()
        .any(|&b| matches!(b, b'\0' | b'\n' | b'\r' | b' '))
    {
        return None;
    }
    // The rule of `http::HeaderValue`: no control characters but tab.
    if !added
        .iter()
        .all(|(_, v)| v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f)))
    {
        return None;
    }
    let options = connection_options(&caller.headers);
    let forwarded = |name: &http::HeaderName| {
        let name = name.as_str();
        let own = |h: &str| h.eq_ignore_ascii_case(name);
        // Those set here are replaced, never sent twice.
        let replaced =
            || added.iter().any(|(h, _)| own(h)) || name == http::header::CONTENT_LENGTH.as_str();
        // A name that differs from one dropped or set here only by '_' for '-' ("X_Client")
        // reads as that header at upstreams that map names to variables (CGI, WSGI): the caller
        // could pass itself off as another client, or slip in credentials. (nginx drops every
        // name with '_' by default.)
        let spoofs = || {
            name.contains('_') && {
                let dashed = name.replace('_', "-");
                let own = |h: &str| h.eq_ignore_ascii_case(&dashed);
                HOP_BY_HOP.iter().chain(dropped).any(|h| own(h))
                    || added.iter().any(|(h, _)| own(h))
                    || own(http::header::HOST.as_str())
                    || own(http::header::CONTENT_LENGTH.as_str())
            }
        };
        !(HOP_BY_HOP.contains(&name)
            || dropped.iter().any(|h| own(h))
            || replaced()
            || options.iter().any(|o| o.as_str() == name)
            || spoofs())
    };
    // A POST, PUT or PATCH says its empty body's length (RFC 9110 8.6): some upstreams
    // answer one without it 411.
    let has_body = body_len > 0
        || caller.headers.contains_key(http::header::CONTENT_LENGTH)
        || caller.headers.contains_key(http::header::TRANSFER_ENCODING)
        || matches!(
            caller.method,
            http::Method::POST | http::Method::PUT | http::Method::PATCH
        );
    let mut fields: Vec<(&[u8], &[u8])> =
        Vec::with_capacity(caller.headers.len() + added.len() + 2);
    if caller.has_case() {
        for ((case, value), (name, _)) in caller.case_header_iter().zip(caller.headers.iter()) {
            if forwarded(name) {
                fields.push((case.as_slice(), value.as_bytes()));
            }
        }
    } else {
        for (name, value) in caller.headers.iter() {
            if forwarded(name) {
                fields.push((name.as_str().as_bytes(), value.as_bytes()));
            }
        }
    }
    // An HTTP/1.0 caller may send none; the upstream is spoken to in HTTP/1.1, which
    // requires it.
    if !caller.headers.contains_key(http::header::HOST) {
        fields.push((b"Host", upstream_host.as_bytes()));
    }
    fields.extend(added.iter().map(|(h, v)| (h.as_bytes(), v.as_bytes())));
    let length = body_len.to_string();
    if has_body {
        fields.push((b"Content-Length", length.as_bytes()));
    }

    let method = caller.method.as_str().as_bytes();
    let size = method.len()
        + target.len()
        + 13
        + fields
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
        + 2;
    let mut wire = BytesMut::with_capacity(size);
    for part in [method, b" ", target, b" HTTP/1.1\r\n"] {
        wire.put_slice(part);
    }
    for (name, value) in &fields {
        for part in [*name, b": ", *value, b"\r\n"] {
            wire.put_slice(part);
        }
    }
    wire.put_slice(b"\r\n");

    let head = if caller.method == http::Method::HEAD {
        let mut head = RequestHeader::build(http::Method::HEAD, target, Some(fields.len())).ok()?;
        for (name, value) in &fields {
            let name = String::from_utf8(name.to_vec()).ok()?;
            head.append_header(name, http::HeaderValue::from_bytes(value).ok()?)
                .ok()?;
        }
        Some(head)
    } else {
        None
    };
    Some(Outgoing {
        method: caller.method.clone(),
        wire,
        head,
    })
}

pub struct Leg<'a> {
    /// Set once the server drains: the answer then says `Connection: close`.
    pub draining: &'a crate::app::Draining,
    pub transport: &'a TransportConnector,
    pub upstream: &'a Upstream,
    pub total_timeout: Duration,
    pub max_capture_bytes: usize,
}

/// A request body as it was read, in the pieces pingora read it in (up to 64 KiB each), joined
/// into one only when something needs it whole: counting points does, forwarding does not.
/// Past the first few pieces, small ones (a body chunked a few bytes at a time) are copied
/// together as they come: kept one slice each, millions of them made writing the body upstream
/// cost the square of their number, seconds of a worker thread for a few megabytes.
#[derive(Debug, Clone, Default)]
pub struct RequestBody {
    pieces: Vec<Bytes>,
    /// Small pieces since the last one kept, copied together; a piece of `pieces` when full,
    /// before a large piece, and when reading ends.
    small: BytesMut,
    len: usize,
    /// Set for a body that will be needed whole: from its second piece on, pieces are copied
    /// into this one buffer as they arrive, while still in cache, instead of all at the end
    /// (a 10 MB body's join read its 160 pieces back cold, into memory faulted in anew).
    joining: Option<BytesMut>,
    /// The length announced, to size the joined buffer once.
    expected: usize,
}

/// Pieces kept as they came before smaller ones are copied together.
const PIECES_KEPT_AS_THEY_CAME: usize = 64;
/// Past those, pieces shorter than this are copied together rather than kept one slice each.
const SMALL_PIECE_BYTES: usize = 16 * 1024;
/// What small pieces copied together come to before they are kept as one.
const SMALL_PIECES_JOINED_BYTES: usize = 64 * 1024;

impl RequestBody {
    /// A body to be joined as it arrives; `expected` is its announced length, if any.
    pub fn joining(expected: Option<usize>) -> RequestBody {
        RequestBody {
            joining: Some(BytesMut::new()),
            expected: expected.unwrap_or(0),
            ..RequestBody::default()
        }
    }

    pub fn push(&mut self, piece: Bytes) {
        self.len += piece.len();
        if piece.is_empty() {
            return;
        }
        match &mut self.joining {
            Some(joined) if !self.pieces.is_empty() => {
                if joined.is_empty() {
                    joined.reserve(self.expected.max(self.len));
                    joined.extend_from_slice(&self.pieces[0]);
                }
                joined.extend_from_slice(&piece);
            }
            Some(_) => self.pieces.push(piece),
            // Most bodies come in a few pieces: kept as they came, not copied.
            None if piece.len() >= SMALL_PIECE_BYTES
                || (self.small.is_empty() && self.pieces.len() < PIECES_KEPT_AS_THEY_CAME) =>
            {
                self.keep_small();
                self.pieces.push(piece);
            }
            None => {
                self.small.extend_from_slice(&piece);
                if self.small.len() >= SMALL_PIECES_JOINED_BYTES {
                    self.keep_small();
                }
            }
        }
    }

    fn keep_small(&mut self) {
        if !self.small.is_empty() {
            self.pieces.push(self.small.split().freeze());
        }
    }

    /// What has arrived of a body being joined, in one piece.
    pub fn received(&self) -> &[u8] {
        match (&self.joining, self.pieces.first()) {
            (Some(joined), _) if !joined.is_empty() => joined,
            (_, Some(first)) if self.pieces.len() == 1 => first,
            _ => &[],
        }
    }

    /// Ends the reading: what was joined becomes the one piece.
    pub fn finish(&mut self) {
        self.keep_small();
        if let Some(joined) = self.joining.take().filter(|j| !j.is_empty()) {
            self.pieces = vec![joined.freeze()];
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body in one piece, joined (one copy) the first time it is asked for.
    pub fn whole(&mut self) -> &Bytes {
        static EMPTY: Bytes = Bytes::new();
        self.keep_small();
        if self.pieces.is_empty() {
            // No piece is made for nothing: an empty body is never written upstream.
            return &EMPTY;
        }
        if self.pieces.len() > 1 {
            let mut joined = BytesMut::with_capacity(self.len);
            for piece in &self.pieces {
                joined.extend_from_slice(piece);
            }
            self.pieces = vec![joined.freeze()];
        }
        &self.pieces[0]
    }

    /// The first `n` bytes (all of them when shorter), copied only when they span pieces. Of a
    /// body read to its end ([`RequestBody::finish`]).
    pub fn prefix(&self, n: usize) -> Bytes {
        debug_assert!(self.small.is_empty(), "prefix of a body still being read");
        match self.pieces.first() {
            None => Bytes::new(),
            Some(first) if first.len() >= n || self.pieces.len() == 1 => {
                first.slice(..n.min(first.len()))
            }
            Some(_) => {
                let mut out = BytesMut::with_capacity(n.min(self.len));
                for piece in &self.pieces {
                    let room = n - out.len();
                    if room == 0 {
                        break;
                    }
                    out.extend_from_slice(&piece[..room.min(piece.len())]);
                }
                out.freeze()
            }
        }
    }
}

/// Sends `req` + `body` upstream and relays the answer to `session`. `on_head` may add headers
/// to the caller's response head (it gets the upstream time). Errors before the response head
/// are returned for the caller to answer; after it, the caller connection is simply ended.
pub async fn exchange(
    leg: Leg<'_>,
    session: &mut Session,
    req: Outgoing,
    body: RequestBody,
    on_head: impl FnOnce(&mut ResponseHeader, Duration),
) -> Result<Exchange, UpstreamFailure> {
    let deadline = Instant::now() + leg.total_timeout;
    let (mut http, head, upstream_time) = match until(deadline, send(&leg, req, body)).await {
        Ok(result) => result?,
        Err(_) => return Err(UpstreamFailure::Timeout),
    };
    let status = head.status.as_u16();
    let content_type = head
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let content_encoding = coding::field(&head.headers);
    let mut out = head;
    for h in connection_options(&out.headers) {
        out.remove_header(&h);
    }
    // Names, not text: each removal is then one hash lookup, without parsing the name.
    const ANSWER_HOP_BY_HOP: [http::HeaderName; 5] = [
        http::header::CONNECTION,
        http::HeaderName::from_static("keep-alive"),
        http::HeaderName::from_static("proxy-connection"),
        http::header::UPGRADE,
        http::header::TRAILER,
    ];
    for h in &ANSWER_HOP_BY_HOP {
        out.remove_header(h);
    }
    // A connection whose answer's end is in doubt is not used again: a bodiless answer that
    // announced a body (to a HEAD, or a 204 or 304) may yet be followed by one, which would
    // be read as the next call's answer. (A connection holding bytes when it is taken from
    // the pool is dropped there; this is for bytes that come later.) It costs a connection
    // per such answer.
    let announced = |name| {
        out.headers
            .get(name)
            .is_some_and(|v: &http::HeaderValue| v.as_bytes() != b"0")
    };
    let length_in_doubt = (matches!(status, 204 | 304)
        || session.req_header().method == http::Method::HEAD)
        && (announced(http::header::CONTENT_LENGTH) || announced(http::header::TRANSFER_ENCODING));
    // A length sent twice, or as a list ("5, 5"), that pingora read as one: the caller gets
    // it once (RFC 9110 8.6 lets a recipient take such a list as the one value).
    let lengths = || {
        list_items(&out.headers, http::header::CONTENT_LENGTH)
            .map(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())
    };
    let repeated = match lengths().next() {
        Some(Some(length)) if lengths().nth(1).is_some() => {
            lengths().all(|n| n == Some(length)).then_some(length)
        }
        _ => None,
    };
    if let Some(length) = repeated {
        let _ = out.insert_header(http::header::CONTENT_LENGTH, length.to_string());
    }
    if status == 204 {
        // A 204 has no body whatever its head says (RFC 9110 15.3.5), and none is read from
        // the upstream: a length left in the head would leave the caller waiting for it.
        out.remove_header(&http::header::CONTENT_LENGTH);
        out.remove_header(&http::header::TRANSFER_ENCODING);
    }
    // Tollgate answers in its own HTTP version, whichever the upstream spoke.
    out.set_version(http::Version::HTTP_11);
    let bodiless = matches!(status, 100..=199 | 204 | 304)
        || session.req_header().method == http::Method::HEAD;
    let chunked = out.headers.contains_key(http::header::TRANSFER_ENCODING);
    let sized = out.headers.contains_key(http::header::CONTENT_LENGTH);
    let caller_takes_chunks = session.req_header().version >= http::Version::HTTP_11;
    if chunked {
        // Transfer-Encoding overrides a length sent beside it (RFC 9112 6.3), which the
        // answer must then not carry on.
        out.remove_header(&http::header::CONTENT_LENGTH);
    }
    if !caller_takes_chunks && chunked {
        // An HTTP/1.0 caller knows no chunks (RFC 9112 6.1), also in the head of an answer
        // to HEAD.
        out.remove_header(&http::header::TRANSFER_ENCODING);
    }
    if !bodiless && !caller_takes_chunks && (chunked || !sized) {
        // Its body goes to it as it is, and the close ends it.
        session.set_keepalive(None);
    } else if !bodiless && !chunked && !sized {
        // The upstream ends this answer by closing its connection: an HTTP/1.1 caller gets it
        // chunked, and keeps its connection.
        let _ = out.insert_header(http::header::TRANSFER_ENCODING, "chunked");
    }
    on_head(&mut out, upstream_time);
    if leg.draining.is_set() {
        session.set_keepalive(None);
    }
    let mut ex = Exchange {
        status,
        content_type,
        content_encoding,
        captured: BytesMut::new(),
        capture_truncated: false,
        upstream_time,
        upstream_failed: false,
        held_end: None,
        held_head: None,
        deadline,
    };
    if http.response_done() {
        // Nothing follows the head: the head is the end, and waits with it.
        ex.held_head = Some(Box::new(out));
        ex.held_end = Some(None);
        if !length_in_doubt {
            leg.upstream.release(http).await;
        }
        return Ok(ex);
    }
    // The caller's side is held to the same deadline: a caller that stops reading must not
    // hold its slot, the upstream's connection and its own past the route's total timeout.
    if !matches!(
        until_if_waiting(deadline, session.write_response_header(Box::new(out))).await,
        Some(Ok(()))
    ) {
        ex.capture_truncated = true;
        return Ok(ex);
    }
    let mut last = None;
    while !http.response_done() {
        // A small answer's body came with its head, ready at the first poll.
        let chunk = match until_if_waiting(deadline, http.read_response_body()).await {
            Some(Ok(chunk)) => chunk,
            // The head is already sent: all that is left is to end the caller's response early.
            // What was captured is not the whole answer, and says so.
            Some(Err(_)) | None => {
                ex.upstream_failed = true;
                ex.capture_truncated = true;
                return Ok(ex);
            }
        };
        if let Some(data) = &chunk {
            capture(&mut ex, data, leg.max_capture_bytes);
        }
        if http.response_done() {
            last = chunk;
            break;
        }
        let Some(chunk) = chunk else { continue };
        if !matches!(
            until_if_waiting(deadline, session.write_response_body(chunk, false)).await,
            Some(Ok(()))
        ) {
            // The caller left mid-answer, or stopped taking it: the rest is neither read nor
            // captured.
            ex.capture_truncated = true;
            return Ok(ex);
        }
    }
    ex.held_end = Some(last);
    if !length_in_doubt {
        leg.upstream.release(http).await;
    }
    Ok(ex)
}

/// Runs `future` until `deadline`. Pingora's timer rounds deadlines to 10 ms ticks shared by
/// every call, where a tokio timer per call woke the runtime's driver (an eventfd write) on
/// most calls.
fn until<F: std::future::Future>(
    deadline: Instant,
    future: F,
) -> pingora::time::Timeout<F, pingora::time::fast_timeout::FastOrTokioTimeout> {
    pingora::time::timeout(deadline.saturating_duration_since(Instant::now()), future)
}

/// Writes the held end of a response (see [`Exchange::held_end`]), after its held head if it
/// has one, by `deadline`; false when the caller left or did not take it in time.
pub async fn end_response(
    session: &mut Session,
    head: Option<Box<ResponseHeader>>,
    held: Option<Bytes>,
    deadline: Instant,
) -> bool {
    let written = until_if_waiting(deadline, async {
        if let Some(head) = head {
            session.write_response_header(head).await?;
        }
        session
            .write_response_body(held.unwrap_or_default(), true)
            .await
    })
    .await;
    matches!(written, Some(Ok(())))
}

/// [`until`] for a future that is usually done at its first poll (a write with room in the
/// socket's buffer): the timer is set only if it waits. None when `deadline` passed first.
async fn until_if_waiting<F: std::future::Future>(
    deadline: Instant,
    future: F,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let first = std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        std::task::Poll::Ready(done) => std::task::Poll::Ready(Some(done)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await;
    match first {
        Some(done) => Some(done),
        None => until(deadline, future).await.ok(),
    }
}

fn capture(ex: &mut Exchange, data: &Bytes, max_capture_bytes: usize) {
    let room = max_capture_bytes.saturating_sub(ex.captured.len());
    if data.len() > room {
        ex.capture_truncated = true;
    }
    ex.captured.extend_from_slice(&data[..data.len().min(room)]);
}

async fn send(
    leg: &Leg<'_>,
    req: Outgoing,
    body: RequestBody,
) -> Result<(HttpSession, ResponseHeader, Duration), UpstreamFailure> {
    let request = Request { out: req, body };
    let (stream, reused) = leg
        .upstream
        .stream(leg.transport)
        .await
        .map_err(|_| UpstreamFailure::Connect)?;
    let sent = Instant::now();
    // Re-sending a whole request is safe only when the upstream cannot have acted on it: the
    // request did not get through whole, or the method is idempotent. A POST the upstream
    // read before closing (a crash, its own timeout) must not be computed twice.
    let replayable = matches!(
        request.out.method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
    );
    let (http, head) = match request.exchange_head(leg, stream).await {
        Ok(done) => done,
        // A pooled connection the upstream closed while idle: retry once on a new one. An
        // upstream that answered wrongly is not asked again.
        Err(failed) if reused && failed.closed && (replayable || !failed.written) => {
            let fresh = leg
                .upstream
                .connect(leg.transport)
                .await
                .map_err(|_| UpstreamFailure::Connect)?;
            request
                .exchange_head(leg, fresh)
                .await
                .map_err(|_| UpstreamFailure::Protocol)?
        }
        Err(_) => return Err(UpstreamFailure::Protocol),
    };
    Ok((http, head, sent.elapsed()))
}

/// Why a request got no response head.
#[derive(Clone, Copy)]
struct HeadFailure {
    /// The whole request had been written.
    written: bool,
    /// The connection was closed or reset, with no answer.
    closed: bool,
}

/// The upstream answered, with something that is no answer: never asked again.
const ANSWERED_WRONGLY: HeadFailure = HeadFailure {
    written: true,
    closed: false,
};

/// A request ready for the wire.
struct Request {
    out: Outgoing,
    body: RequestBody,
}

impl Request {
    /// Writes the request and reads the final response head.
    async fn exchange_head(
        &self,
        leg: &Leg<'_>,
        mut stream: Stream,
    ) -> Result<(HttpSession, ResponseHeader), HeadFailure> {
        // A write fails on a connection the upstream closed.
        let unwritten = HeadFailure {
            written: false,
            closed: true,
        };
        let mut http = if let Some(head) = &self.out.head {
            // Pingora's session must see a HEAD request go out, or it would wait for a body
            // the answer never has. A body the caller sent with it follows, as announced.
            let mut http = leg.upstream.session(stream);
            http.write_request_header(Box::new(head.clone()))
                .await
                .map_err(|_| unwritten)?;
            let last = self.body.pieces.len().saturating_sub(1);
            for (i, piece) in self.body.pieces.iter().enumerate() {
                http.write_request_body(piece.clone(), i == last)
                    .await
                    .map_err(|_| unwritten)?;
            }
            http.finish_request_body().await.map_err(|_| unwritten)?;
            http
        } else {
            // Head and body in one write (per socket buffer's worth), where pingora's session
            // writes the head and each piece of the body apart: a small POST went to the
            // upstream in three segments and three system calls.
            self.write(&mut stream).await.map_err(|_| unwritten)?;
            leg.upstream.session(stream)
        };
        let mut answered = false;
        loop {
            http.read_response_header().await.map_err(|e| HeadFailure {
                written: true,
                // Closed or reset before any byte of an answer, as an idle connection the
                // upstream dropped is; not an answer begun, or one that could not be parsed.
                closed: !answered
                    && matches!(e.retry, pingora::RetryType::ReusedOnly)
                    && e.context
                        .as_ref()
                        .is_some_and(|c| c.as_str().ends_with("bytes already read: 0")),
            })?;
            answered = true;
            let head = http.response_header().ok_or(ANSWERED_WRONGLY)?;
            // A status outside 100-599 (RFC 9110 15) is no answer; nor is one in a coding
            // Tollgate cannot take off (as nginx: "upstream sent unknown Transfer-Encoding").
            // Passed on, an HTTP/1.0 caller (which knows no codings) would get the coded bytes
            // as if plain, and a coding without `chunked` last leaves the answer's end to the
            // upstream's close, which a kept connection never gives.
            // Nor is a 101: Tollgate asks no upstream to switch protocols (it drops the
            // caller's `Upgrade`), and pingora reads whatever follows one as a raw stream.
            if !(100..600).contains(&head.status.as_u16())
                || head.status == http::StatusCode::SWITCHING_PROTOCOLS
                || !matches!(
                    transfer_coding(&head.headers),
                    TransferCoding::Absent | TransferCoding::Chunked
                )
            {
                return Err(ANSWERED_WRONGLY);
            }
            // 1xx answers (100 Continue, 103 Early Hints) precede the real one.
            if !head.status.is_informational() {
                let head = head.clone();
                return Ok((http, head));
            }
        }
    }

    async fn write(&self, stream: &mut Stream) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut slices: Vec<IoSlice<'_>> = std::iter::once(&self.out.wire[..])
            .chain(self.body.pieces.iter().map(|p| &p[..]))
            .map(IoSlice::new)
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            // The standard library hands writev at most IOV_MAX pieces per call.
            let n = stream.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        stream.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(parts: &[&str]) -> RequestBody {
        let mut body = RequestBody::default();
        for p in parts {
            body.push(Bytes::from(p.to_string()));
        }
        body.finish();
        body
    }

    fn caller(method: &str, target: &str, fields: &[(&str, &str)]) -> RequestHeader {
        let mut head = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        for (name, value) in fields {
            head.append_header(name.to_string(), *value).unwrap();
        }
        head
    }

    fn wire(out: &Outgoing) -> String {
        String::from_utf8(out.wire.to_vec()).unwrap()
    }

    const UPSTREAM: &str = "127.0.0.1:9000";

    #[test]
    fn a_body_of_tiny_pieces_is_kept_in_few_in_order() {
        let mut body = RequestBody::default();
        let mut sent = Vec::new();
        let large = Bytes::from(vec![b'L'; SMALL_PIECE_BYTES]);
        for i in 0..200_000u32 {
            let piece = if i % 50_000 == 7 {
                large.clone()
            } else {
                Bytes::from(vec![b'a' + (i % 26) as u8])
            };
            sent.extend_from_slice(&piece);
            body.push(piece);
        }
        body.finish();
        // A slice per byte was 200,000 of them to hand the upstream.
        assert!(body.pieces.len() < 100, "{} pieces", body.pieces.len());
        assert_eq!(body.len(), sent.len());
        let flat: Vec<u8> = body.pieces.iter().flat_map(|p| p.to_vec()).collect();
        assert_eq!(flat, sent, "every byte, in order");
        assert_eq!(body.prefix(10)[..], sent[..10]);
        assert_eq!(body.whole()[..], sent[..]);
        // Most bodies are a few small pieces: kept as they came, not copied.
        let one = Bytes::from_static(br#"{"a":1}"#);
        let mut body = RequestBody::default();
        body.push(one.clone());
        body.finish();
        assert_eq!(body.pieces.len(), 1);
        assert_eq!(body.pieces[0].as_ptr(), one.as_ptr());
    }

    #[test]
    fn the_upstream_head_keeps_the_callers_fields_in_order_and_case_and_sets_tollgates_own() {
        let head = caller(
            "POST",
            "/a/b?x=1",
            &[
                ("Host", "api.example"),
                ("X-Custom", "one"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "secret"),
                ("accept", "a"),
                ("Authorization", "Bearer t"),
                ("x-tracecode", "forged"),
                ("X_Client", "forged"),
                ("X_Kept", "kept"),
                ("Content-Length", "7"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Expect", "100-continue"),
                ("Accept", "b"),
            ],
        );
        let out = upstream_request(
            &head,
            UPSTREAM,
            2,
            &[("X-Tracecode", "code"), ("X-Client", "acme_|_alice")],
            &["authorization"],
        )
        .unwrap();
        assert_eq!(
            wire(&out),
            "POST /a/b?x=1 HTTP/1.1\r\nHost: api.example\r\nX-Custom: one\r\naccept: a\r\n\
             Accept: b\r\nX_Kept: kept\r\nX-Tracecode: code\r\nX-Client: acme_|_alice\r\n\
             Content-Length: 2\r\n\r\n"
        );
        assert!(out.head.is_none(), "built for HEAD requests only");
    }

    #[test]
    fn the_upstream_head_gets_a_host_and_an_origin_form_target_and_a_length_where_due() {
        // An HTTP/1.0 caller's GET without Host or body.
        let mut head = caller("GET", "/v", &[("User-Agent", "x")]);
        head.set_version(http::Version::HTTP_10);
        let out = upstream_request(&head, UPSTREAM, 0, &[], &[]).unwrap();
        assert_eq!(
            wire(&out),
            "GET /v HTTP/1.1\r\nUser-Agent: x\r\nHost: 127.0.0.1:9000\r\n\r\n"
        );
        // A POST with an empty body says so.
        let out = upstream_request(
            &caller("POST", "/v", &[("Host", "h")]),
            UPSTREAM,
            0,
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(
            wire(&out),
            "POST /v HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
        );
        // An absolute-form target goes on in origin form.
        let mut head = caller("GET", "/", &[("Host", "h")]);
        head.set_uri(http::Uri::from_static("http://h/p/q?r=1"));
        head.set_raw_path(b"http://h/p/q?r=1").unwrap();
        let out = upstream_request(&head, UPSTREAM, 0, &[], &[]).unwrap();
        assert!(
            wire(&out).starts_with("GET /p/q?r=1 HTTP/1.1\r\n"),
            "{}",
            wire(&out)
        );
        // A value that would split the head is refused, not written.
        assert!(upstream_request(
            &caller("GET", "/v", &[("Host", "h")]),
            UPSTREAM,
            0,
            &[("X-Client", "a\r\nX-Evil: 1")],
            &[],
        )
        .is_none());
    }

    #[test]
    fn a_head_request_gets_the_same_head_for_pingoras_session() {
        let out = upstream_request(
            &caller(
                "HEAD",
                "/v",
                &[("Host", "h"), ("X-Custom", "one"), ("Connection", "close")],
            ),
            UPSTREAM,
            0,
            &[("X-Tracecode", "code")],
            &[],
        )
        .unwrap();
        let head = out.head.as_ref().expect("a head for pingora");
        let mut written = BytesMut::new();
        head.header_to_h1_wire(&mut written);
        assert_eq!(
            String::from_utf8(written.to_vec()).unwrap(),
            "Host: h\r\nX-Custom: one\r\nX-Tracecode: code\r\n"
        );
        assert_eq!(head.method, http::Method::HEAD);
        assert_eq!(head.raw_path(), b"/v");
        assert_eq!(
            wire(&out),
            "HEAD /v HTTP/1.1\r\nHost: h\r\nX-Custom: one\r\nX-Tracecode: code\r\n\r\n"
        );
    }

    #[test]
    fn a_body_in_pieces_joins_once_and_gives_any_prefix() {
        // Pieces large enough to be kept as they came (smaller ones are copied together).
        let k = SMALL_PIECE_BYTES;
        let parts = [vec![b'a'; k], vec![], vec![b'b'; k + 1], vec![b'c'; k]];
        let mut body = RequestBody::default();
        for p in &parts {
            body.push(Bytes::from(p.clone()));
        }
        body.finish();
        let all = parts.concat();
        assert_eq!(body.len(), 3 * k + 1);
        assert_eq!(body.pieces.len(), 3, "empty pieces are not kept");
        for n in [0, 2, k, k + 5, 2 * k + 1, 3 * k + 1, 10 * k] {
            assert_eq!(body.prefix(n)[..], all[..n.min(all.len())], "prefix({n})");
        }
        assert_eq!(body.whole()[..], all[..]);
        assert_eq!(body.pieces.len(), 1);
        assert_eq!(body.prefix(4), "aaaa".as_bytes());
        let mut empty = RequestBody::default();
        assert!(empty.is_empty());
        assert_eq!(empty.whole().as_ref(), b"");
        assert!(empty.pieces.is_empty(), "nothing to write upstream");
        assert_eq!(empty.prefix(10), Bytes::new());
        assert_eq!(pieces(&["xyz"]).prefix(2), "xy".as_bytes());
    }

    #[test]
    fn a_body_joined_as_it_arrives_is_one_piece_of_the_same_bytes() {
        for expected in [None, Some(8), Some(3), Some(100)] {
            let mut body = RequestBody::joining(expected);
            assert_eq!(body.received(), b"");
            let mut sent = String::new();
            for p in ["abc", "", "defg", "h"] {
                body.push(Bytes::from(p.to_string()));
                sent.push_str(p);
                assert_eq!(body.received(), sent.as_bytes());
            }
            body.finish();
            assert_eq!(body.len(), 8);
            assert_eq!(body.pieces.len(), 1, "{expected:?}");
            assert_eq!(body.prefix(5), "abcde".as_bytes());
            assert_eq!(body.whole().as_ref(), b"abcdefgh");
        }
        // One piece is never copied.
        let one = Bytes::from_static(b"only");
        let mut body = RequestBody::joining(Some(4));
        body.push(one.clone());
        body.finish();
        assert_eq!(body.pieces[0].as_ptr(), one.as_ptr());
        let mut empty = RequestBody::joining(None);
        empty.finish();
        assert!(empty.is_empty() && empty.pieces.is_empty());
    }
}
