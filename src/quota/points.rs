//! Points counting: what a proxied call costs, read from its JSON request body.
//!
//! A route's [`PointsRule`] names JSON pointers (RFC 6901) to arrays in the body. The points of a
//! call are the sum of the element counts of those arrays; the unique points are the number of
//! distinct elements over all of them, compared by a key pointer evaluated inside each element,
//! or by the whole element. This module owns that counting and the validation of the body it
//! needs: the body is scanned once, in place, without building a document tree; whatever no
//! pointer reaches is validated and skipped. It leaves to others where rules come from (the
//! configuration, which should call [`PointsRule::validate`] when it loads them), what the
//! points are admitted against (the quota), and turning [`InvalidJson`] into a 400 (the proxy).
//!
//! Decisions a route author can rely on:
//! - A pointer that does not resolve, or resolves to something other than an array, counts 0.
//!   It is not an error: the body is still valid JSON, and judging its shape is the upstream
//!   service's job, not the meter's.
//! - An object member name that a pointer (or the key pointer) follows and that occurs twice in
//!   the same object is rejected as [`InvalidJson`]: parsers disagree on which copy wins, so the
//!   points could not be trusted to match what the upstream works on.
//! - Arrays and objects nested deeper than [`MAX_NESTING_DEPTH`] are rejected.
//! - Numbers are checked against the JSON grammar only, not for range.
//! - A `\u` escape of an unpaired UTF-16 surrogate is rejected, as an upstream decoding the
//!   string would reject it.
//! - Two pointers naming the same array count its elements twice in the points, and once in the
//!   unique points.

use std::fmt;
use std::hash::BuildHasher;

/// Deepest nesting of arrays and objects a counted body may have. Deeper bodies are rejected so
/// the scanner's recursion stays bounded whatever the caller sends.
pub const MAX_NESTING_DEPTH: usize = 128;

/// Where in a route's request body its points are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PointsRule {
    /// JSON pointers to the arrays whose elements are the points. Empty: the call costs nothing.
    pub array_pointers: Vec<String>,
    /// JSON pointer, evaluated inside each element, to the value that makes elements the same
    /// for the unique points. None: elements are compared whole.
    pub unique_key_pointer: Option<String>,
}

impl PointsRule {
    /// Checks every pointer against RFC 6901: empty (the whole body or element) or starting with
    /// '/', and every '~' followed by '0' or '1'.
    ///
    /// # Errors
    ///
    /// The first pointer that breaks a rule, in a message naming the pointer and the rule.
    pub fn validate(&self) -> Result<(), String> {
        for (index, pointer) in self.array_pointers.iter().enumerate() {
            check_pointer(pointer)
                .map_err(|why| format!("array_pointers[{index}] {pointer:?}: {why}"))?;
        }
        if let Some(pointer) = &self.unique_key_pointer {
            check_pointer(pointer)
                .map_err(|why| format!("unique_key_pointer {pointer:?}: {why}"))?;
        }
        Ok(())
    }
}

/// The cost of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Points {
    /// Elements of the counted arrays, summed over the rule's pointers.
    pub points: u64,
    /// Distinct elements over all counted arrays.
    pub unique_points: u64,
}

/// Why a body cannot be counted; the proxy answers 400 and does not forward it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidJson {
    /// Byte offset into the body where the problem was found.
    pub offset: usize,
    pub reason: &'static str,
}

impl fmt::Display for InvalidJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.offset, self.reason)
    }
}

impl std::error::Error for InvalidJson {}

const UNEXPECTED_END: &str = "unexpected end of input";
const EXPECTED_VALUE: &str = "expected a JSON value";
const EXPECTED_MEMBER_NAME: &str = "expected a string as object member name";
const EXPECTED_COLON: &str = "expected ':' after object member name";
const EXPECTED_OBJECT_NEXT: &str = "expected ',' or '}' after object member";
const EXPECTED_ARRAY_NEXT: &str = "expected ',' or ']' after array element";
const TRAILING_CHARACTERS: &str = "trailing characters after the JSON value";
const TOO_DEEP: &str = "arrays and objects nested deeper than 128 levels";
const CONTROL_IN_STRING: &str = "unescaped control character in string";
const BAD_ESCAPE: &str = "invalid escape in string";
const BAD_UNICODE_ESCAPE: &str = "invalid \\u escape: expected 4 hex digits";
const LONE_SURROGATE: &str = "\\u escape is an unpaired UTF-16 surrogate";
const BAD_UTF8: &str = "invalid UTF-8 in string";
const LEADING_ZERO: &str = "number has a leading zero";
const DIGIT_AFTER_MINUS: &str = "expected a digit after '-'";
const DIGIT_AFTER_POINT: &str = "expected a digit after the decimal point";
const DIGIT_IN_EXPONENT: &str = "expected a digit in the exponent";
const BAD_LITERAL: &str = "invalid literal (expected true, false or null)";
const DUPLICATE_MEMBER: &str = "object member name repeated on a points pointer path";

/// Counts the points of `body` under `rule`.
///
/// A rule without array pointers costs nothing and does not read the body, so such routes may
/// carry any body. Otherwise the whole body must be valid JSON (RFC 8259), even past the counted
/// arrays. The rule is expected to have passed [`PointsRule::validate`] when the configuration
/// was loaded; a pointer that fails it resolves nowhere here.
///
/// Unique points compare the bytes of the key value (or of the whole element) as sent, with
/// only the insignificant whitespace outside strings left out, so pretty-printed and compact
/// copies of an element are the same. Nothing else is normalised: `"a"` and `"\u0061"`, or `1`
/// and `1.0`, are distinct, as are members in a different order. An element whose key pointer
/// does not resolve is compared by its whole value, and never equals an element that has a key.
/// Values are compared by a 64-bit hash with a seed drawn per call: two different values share
/// a hash, and count once, with a probability of about n²/2⁶⁵ for n elements (3e-10 for
/// 100 000). Collecting 8-byte hashes and dropping the repeats once, rather than keeping the
/// values in a set, is what makes unique counting cheap; it costs 8 bytes per counted element,
/// and 16 to 32 more per hash while the repeats are dropped.
///
/// # Errors
///
/// [`InvalidJson`] when the body is not valid JSON, nests deeper than [`MAX_NESTING_DEPTH`], or
/// repeats a member name that a pointer follows.
pub fn count_points(body: &[u8], rule: &PointsRule) -> Result<Points, InvalidJson> {
    PointsCount::new(rule).finish(body)
}

/// Bytes received between two counts of a body still arriving (see [`PointsCount::feed`]).
const FEED_STEP: usize = 256 << 10;

/// Offsets this close to the end of a prefix may be where the prefix cut a token, not where the
/// body is wrong: an error further back ends the counting of prefixes.
const PREFIX_CUT_SLACK: usize = 64;

/// [`count_points`] for a body that arrives in pieces: most of the counting is done while the
/// rest is still on its way, on bytes still in cache.
///
/// [`PointsCount::feed`] counts what has arrived, as far as the last complete element of the
/// counted array it is in, and keeps that point; the next feed, and [`PointsCount::finish`],
/// walk the body from its start again only as far as that array and go on from the point
/// kept. The result is exactly [`count_points`] of the whole body: what a prefix leaves
/// unfinished, or finds wrong near its end (a token cut in two), is judged again with more
/// bytes, and a feed never fails the body.
pub struct PointsCount {
    plan: Plan,
    /// The rule names arrays: the body must be JSON (even where no pointer resolves).
    reads_body: bool,
    resume: Option<Checkpoint>,
    /// The prefix length the next feed waits for.
    next_feed: usize,
    /// Bytes between two feeds, at least.
    step: usize,
    /// Feeds stopped: the body is invalid, or no longer worth counting in parts.
    stopped: bool,
    #[cfg(test)]
    scans: usize,
}

/// Where a count of a prefix stopped, inside a counted array whose elements no other pointer
/// enters: after the ',' before its first element not yet counted (and perhaps part of the
/// whitespace after it, where the prefix ended).
struct Checkpoint {
    at: Boundary,
    /// Every element counted before `at.pos`.
    distinct: DistinctElements,
}

/// Where a [`Checkpoint`] is, kept by the scanner as it goes.
#[derive(Clone, Copy)]
struct Boundary {
    /// The array's opening '['.
    array_at: usize,
    pos: usize,
    element_count: u64,
    whitespace_runs: usize,
}

impl PointsCount {
    pub fn new(rule: &PointsRule) -> Self {
        PointsCount {
            plan: Plan::new(rule),
            reads_body: !rule.array_pointers.is_empty(),
            resume: None,
            next_feed: FEED_STEP,
            step: FEED_STEP,
            stopped: rule.array_pointers.is_empty(),
            #[cfg(test)]
            scans: 0,
        }
    }

    /// A count that feeds every `step` bytes, to test the going on from a kept point on
    /// small bodies.
    #[cfg(test)]
    fn with_step(rule: &PointsRule, step: usize) -> Self {
        PointsCount {
            next_feed: step,
            step,
            ..PointsCount::new(rule)
        }
    }

    /// Counts `received`, the body as far as it has arrived (each call a longer prefix of the
    /// same body), when enough has arrived since the last count.
    pub fn feed(&mut self, received: &[u8]) {
        if self.stopped || received.len() < self.next_feed {
            return;
        }
        let end = received.len();
        match self.scan(received) {
            // A complete value already: what follows it decides (trailing bytes are an error).
            Ok(_) => self.stopped = true,
            Err(error) if error.offset + PREFIX_CUT_SLACK < end => self.stopped = true,
            Err(_) => {
                // The next count walks again to the kept point's array, and scans again from
                // the kept point (an element still arriving, however long) to here; or all of
                // it, when nothing was kept. Waiting for as many new bytes keeps the scanning
                // again below the body's size in all.
                let again = self
                    .resume
                    .as_ref()
                    .map_or(end, |c| c.at.array_at + (end - c.at.pos));
                self.next_feed = end + self.step.max(again);
            }
        }
    }

    /// Counts the whole `body`, of which every prefix fed was a prefix.
    ///
    /// # Errors
    ///
    /// As [`count_points`].
    pub fn finish(mut self, body: &[u8]) -> Result<Points, InvalidJson> {
        if !self.reads_body {
            return Ok(Points::default());
        }
        self.scan(body)
    }

    fn scan(&mut self, input: &[u8]) -> Result<Points, InvalidJson> {
        let mut scanner = Scanner::new(input, &self.plan);
        scanner.resume = self.resume.take();
        for tokens in &self.plan.pointers {
            scanner.cursors.push(Cursor::start(tokens, Target::Array));
        }
        #[cfg(test)]
        {
            self.scans += 1;
        }
        let walked = scanner.walk_body();
        match walked {
            Ok(()) => Ok(Points {
                points: scanner.points,
                unique_points: scanner.distinct.count(),
            }),
            Err(error) => {
                self.resume = scanner.boundary.map(|at| Checkpoint {
                    at,
                    distinct: std::mem::take(&mut scanner.distinct),
                });
                Err(error)
            }
        }
    }
}

/// Whether `pointer` is an RFC 6901 JSON pointer; the rule it breaks when not.
pub fn check_pointer(pointer: &str) -> Result<(), &'static str> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err("a JSON pointer must be empty (the whole value) or start with '/' (RFC 6901)");
    }
    let bytes = pointer.as_bytes();
    for (index, &byte) in bytes.iter().enumerate() {
        if byte == b'~' && !matches!(bytes.get(index + 1), Some(b'0' | b'1')) {
            return Err("'~' must be followed by '0' (for '~') or '1' (for '/') (RFC 6901)");
        }
    }
    Ok(())
}

/// One reference token of a pointer, ready to compare against member names and array indices.
struct Token {
    name: Vec<u8>,
    /// The array index the token denotes; RFC 6901 forbids leading zeros, and "-" (past the end)
    /// never names an existing element.
    index: Option<usize>,
}

fn parse_pointer(pointer: &str) -> Option<Vec<Token>> {
    check_pointer(pointer).ok()?;
    Some(pointer.split('/').skip(1).map(parse_token).collect())
}

fn parse_token(escaped: &str) -> Token {
    // `check_pointer` guarantees every '~' is followed by '0' or '1'; decoding left to right
    // makes "~01" the name "~1", as RFC 6901 requires.
    let mut name = Vec::with_capacity(escaped.len());
    let mut bytes = escaped.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'~' {
            name.push(if bytes.next() == Some(b'1') {
                b'/'
            } else {
                b'~'
            });
        } else {
            name.push(byte);
        }
    }
    let index = match name.as_slice() {
        [b'0'] => Some(0),
        [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(&name)
                .ok()
                .and_then(|digits| digits.parse().ok())
        }
        _ => None,
    };
    Token { name, index }
}

/// A rule compiled for one scan.
struct Plan {
    pointers: Vec<Vec<Token>>,
    /// None: every element is compared whole.
    key: Option<Vec<Token>>,
}

impl Plan {
    fn new(rule: &PointsRule) -> Self {
        Plan {
            pointers: rule
                .array_pointers
                .iter()
                .filter_map(|pointer| parse_pointer(pointer))
                .collect(),
            key: rule.unique_key_pointer.as_deref().and_then(parse_pointer),
        }
    }
}

/// What a pointer being followed will find: a counted array, or the key of an element.
#[derive(Clone, Copy)]
enum Target {
    Array,
    /// Index into `Scanner::key_spans`: the element whose key this is.
    Key(usize),
}

/// A pointer followed as far as the value being scanned: its first `next` tokens matched the
/// path to it.
#[derive(Clone, Copy)]
struct Cursor<'p> {
    tokens: &'p [Token],
    next: usize,
    target: Target,
    /// Set once the next token matched a member of the object being scanned, to catch a repeat.
    matched: bool,
}

impl<'p> Cursor<'p> {
    fn start(tokens: &'p [Token], target: Target) -> Self {
        Cursor {
            tokens,
            next: 0,
            target,
            matched: false,
        }
    }

    fn next_token(&self) -> Option<&'p Token> {
        self.tokens.get(self.next)
    }

    fn is_complete(&self) -> bool {
        self.next == self.tokens.len()
    }

    fn advanced(&self) -> Self {
        Cursor {
            next: self.next + 1,
            matched: false,
            ..*self
        }
    }
}

/// Where a value lies in the body.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    /// Insignificant whitespace occurs inside, so the value must be compacted before comparing.
    has_whitespace: bool,
}

struct Scanner<'a, 'p> {
    input: &'a [u8],
    pos: usize,
    plan: &'p Plan,
    /// Pointers being followed; the cursors of the value being scanned are a range at the top,
    /// and those of its children are pushed above it while the child is scanned.
    cursors: Vec<Cursor<'p>>,
    /// Per element being identified (innermost last): its key, once found.
    key_spans: Vec<Option<Span>>,
    /// Count of whitespace runs skipped so far; a value contains whitespace when it changed
    /// while the value was scanned.
    whitespace_runs: usize,
    name_buffer: Vec<u8>,
    guesses: LengthGuesses,
    /// Strings scanned since the innermost object opened, for [`LengthGuesses`].
    ordinal: usize,
    points: u64,
    distinct: DistinctElements,
    /// Where to go on from, when the walk reaches its array.
    resume: Option<Checkpoint>,
    /// Where the innermost counted array being scanned was when the scan failed.
    boundary: Option<Boundary>,
}

impl<'a, 'p> Scanner<'a, 'p> {
    fn new(input: &'a [u8], plan: &'p Plan) -> Self {
        Scanner {
            input,
            pos: 0,
            plan,
            cursors: Vec::new(),
            key_spans: Vec::new(),
            whitespace_runs: 0,
            name_buffer: Vec::new(),
            guesses: LengthGuesses::default(),
            ordinal: 0,
            points: 0,
            distinct: DistinctElements::default(),
            resume: None,
            boundary: None,
        }
    }

    /// Scans the whole input, a JSON value with whitespace around it, following the cursors
    /// pushed for it.
    fn walk_body(&mut self) -> Result<(), InvalidJson> {
        self.skip_whitespace();
        if self.cursors.is_empty() {
            self.skip_value(0)?;
        } else {
            self.walk(0, 0)?;
        }
        self.skip_whitespace();
        if self.pos != self.input.len() {
            return Err(invalid(self.pos, TRAILING_CHARACTERS));
        }
        Ok(())
    }

    /// [`skip_whitespace_counting`] at `pos`.
    #[inline(always)]
    fn skip_whitespace(&mut self) {
        match self.input.get(self.pos) {
            Some(&byte) if byte > b' ' => {}
            _ => {
                let end = skip_whitespace_run(self.input, self.pos);
                if end != self.pos {
                    self.whitespace_runs += 1;
                    self.pos = end;
                }
            }
        }
    }

    #[inline(always)]
    fn peek(&self) -> Result<u8, InvalidJson> {
        match self.input.get(self.pos) {
            Some(&byte) => Ok(byte),
            None => Err(invalid(self.pos, UNEXPECTED_END)),
        }
    }

    /// The byte at `pos`, or after the whitespace there when that byte is not `expected`: the
    /// usual case, no whitespace and the expected byte, costs one comparison.
    #[inline(always)]
    fn peek_expecting(&mut self, expected: u8) -> Result<u8, InvalidJson> {
        match self.input.get(self.pos) {
            Some(&byte) if byte == expected => Ok(byte),
            _ => {
                self.skip_whitespace();
                self.peek()
            }
        }
    }

    /// Scans the value at `pos` (a JSON value starts there, whitespace already skipped) with the
    /// cursors `cursors[lo..]`, at least one, following pointers through it; `depth` is the
    /// number of arrays and objects around it.
    fn walk(&mut self, lo: usize, depth: usize) -> Result<(), InvalidJson> {
        let hi = self.cursors.len();
        let start = self.pos;
        let whitespace_before = self.whitespace_runs;
        match self.peek()? {
            b'{' => self.walk_object(lo, hi, depth)?,
            b'[' => self.walk_array(lo, hi, depth)?,
            _ => self.skip_value(depth)?,
        }
        let span = Span {
            start,
            end: self.pos,
            has_whitespace: self.whitespace_runs != whitespace_before,
        };
        for cursor in &self.cursors[lo..hi] {
            if let Target::Key(element) = cursor.target {
                if cursor.is_complete() {
                    self.key_spans[element] = Some(span);
                }
            }
        }
        Ok(())
    }

    /// Scans the value at `pos` with whatever cursors were pushed above `hi` for it.
    #[inline(always)]
    fn walk_child(&mut self, hi: usize, depth: usize) -> Result<(), InvalidJson> {
        if self.cursors.len() == hi {
            self.skip_value(depth)
        } else {
            self.walk(hi, depth)?;
            self.cursors.truncate(hi);
            Ok(())
        }
    }

    fn walk_object(&mut self, lo: usize, hi: usize, depth: usize) -> Result<(), InvalidJson> {
        if depth >= MAX_NESTING_DEPTH {
            return Err(invalid(self.pos, TOO_DEEP));
        }
        let input = self.input;
        let any_open = self.cursors[lo..hi]
            .iter()
            .any(|cursor| !cursor.is_complete());
        self.ordinal = 0;
        self.pos += 1;
        self.skip_whitespace();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let name_at = self.pos;
            if self.peek()? != b'"' {
                return Err(invalid(name_at, EXPECTED_MEMBER_NAME));
            }
            let (after_name, contents) = scan_string(input, name_at)?;
            self.pos = after_name;
            self.skip_whitespace();
            if self.peek()? != b':' {
                return Err(invalid(self.pos, EXPECTED_COLON));
            }
            self.pos += 1;
            self.skip_whitespace();
            if any_open {
                let raw_name = &input[name_at + 1..after_name - 1];
                let name: &[u8] = if contents == Contents::Escaped {
                    decode_string(raw_name, &mut self.name_buffer);
                    &self.name_buffer
                } else {
                    raw_name
                };
                for index in lo..hi {
                    let cursor = self.cursors[index];
                    if cursor
                        .next_token()
                        .is_some_and(|token| same_bytes(&token.name, name))
                    {
                        if cursor.matched {
                            return Err(invalid(name_at, DUPLICATE_MEMBER));
                        }
                        self.cursors[index].matched = true;
                        self.cursors.push(cursor.advanced());
                    }
                }
            }
            self.walk_child(hi, depth + 1)?;
            self.skip_whitespace();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_whitespace();
                }
                b'}' => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(invalid(self.pos, EXPECTED_OBJECT_NEXT)),
            }
        }
    }

    fn walk_array(&mut self, lo: usize, hi: usize, depth: usize) -> Result<(), InvalidJson> {
        if depth >= MAX_NESTING_DEPTH {
            return Err(invalid(self.pos, TOO_DEEP));
        }
        let mut counted_by: u64 = 0;
        let mut any_open = false;
        for cursor in &self.cursors[lo..hi] {
            if !cursor.is_complete() {
                any_open = true;
            } else if let Target::Array = cursor.target {
                counted_by += 1;
            }
        }
        // An array counted element by element, each element a unit: a count can stop and go on
        // between two elements (see `PointsCount`).
        let resumable = counted_by > 0 && !any_open;
        let array_at = self.pos;
        let mut element_count: u64 = 0;
        match self.resume.as_ref() {
            Some(kept) if resumable && kept.at.array_at == array_at => {
                let kept = self.resume.take().expect("matched above");
                self.pos = kept.at.pos;
                self.whitespace_runs = kept.at.whitespace_runs;
                self.distinct = kept.distinct;
                element_count = kept.at.element_count;
                // The prefix may have ended inside the whitespace before the element.
                self.skip_whitespace();
            }
            _ => {
                self.pos += 1;
                self.skip_whitespace();
                if self.peek()? == b']' {
                    self.pos += 1;
                    return Ok(());
                }
            }
        }
        if resumable {
            let mut boundary = Boundary {
                array_at,
                pos: self.pos,
                element_count,
                whitespace_runs: self.whitespace_runs,
            };
            if let Err(error) = self.count_elements(hi, depth, &mut boundary) {
                if self.boundary.is_none() {
                    self.boundary = Some(boundary);
                }
                return Err(error);
            }
            element_count = boundary.element_count;
        } else {
            let key_tokens = self.plan.key.as_deref();
            loop {
                if any_open {
                    for index in lo..hi {
                        let cursor = self.cursors[index];
                        let is_this_element = cursor.next_token().is_some_and(|token| {
                            token.index.is_some_and(|i| i as u64 == element_count)
                        });
                        if is_this_element {
                            self.cursors.push(cursor.advanced());
                        }
                    }
                }
                if counted_by > 0 {
                    let element = self.count_element_by_cursor(key_tokens, hi, depth + 1)?;
                    self.distinct.add(element);
                } else {
                    self.walk_child(hi, depth + 1)?;
                }
                element_count += 1;
                if self.array_next()? {
                    break;
                }
            }
        }
        self.points = self
            .points
            .saturating_add(element_count.saturating_mul(counted_by));
        Ok(())
    }

    /// The elements of a counted array that no pointer but the key pointer enters, from `pos`
    /// (an element's start) to past the closing ']'; `boundary` follows the element starts.
    #[inline(always)]
    fn count_elements(
        &mut self,
        hi: usize,
        depth: usize,
        boundary: &mut Boundary,
    ) -> Result<(), InvalidJson> {
        loop {
            let element = self.count_element(hi, depth + 1)?;
            // Added once the byte after it shows it whole: a prefix can cut a number short.
            let closed = self.array_next()?;
            self.distinct.add(element);
            boundary.element_count += 1;
            if closed {
                return Ok(());
            }
            boundary.pos = self.pos;
            boundary.whitespace_runs = self.whitespace_runs;
        }
    }

    /// Steps over what follows an array element: true past the closing ']', false at the start
    /// of the next element.
    #[inline(always)]
    fn array_next(&mut self) -> Result<bool, InvalidJson> {
        match self.peek_expecting(b',')? {
            b',' => {
                self.pos += 1;
                self.skip_whitespace();
                Ok(false)
            }
            b']' => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(invalid(self.pos, EXPECTED_ARRAY_NEXT)),
        }
    }

    /// Scans the element at `pos` of a counted array that no pointer but the key pointer leads
    /// into, and adds it to the distinct elements. The usual keys, none, the whole element, or
    /// one member of an object element, need no cursor: this is the per-element path of the
    /// usual rules. `hi` and `depth` are as for [`Scanner::walk_child`].
    #[inline(always)]
    fn count_element(&mut self, hi: usize, depth: usize) -> Result<Element, InvalidJson> {
        let start = self.pos;
        let whitespace_before = self.whitespace_runs;
        let key = match self.plan.key.as_deref() {
            None => {
                self.skip_value(depth)?;
                None
            }
            Some([token]) if self.input.get(start) == Some(&b'{') => {
                self.find_member(token, depth)?
            }
            // An array element has no member, and the key names none of its elements.
            Some([token]) if token.index.is_none() || self.input.get(start) != Some(&b'[') => {
                self.skip_value(depth)?;
                None
            }
            Some([]) => {
                self.skip_value(depth)?;
                Some(Span {
                    start,
                    end: self.pos,
                    has_whitespace: self.whitespace_runs != whitespace_before,
                })
            }
            Some(tokens) => return self.count_element_by_cursor(Some(tokens), hi, depth),
        };
        let whole = Span {
            start,
            end: self.pos,
            has_whitespace: self.whitespace_runs != whitespace_before,
        };
        Ok(self.distinct.element(self.input, key, whole))
    }

    /// [`Scanner::count_element`] for any key pointer (`key_tokens`), and other pointers into
    /// the element (the cursors pushed above `hi`): a cursor follows the key pointer.
    #[inline(never)]
    fn count_element_by_cursor(
        &mut self,
        key_tokens: Option<&'p [Token]>,
        hi: usize,
        depth: usize,
    ) -> Result<Element, InvalidJson> {
        let start = self.pos;
        let whitespace_before = self.whitespace_runs;
        let element = self.key_spans.len();
        self.key_spans.push(None);
        if let Some(tokens) = key_tokens {
            self.cursors
                .push(Cursor::start(tokens, Target::Key(element)));
        }
        self.walk_child(hi, depth)?;
        let key = self.key_spans.pop().flatten();
        let whole = Span {
            start,
            end: self.pos,
            has_whitespace: self.whitespace_runs != whitespace_before,
        };
        Ok(self.distinct.element(self.input, key, whole))
    }

    /// The member name at `pos` (or after the whitespace there) and the ':' after it, in an
    /// object `depth` deep, for [`Scanner::find_member`]: where the name is, and whether it is
    /// `token`'s. Leaves `pos` at the value.
    #[inline(always)]
    fn scan_member_name(
        &mut self,
        token: &Token,
        depth: usize,
    ) -> Result<(usize, bool), InvalidJson> {
        let input = self.input;
        if self.peek_expecting(b'"')? != b'"' {
            return Err(invalid(self.pos, EXPECTED_MEMBER_NAME));
        }
        let name_at = self.pos;
        let place = guess_place(depth + 1, self.ordinal);
        let ordinal = &mut self.ordinal;
        let (after_name, contents) = self.guesses.scan(input, name_at, depth + 1, ordinal)?;
        self.pos = after_name;
        if self.peek_expecting(b':')? != b':' {
            return Err(invalid(self.pos, EXPECTED_COLON));
        }
        self.pos += 1;
        self.skip_whitespace();
        let raw_name = &input[name_at + 1..after_name - 1];
        let is_key = if contents == Contents::Escaped {
            decode_string(raw_name, &mut self.name_buffer);
            same_bytes(&token.name, &self.name_buffer)
        } else {
            same_bytes(&token.name, raw_name)
        };
        if contents == Contents::Plain {
            let key = LengthGuesses::KEY_KNOWN | if is_key { LengthGuesses::IS_KEY } else { 0 };
            self.guesses
                .remember_name(input, name_at, after_name, place, key);
        }
        Ok((name_at, is_key))
    }

    /// [`Scanner::walk_object`] for an object element whose key is its member named by `token`,
    /// with no other pointer into it. Returns where the key's value is, if the member is there.
    fn find_member(&mut self, token: &Token, depth: usize) -> Result<Option<Span>, InvalidJson> {
        if depth >= MAX_NESTING_DEPTH {
            return Err(invalid(self.pos, TOO_DEEP));
        }
        let input = self.input;
        let mut key = None;
        self.ordinal = 0;
        self.pos += 1;
        if self.peek_expecting(b'"')? == b'}' {
            self.pos += 1;
            return Ok(None);
        }
        loop {
            let recalled = self
                .guesses
                .recall_name(input, self.pos, depth + 1, self.ordinal);
            let (name_at, is_key) = match recalled {
                Some((after_colon, info)) if info & LengthGuesses::KEY_KNOWN != 0 => {
                    let name_at = self.pos;
                    self.ordinal += 1;
                    self.pos = after_colon;
                    self.skip_whitespace();
                    (name_at, info & LengthGuesses::IS_KEY != 0)
                }
                _ => self.scan_member_name(token, depth)?,
            };
            if is_key {
                if key.is_some() {
                    return Err(invalid(name_at, DUPLICATE_MEMBER));
                }
                let start = self.pos;
                let whitespace_before = self.whitespace_runs;
                self.skip_value(depth + 1)?;
                key = Some(Span {
                    start,
                    end: self.pos,
                    has_whitespace: self.whitespace_runs != whitespace_before,
                });
            } else {
                self.skip_value(depth + 1)?;
            }
            match self.peek_expecting(b',')? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Ok(key);
                }
                _ => return Err(invalid(self.pos, EXPECTED_OBJECT_NEXT)),
            }
        }
    }

    /// Validates and steps over the value at `pos` without following any pointer into it.
    #[inline(always)]
    fn skip_value(&mut self, depth: usize) -> Result<(), InvalidJson> {
        // Most skipped values are member values that are strings or numbers: no call for those.
        match self.input.get(self.pos) {
            Some(b'"') => {
                let (guesses, ordinal) = (&mut self.guesses, &mut self.ordinal);
                self.pos = guesses.scan(self.input, self.pos, depth, ordinal)?.0;
            }
            Some(b'-' | b'0'..=b'9') => self.pos = scan_number(self.input, self.pos)?,
            _ => {
                self.skip_structure(depth)?;
            }
        }
        Ok(())
    }

    /// [`Scanner::skip_value`] for any value. Iterative, so the only bound on nesting is the
    /// explicit one.
    fn skip_structure(&mut self, depth: usize) -> Result<(), InvalidJson> {
        let input = self.input;
        let mut pos = self.pos;
        let mut whitespace_runs = self.whitespace_runs;
        // One bit per container opened inside this value, innermost in bit 0: set for objects.
        let mut object_bits: u128 = 0;
        let mut open: usize = 0;
        // A local, as `pos` is, so that it stays in a register (about 5% on the bench).
        let mut ordinal = self.ordinal;
        // Per container open: the ordinal in the container around it, taken up again when it
        // closes, so that the members after a nested container keep their places (without it,
        // they would take the places its strings left off at, and share them with other names).
        let mut outer_ordinals = [0u8; MAX_NESTING_DEPTH];
        // Whitespace, rare between tokens, is stepped over where a token was expected and
        // something else found, rather than looked for before every token.
        'value: loop {
            let Some(&first) = input.get(pos) else {
                return Err(invalid(pos, UNEXPECTED_END));
            };
            match first {
                b' ' | b'\t' | b'\n' | b'\r' => {
                    pos = skip_whitespace_counting(input, pos, &mut whitespace_runs);
                    continue 'value;
                }
                b'"' => {
                    let guesses = &mut self.guesses;
                    pos = guesses.scan(input, pos, depth + open, &mut ordinal)?.0;
                }
                b'{' | b'[' => {
                    if depth + open >= MAX_NESTING_DEPTH {
                        return Err(invalid(pos, TOO_DEEP));
                    }
                    let is_object = first == b'{';
                    pos = skip_whitespace_counting(input, pos + 1, &mut whitespace_runs);
                    let close = if is_object { b'}' } else { b']' };
                    if input.get(pos) == Some(&close) {
                        pos += 1;
                    } else {
                        object_bits = (object_bits << 1) | u128::from(is_object);
                        // Wrapping is harmless: places are taken modulo 256.
                        outer_ordinals[open % MAX_NESTING_DEPTH] = ordinal as u8;
                        open += 1;
                        if is_object {
                            ordinal = 0;
                            let (guesses, runs) = (&mut self.guesses, &mut whitespace_runs);
                            let name_place = (depth + open, &mut ordinal);
                            pos = skip_member_name(input, pos, runs, guesses, name_place)?;
                        }
                        continue 'value;
                    }
                }
                b'-' | b'0'..=b'9' => pos = scan_number(input, pos)?,
                b't' => pos = scan_literal(input, pos, b"true")?,
                b'f' => pos = scan_literal(input, pos, b"false")?,
                b'n' => pos = scan_literal(input, pos, b"null")?,
                _ => return Err(invalid(pos, EXPECTED_VALUE)),
            }
            // A value ended: close the containers it completes, then go to the next value.
            loop {
                if open == 0 {
                    self.pos = pos;
                    self.whitespace_runs = whitespace_runs;
                    self.ordinal = ordinal;
                    return Ok(());
                }
                let in_object = object_bits & 1 == 1;
                match input.get(pos) {
                    Some(b',') => {
                        pos += 1;
                        if in_object {
                            let (guesses, runs) = (&mut self.guesses, &mut whitespace_runs);
                            let name_place = (depth + open, &mut ordinal);
                            pos = skip_member_name(input, pos, runs, guesses, name_place)?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if in_object => {}
                    Some(b']') if !in_object => {}
                    Some(b' ' | b'\t' | b'\n' | b'\r') => {
                        pos = skip_whitespace_counting(input, pos, &mut whitespace_runs);
                        continue;
                    }
                    Some(_) if in_object => return Err(invalid(pos, EXPECTED_OBJECT_NEXT)),
                    Some(_) => return Err(invalid(pos, EXPECTED_ARRAY_NEXT)),
                    None => return Err(invalid(pos, UNEXPECTED_END)),
                }
                pos += 1;
                object_bits >>= 1;
                open -= 1;
                ordinal = usize::from(outer_ordinals[open % MAX_NESTING_DEPTH]);
            }
        }
    }
}

fn invalid(offset: usize, reason: &'static str) -> InvalidJson {
    InvalidJson { offset, reason }
}

/// Byte equality without a library call: member names are short, and most differ at once.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Hashes collected before duplicates are dropped early. Below it, one pass at the end does
/// all the work; above it, memory stays within this many hashes (8 MiB) or twice the distinct
/// ones, however repetitive the body.
const HASHES_BEFORE_EARLY_DEDUP: usize = 1 << 20;

/// The elements of the counted arrays, as seeded hashes (see [`count_points`]), deduplicated
/// when counted. Keys and whole elements are kept apart so an unkeyed element never equals a
/// key.
#[derive(Default)]
struct DistinctElements {
    seed: foldhash::fast::RandomState,
    keys: Vec<u64>,
    whole_elements: Vec<u64>,
    compact_buffer: Vec<u8>,
}

/// A counted element as compared: the hash of its key, or of all of it when it has none.
#[derive(Clone, Copy)]
struct Element {
    hash: u64,
    keyed: bool,
}

impl DistinctElements {
    /// The element spanning `whole`, whose key (if the key pointer resolved) spans `key`.
    #[inline(always)]
    fn element(&mut self, input: &[u8], key: Option<Span>, whole: Span) -> Element {
        Element {
            hash: self.hash(input, key.unwrap_or(whole)),
            keyed: key.is_some(),
        }
    }

    #[inline(always)]
    fn add(&mut self, element: Element) {
        let hashes = if element.keyed {
            &mut self.keys
        } else {
            &mut self.whole_elements
        };
        add_hash(hashes, element.hash);
    }

    fn hash(&mut self, input: &[u8], span: Span) -> u64 {
        let raw = &input[span.start..span.end];
        if has_backslash(raw) {
            canonical_into(raw, &mut self.compact_buffer);
            self.seed.hash_one(self.compact_buffer.as_slice())
        } else if span.has_whitespace {
            compact_into(raw, &mut self.compact_buffer);
            self.seed.hash_one(self.compact_buffer.as_slice())
        } else {
            self.seed.hash_one(raw)
        }
    }

    fn count(&mut self) -> u64 {
        let mut distinct = 0;
        for hashes in [&mut self.keys, &mut self.whole_elements] {
            deduplicate(hashes);
            distinct += hashes.len() as u64;
        }
        distinct
    }
}

/// Room for this many hashes is made at the first one: a usual request body's elements in one
/// allocation (1 KiB), rather than growing through 4, 8, 16 and on.
const FIRST_HASH_CAPACITY: usize = 128;

#[inline(always)]
fn add_hash(hashes: &mut Vec<u64>, hash: u64) {
    if hashes.len() == hashes.capacity() {
        if hashes.capacity() == 0 {
            hashes.reserve_exact(FIRST_HASH_CAPACITY);
        } else if hashes.len() >= HASHES_BEFORE_EARLY_DEDUP {
            deduplicate(hashes);
        }
    }
    hashes.push(hash);
}

/// Slots of the largest table [`deduplicate`] keeps on the stack (4 KiB): enough for 128 hashes.
const SMALL_TABLE_SLOTS: usize = 512;

/// Drops repeated hashes, keeping one of each (in no particular order).
///
/// Each hash is its own place in a table: the top bits of its product with an odd constant,
/// with linear probing in a table at most half full. That is a few times faster than sorting them
/// (for 100 000 hashes, about 0.5 ms against 1.6 ms), for 16 to 32 bytes per hash while it
/// runs. 0 marks a free slot, so the hash 0 is tracked apart.
fn deduplicate(hashes: &mut Vec<u64>) {
    if hashes.len() < 2 {
        return;
    }
    // At most a quarter full when the table fits on the stack, else half: a probe past the
    // first slot is a mispredicted branch, the larger part of the time here for small tables.
    let slot_count = if 4 * hashes.len() <= SMALL_TABLE_SLOTS {
        (4 * hashes.len()).next_power_of_two()
    } else {
        (2 * hashes.len()).next_power_of_two()
    };
    let last_slot = slot_count - 1;
    let shift = 64 - slot_count.trailing_zeros();
    // Tables of the usual request bodies' size live on the stack: no allocation to clear.
    let mut small = [0u64; SMALL_TABLE_SLOTS];
    let mut large = Vec::new();
    let slots = if slot_count <= SMALL_TABLE_SLOTS {
        &mut small[..slot_count]
    } else {
        large.resize(slot_count, 0u64);
        &mut large[..]
    };
    let mut zero_seen = false;
    let mut kept = 0;
    for read in 0..hashes.len() {
        let hash = hashes[read];
        let is_new = if hash == 0 {
            !std::mem::replace(&mut zero_seen, true)
        } else {
            // Mixed first: the top bits of hashes of similar short keys crowd together, and
            // the probe chains with them (a third faster for the load bench's keys).
            let mut index = (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize;
            loop {
                match slots[index] {
                    0 => {
                        slots[index] = hash;
                        break true;
                    }
                    slot if slot == hash => break false,
                    _ => index = (index + 1) & last_slot,
                }
            }
        };
        if is_new {
            hashes[kept] = hash;
            kept += 1;
        }
    }
    hashes.truncate(kept);
}

/// Copies a validated JSON value without the whitespace outside its strings.
fn compact_into(raw: &[u8], compact: &mut Vec<u8>) {
    compact.clear();
    let mut in_string = false;
    let mut after_backslash = false;
    for &byte in raw {
        if in_string {
            if after_backslash {
                after_backslash = false;
            } else if byte == b'\\' {
                after_backslash = true;
            } else if byte == b'"' {
                in_string = false;
            }
            compact.push(byte);
        } else if !is_whitespace(byte) {
            in_string = byte == b'"';
            compact.push(byte);
        }
    }
}

/// Whether `raw` holds a '\\'. Keys are mostly short: below 32 bytes a word at a time
/// beats the call into `memchr`.
#[inline(always)]
fn has_backslash(raw: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    if raw.len() >= 32 {
        return memchr::memchr(b'\\', raw).is_some();
    }
    let mut words = raw.chunks_exact(8);
    for word in &mut words {
        let word = u64::from_ne_bytes(word.try_into().unwrap_or_default()) ^ BACKSLASHES;
        // A zero byte of `word` is a backslash of `raw`.
        if word.wrapping_sub(ONES) & !word & HIGHS != 0 {
            return true;
        }
    }
    words.remainder().contains(&b'\\')
}

/// `raw` (valid JSON text) as compared when it holds escapes: whitespace outside strings
/// dropped (as [`compact_into`] does), and every string written one way, so that `"\u0061"`,
/// `"a"` and `"\/"`, `"/"` compare equal. Each escape is decoded; the decoded `"`, `\` and
/// control characters are written `\"`, `\\` and `\u00xx`, every other character as its UTF-8.
fn canonical_into(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut pos = 0;
    let mut in_string = false;
    while let Some(&byte) = raw.get(pos) {
        pos += 1;
        if !in_string {
            if !is_whitespace(byte) {
                in_string = byte == b'"';
                out.push(byte);
            }
            continue;
        }
        match byte {
            b'"' => {
                in_string = false;
                out.push(byte);
            }
            b'\\' => {
                let (decoded, used) = decode_escape(&raw[pos..]);
                pos += used;
                match decoded {
                    Some(c) => push_canonical_char(c, out),
                    // Not an escape the scanner lets through: kept as written.
                    None => out.push(byte),
                }
            }
            _ => out.push(byte),
        }
    }
}

/// The character an escape stands for (`rest` follows its backslash), and how many bytes of
/// `rest` it takes.
fn decode_escape(rest: &[u8]) -> (Option<char>, usize) {
    let hex4 = |at: usize| -> Option<u32> {
        let digits = std::str::from_utf8(rest.get(at..at + 4)?).ok()?;
        u32::from_str_radix(digits, 16).ok()
    };
    let simple = match rest.first() {
        Some(b'"') => '"',
        Some(b'\\') => '\\',
        Some(b'/') => '/',
        Some(b'b') => '\u{8}',
        Some(b'f') => '\u{c}',
        Some(b'n') => '\n',
        Some(b'r') => '\r',
        Some(b't') => '\t',
        Some(b'u') => {
            let Some(unit) = hex4(1) else {
                return (None, 0);
            };
            if (0xD800..0xDC00).contains(&unit) && rest.get(5..7) == Some(b"\\u") {
                if let Some(low @ 0xDC00..0xE000) = hex4(7) {
                    let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                    return (char::from_u32(c), 11);
                }
            }
            return match char::from_u32(unit) {
                Some(c) => (Some(c), 5),
                None => (None, 0),
            };
        }
        _ => return (None, 0),
    };
    (Some(simple), 1)
}

fn push_canonical_char(c: char, out: &mut Vec<u8>) {
    match c {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        c if (c as u32) < 0x20 => {
            out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
        }
        c => {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
}

// The scanning helpers below are `#[inline(always)]`: they sit on the per-token path, and
// leaving the choice to the compiler made the bench about 15% slower.

#[inline(always)]
fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

#[inline(never)]
fn skip_whitespace_run(input: &[u8], mut pos: usize) -> usize {
    while input.get(pos).is_some_and(|&byte| is_whitespace(byte)) {
        pos += 1;
    }
    pos
}

/// Steps over insignificant whitespace, counting the runs stepped over. JSON whitespace is at
/// most ' ' and every byte that starts or continues JSON text is above it, so the usual case,
/// none, is one comparison; the counting is left to the other case, as it is on every token.
#[inline(always)]
fn skip_whitespace_counting(input: &[u8], pos: usize, whitespace_runs: &mut usize) -> usize {
    match input.get(pos) {
        Some(&byte) if byte > b' ' => pos,
        _ => {
            let end = skip_whitespace_run(input, pos);
            *whitespace_runs += usize::from(end != pos);
            end
        }
    }
}

/// Steps over the whitespace before `"name"`, the name, and `:` with the whitespace before it.
/// Whitespace is looked for only where the next byte is not the one expected. The name is at
/// `(depth, ordinal)` (see [`LengthGuesses`]).
#[inline(always)]
fn skip_member_name(
    input: &[u8],
    mut pos: usize,
    whitespace_runs: &mut usize,
    guesses: &mut LengthGuesses,
    (depth, ordinal): (usize, &mut usize),
) -> Result<usize, InvalidJson> {
    if let Some((after_colon, _)) = guesses.recall_name(input, pos, depth, *ordinal) {
        *ordinal += 1;
        return Ok(after_colon);
    }
    if input.get(pos) != Some(&b'"') {
        pos = skip_whitespace_counting(input, pos, whitespace_runs);
        if input.get(pos) != Some(&b'"') {
            return Err(invalid(pos, EXPECTED_MEMBER_NAME));
        }
    }
    let place = guess_place(depth, *ordinal);
    let (after_name, contents) = guesses.scan(input, pos, depth, ordinal)?;
    if contents == Contents::Plain {
        guesses.remember_name(input, pos, after_name, place, 0);
    }
    pos = after_name;
    if input.get(pos) != Some(&b':') {
        pos = skip_whitespace_counting(input, pos, whitespace_runs);
        if input.get(pos) != Some(&b':') {
            return Err(invalid(pos, EXPECTED_COLON));
        }
    }
    Ok(pos + 1)
}

/// Guessed lengths of the strings about to be scanned, by their place in the body: the nesting
/// depth, and the count of strings since the innermost object opened (the ordinal).
///
/// Request bodies are mostly arrays of records of one shape, and the strings at one place in
/// each record - member names, and values such as identifiers and timestamps - mostly have one
/// length. Scanning a string is otherwise the longest chain of dependent instructions per token
/// (load the block, find the quote, add its offset: the next token waits for all of it). A
/// guess turns that into a branch, predicted, that a comparison of the guessed bytes confirms
/// off that chain. A wrong guess costs a misprediction, so a place is guessed only after its
/// last two strings had the same length and no byte needing a look. On the bench body this
/// makes skipping about 10% faster; on records whose strings all vary in length, a few percent
/// slower.
///
/// Every scan of an object restarts the ordinal, so the members of sibling records share
/// places; places far apart may share a slot, which only costs guesses.
///
/// The places also remember member names, quotes and ':' included, so that a name repeated at
/// its place is stepped over by one comparison (see [`LengthGuesses::recall_name`]). Like the
/// guesses, this changes how fast a body is judged, never how.
struct LengthGuesses {
    /// Per place: the length through the closing quote of the last string seen there (0: not
    /// plain, or too long to guess), and [`LengthGuesses::CONFIDENT`] when the string before
    /// had that length too.
    places: [u8; 256],
    /// Per place: the member name last seen there, as sent: its quotes and the ':' right after
    /// it (see [`LengthGuesses::recall_name`]).
    names: [[u8; NAME_MEMO_WIDTH]; NAME_MEMO_PLACES],
    /// Per place: the length of `names[place]` (0: none), and [`LengthGuesses::KEY_KNOWN`] and
    /// [`LengthGuesses::IS_KEY`].
    name_info: [u8; NAME_MEMO_PLACES],
}

/// Longest member name remembered, with its quotes and colon: one block.
const NAME_MEMO_WIDTH: usize = 16;

/// Places names are remembered for (1 KiB of names): places 64 apart share one.
const NAME_MEMO_PLACES: usize = 64;

impl Default for LengthGuesses {
    fn default() -> Self {
        LengthGuesses {
            places: [0; 256],
            names: [[0; NAME_MEMO_WIDTH]; NAME_MEMO_PLACES],
            name_info: [0; NAME_MEMO_PLACES],
        }
    }
}

/// The slot of `LengthGuesses` for the string `depth` deep after `ordinal` strings since the
/// innermost object opened.
#[inline(always)]
fn guess_place(depth: usize, ordinal: usize) -> usize {
    depth.wrapping_mul(16).wrapping_add(ordinal) % 256
}

impl LengthGuesses {
    const CONFIDENT: u8 = 0x80;
    /// In `name_info`: whether the remembered name is the key pointer's member name is known...
    const KEY_KNOWN: u8 = 0x40;
    /// ... and it is.
    const IS_KEY: u8 = 0x20;
    const NAME_LENGTH: u8 = 0x1F;

    /// Member names repeat from record to record. When the bytes at `pos` are the name last
    /// seen at this place (`depth`, `ordinal`), quotes and ':' included, that name was scanned
    /// and found a plain string then, so these bytes are the same valid name and colon: one
    /// comparison steps over them all. Returns the offset after the ':' and the name's
    /// `name_info`; the caller, if it takes the name, counts it in the ordinal.
    #[inline(always)]
    fn recall_name(
        &self,
        input: &[u8],
        pos: usize,
        depth: usize,
        ordinal: usize,
    ) -> Option<(usize, u8)> {
        let place = guess_place(depth, ordinal) % NAME_MEMO_PLACES;
        let info = self.name_info[place];
        let length = usize::from(info & Self::NAME_LENGTH);
        if length == 0 || !same_prefix(input, pos, &self.names[place], length) {
            return None;
        }
        Some((pos + length, info))
    }

    /// Remembers the member name whose opening quote is at `name_at`, scanned at `place` and
    /// found plain, ending at `after_name`, when the ':' follows right after it and it all fits.
    #[inline(always)]
    fn remember_name(
        &mut self,
        input: &[u8],
        name_at: usize,
        after_name: usize,
        place: usize,
        key: u8,
    ) {
        let place = place % NAME_MEMO_PLACES;
        let length = after_name + 1 - name_at;
        // A whole block is copied, not `length` bytes: one load and one store, that the next
        // comparison's load of the block can take straight from.
        let block = input
            .get(name_at..)
            .and_then(<[u8]>::first_chunk::<NAME_MEMO_WIDTH>);
        if let Some(block) = block {
            if length <= NAME_MEMO_WIDTH && input.get(after_name) == Some(&b':') {
                self.names[place] = *block;
                self.name_info[place] = length as u8 | key;
            }
        }
    }
    /// Longest guess, in bytes after the opening quote: two blocks.
    const LONGEST: usize = 32;

    /// [`scan_string`] for the string at `open_quote`, `depth` deep, after `ordinal` strings
    /// since the innermost object opened; counts it in `ordinal`.
    #[inline(always)]
    fn scan(
        &mut self,
        input: &[u8],
        open_quote: usize,
        depth: usize,
        ordinal: &mut usize,
    ) -> Result<(usize, Contents), InvalidJson> {
        let place = &mut self.places[guess_place(depth, *ordinal)];
        *ordinal += 1;
        let last = *place;
        let last_length = usize::from(last & !Self::CONFIDENT);
        if last & Self::CONFIDENT != 0 && is_plain_string(input, open_quote + 1, last_length) {
            return Ok((open_quote + 1 + last_length, Contents::Plain));
        }
        let (end, contents) = scan_string(input, open_quote)?;
        let length = end - open_quote - 1;
        *place = if contents == Contents::Plain && length <= Self::LONGEST {
            let same = length == last_length;
            length as u8 | if same { Self::CONFIDENT } else { 0 }
        } else {
            0
        };
        Ok((end, contents))
    }
}

/// Whether the `length` bytes from `start` are string contents that need no look (no '\\', no
/// control character, no non-ASCII byte) and a closing quote, the last. False beyond
/// [`LengthGuesses::LONGEST`] and near the end of the input.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn is_plain_string(input: &[u8], start: usize, length: usize) -> bool {
    let stops_at = |offset| sse2::Block::load(input, start + offset).map(sse2::Block::string_stops);
    let stops = match length {
        1..=16 => stops_at(0),
        17..=32 => stops_at(0)
            .zip(stops_at(16))
            .map(|(low, high)| (low.0 | high.0 << 16, low.1 | high.1 << 16)),
        _ => None,
    };
    let Some((quotes, others)) = stops else {
        return false;
    };
    // Up to the guessed closing quote, the one byte to stop at is that quote.
    let closing_quote = 1 << (length - 1);
    ((quotes ^ closing_quote) | others) & (u32::MAX >> (32 - length)) == 0
}

/// Whether the `length` bytes at `pos` (at most 16) are the first `length` of `expected`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn same_prefix(input: &[u8], pos: usize, expected: &[u8; NAME_MEMO_WIDTH], length: usize) -> bool {
    let Some(block) = sse2::Block::load(input, pos) else {
        return false;
    };
    let wanted = (1u32 << length) - 1;
    block.equal_bytes(expected) & wanted == wanted
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn same_prefix(input: &[u8], pos: usize, expected: &[u8; NAME_MEMO_WIDTH], length: usize) -> bool {
    input.get(pos..pos + length) == Some(&expected[..length])
}

/// Without 16-byte blocks, nothing is guessed.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn is_plain_string(_input: &[u8], _start: usize, _length: usize) -> bool {
    false
}

const EVERY_BYTE: u64 = u64::from_le_bytes([1; 8]);
const HIGH_BITS: u64 = EVERY_BYTE * 0x80;

/// What a string holds besides printable ASCII.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Contents {
    Plain,
    /// Non-ASCII characters, and no escapes.
    NonAscii,
    /// Escapes: the string must be decoded to be compared with a pointer's token.
    Escaped,
}

/// Validates the string whose opening quote is at `open_quote`. Returns the offset after the
/// closing quote, and what the string holds.
#[inline(always)]
fn scan_string(input: &[u8], open_quote: usize) -> Result<(usize, Contents), InvalidJson> {
    let mut pos = open_quote + 1;
    let mut contents = Contents::Plain;
    loop {
        // Sixteen bytes at a time up to the next byte that needs a look: '"', '\\', a control
        // character, or a non-ASCII byte (to validate UTF-8). Most strings are plain ASCII and
        // short enough to be one block, where this beats one pass per class of stop byte.
        #[cfg(target_arch = "x86_64")]
        while let Some(block) = sse2::Block::load(input, pos) {
            let (quotes, others) = block.string_stops();
            // The usual case, a closing quote with nothing to look at before it, takes the
            // shortest chain of dependent instructions from the block to the next position:
            // the other stop bytes are only checked, by a branch that is predicted.
            let through_first_quote = quotes ^ quotes.wrapping_sub(1);
            if others & through_first_quote == 0 {
                if quotes != 0 {
                    return Ok((pos + quotes.trailing_zeros() as usize + 1, contents));
                }
                pos += sse2::Block::WIDTH;
                continue;
            }
            pos += others.trailing_zeros() as usize;
            break;
        }
        // Then (or where SSE2 is not baseline) eight bytes at a time, the same way.
        // A borrow can mark a byte after a true match, never before one, so the lowest mark is
        // exact - and only the lowest is used.
        while let Some(block) = input.get(pos..).and_then(<[u8]>::first_chunk::<8>) {
            let block = u64::from_le_bytes(*block);
            let is_zero = |v: u64| v.wrapping_sub(EVERY_BYTE) & !v;
            let quotes = is_zero(block ^ (EVERY_BYTE * u64::from(b'"'))) & HIGH_BITS;
            let backslashes = is_zero(block ^ (EVERY_BYTE * u64::from(b'\\')));
            let below_space = block.wrapping_sub(EVERY_BYTE * 0x20) & !block;
            let stops = (quotes | backslashes | below_space | block) & HIGH_BITS;
            if stops != 0 {
                pos += (stops.trailing_zeros() / 8) as usize;
                // The usual stop, the closing quote, without reading the byte again.
                if stops & stops.wrapping_neg() & quotes != 0 {
                    return Ok((pos + 1, contents));
                }
                break;
            }
            pos += 8;
        }
        let Some(&byte) = input.get(pos) else {
            return Err(invalid(pos, UNEXPECTED_END));
        };
        match byte {
            b'"' => return Ok((pos + 1, contents)),
            b'\\' => {
                contents = Contents::Escaped;
                pos = scan_escape(input, pos)?;
            }
            0x00..=0x1F => return Err(invalid(pos, CONTROL_IN_STRING)),
            0x80..=0xFF => {
                if contents == Contents::Plain {
                    contents = Contents::NonAscii;
                }
                pos = scan_utf8(input, pos)?;
            }
            _ => pos += 1,
        }
    }
}

/// The 16-byte blocks of the scanning helpers. SSE2 is part of the x86_64 baseline, so there is
/// nothing to detect at run time; other targets use the 8-byte SWAR paths alone.
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use core::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_cmpgt_epi8, _mm_cmplt_epi8, _mm_loadu_si128,
        _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };

    /// Sixteen bytes of the input, loaded at once.
    #[derive(Clone, Copy)]
    pub(super) struct Block(__m128i);

    /// One bit per byte of a block, byte 0 in bit 0.
    #[inline(always)]
    fn mask(bytes: __m128i) -> u32 {
        // SAFETY (this and the other intrinsics below, which only compute on registers): SSE2
        // is enabled on every x86_64 target.
        unsafe { _mm_movemask_epi8(bytes) as u32 }
    }

    impl Block {
        pub(super) const WIDTH: usize = 16;

        /// The block at `pos`, if the input has 16 bytes there.
        #[inline(always)]
        pub(super) fn load(input: &[u8], pos: usize) -> Option<Block> {
            let bytes = input.get(pos..)?.first_chunk::<16>()?;
            // SAFETY: `bytes` is 16 readable bytes, and the load has no alignment requirement.
            Some(Block(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }))
        }

        /// One bit per byte equal to the byte at the same place in `other`.
        #[inline(always)]
        pub(super) fn equal_bytes(self, other: &[u8; 16]) -> u32 {
            // SAFETY: `other` is 16 readable bytes, and the load has no alignment requirement;
            // for the rest see `mask`.
            unsafe {
                mask(_mm_cmpeq_epi8(
                    self.0,
                    _mm_loadu_si128(other.as_ptr().cast()),
                ))
            }
        }

        /// One bit per ASCII digit.
        #[inline(always)]
        pub(super) fn digits(self) -> u32 {
            // SAFETY: see `mask`.
            unsafe {
                // Signed: non-ASCII bytes are negative, so below '0'.
                let above = _mm_cmpgt_epi8(self.0, _mm_set1_epi8(b'0' as i8 - 1));
                let below = _mm_cmplt_epi8(self.0, _mm_set1_epi8(b'9' as i8 + 1));
                mask(_mm_and_si128(above, below))
            }
        }

        /// The bytes a string scan must stop at: the quotes, and the others ('\\', below ' ',
        /// non-ASCII).
        #[inline(always)]
        pub(super) fn string_stops(self) -> (u32, u32) {
            // SAFETY: see `mask`.
            unsafe {
                let quotes = _mm_cmpeq_epi8(self.0, _mm_set1_epi8(b'"' as i8));
                let backslashes = _mm_cmpeq_epi8(self.0, _mm_set1_epi8(b'\\' as i8));
                // Signed: non-ASCII bytes are negative, so one comparison takes them with the
                // control characters.
                let control_or_high = _mm_cmplt_epi8(self.0, _mm_set1_epi8(0x20));
                (
                    mask(quotes),
                    mask(_mm_or_si128(backslashes, control_or_high)),
                )
            }
        }
    }
}

fn scan_escape(input: &[u8], backslash: usize) -> Result<usize, InvalidJson> {
    match input.get(backslash + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(backslash + 2),
        Some(b'u') => {
            let unit = hex4_checked(input, backslash + 2)?;
            match unit {
                0xD800..=0xDBFF => {
                    let low_escape = backslash + 6;
                    if input.get(low_escape) == Some(&b'\\')
                        && input.get(low_escape + 1) == Some(&b'u')
                        && matches!(hex4_checked(input, low_escape + 2)?, 0xDC00..=0xDFFF)
                    {
                        Ok(low_escape + 6)
                    } else {
                        Err(invalid(backslash, LONE_SURROGATE))
                    }
                }
                0xDC00..=0xDFFF => Err(invalid(backslash, LONE_SURROGATE)),
                _ => Ok(backslash + 6),
            }
        }
        Some(_) => Err(invalid(backslash, BAD_ESCAPE)),
        None => Err(invalid(backslash + 1, UNEXPECTED_END)),
    }
}

fn hex4_checked(input: &[u8], digits: usize) -> Result<u32, InvalidJson> {
    if input.len() < digits + 4 {
        return Err(invalid(input.len(), UNEXPECTED_END));
    }
    hex4(input, digits).ok_or_else(|| invalid(digits, BAD_UNICODE_ESCAPE))
}

fn hex4(input: &[u8], digits: usize) -> Option<u32> {
    let mut value = 0;
    for &digit in input.get(digits..digits + 4)? {
        value = value << 4 | char::from(digit).to_digit(16)?;
    }
    Some(value)
}

/// Validates the UTF-8 sequence starting at `pos` (its first byte is not ASCII), following the
/// well-formed byte sequences of the Unicode standard: no overlong forms, no surrogates, nothing
/// above U+10FFFF.
fn scan_utf8(input: &[u8], pos: usize) -> Result<usize, InvalidJson> {
    let (length, second_low, second_high) = match input[pos] {
        0xC2..=0xDF => (2, 0x80, 0xBF),
        0xE0 => (3, 0xA0, 0xBF),
        0xE1..=0xEC | 0xEE..=0xEF => (3, 0x80, 0xBF),
        0xED => (3, 0x80, 0x9F),
        0xF0 => (4, 0x90, 0xBF),
        0xF1..=0xF3 => (4, 0x80, 0xBF),
        0xF4 => (4, 0x80, 0x8F),
        _ => return Err(invalid(pos, BAD_UTF8)),
    };
    for offset in 1..length {
        let (low, high) = if offset == 1 {
            (second_low, second_high)
        } else {
            (0x80, 0xBF)
        };
        match input.get(pos + offset) {
            Some(&byte) if (low..=high).contains(&byte) => {}
            Some(_) => return Err(invalid(pos + offset, BAD_UTF8)),
            None => return Err(invalid(pos + offset, UNEXPECTED_END)),
        }
    }
    Ok(pos + length)
}

/// Validates the number starting at `start` (at '-' or a digit). Returns the offset after it.
// Inlined where it is fast to; not in unoptimised builds, where each inlined copy grows the
// frames of the recursive `Scanner::walk`, and deep bodies would overflow a thread's stack.
#[cfg_attr(not(debug_assertions), inline(always))]
fn scan_number(input: &[u8], start: usize) -> Result<usize, InvalidJson> {
    #[cfg(target_arch = "x86_64")]
    if let Some(block) = sse2::Block::load(input, start) {
        if let Some(result) = scan_number_in_block(input, start, block) {
            return result;
        }
    }
    scan_number_bytewise(input, start)
}

/// [`scan_number`] on the 16-byte block at `start`, its digit runs taken from a mask rather
/// than byte by byte. None when the number may go on past the block: the caller then scans it
/// byte by byte from the start, so both ways give the same result and error.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scan_number_in_block(
    input: &[u8],
    start: usize,
    block: sse2::Block,
) -> Option<Result<usize, InvalidJson>> {
    let bytes = input.get(start..)?.first_chunk::<16>()?;
    let digits = block.digits();
    // Bits 16 and up are set: a digit run reaching the end of the block ends at 16.
    let not_digits = !digits;
    let is_digit = |at: usize| digits >> at & 1 != 0;
    let mut at = usize::from(bytes[0] == b'-');
    if bytes[at] == b'0' {
        if is_digit(at + 1) {
            return Some(Err(invalid(start + at, LEADING_ZERO)));
        }
        at += 1;
    } else if is_digit(at) {
        at += (not_digits >> at).trailing_zeros() as usize;
    } else {
        return Some(Err(invalid(start + at, DIGIT_AFTER_MINUS)));
    }
    // `at` is at most 16 here; each step below looks at one byte before it moves on.
    if bytes.get(at)? == &b'.' {
        at += 1;
        if !is_digit(at) {
            return (at < 16).then(|| Err(invalid(start + at, DIGIT_AFTER_POINT)));
        }
        at += (not_digits >> at).trailing_zeros() as usize;
    }
    if bytes.get(at)? | 0x20 == b'e' {
        at += 1;
        if matches!(bytes.get(at)?, b'+' | b'-') {
            at += 1;
        }
        if !is_digit(at) {
            return (at < 16).then(|| Err(invalid(start + at, DIGIT_IN_EXPONENT)));
        }
        at += (not_digits >> at).trailing_zeros() as usize;
        if at >= 16 {
            return None;
        }
    }
    Some(Ok(start + at))
}

/// [`scan_number`] one byte at a time: anywhere, and near the end of the input.
#[inline(always)]
fn scan_number_bytewise(input: &[u8], start: usize) -> Result<usize, InvalidJson> {
    let is_digit = |pos: usize| input.get(pos).is_some_and(u8::is_ascii_digit);
    let skip_digits = |mut pos: usize| {
        while is_digit(pos) {
            pos += 1;
        }
        pos
    };
    let mut pos = start;
    if input[pos] == b'-' {
        pos += 1;
    }
    match input.get(pos) {
        Some(b'0') if is_digit(pos + 1) => return Err(invalid(pos, LEADING_ZERO)),
        Some(b'0') => pos += 1,
        Some(b'1'..=b'9') => pos = skip_digits(pos + 1),
        _ => return Err(invalid(pos, DIGIT_AFTER_MINUS)),
    }
    if input.get(pos) == Some(&b'.') {
        if !is_digit(pos + 1) {
            return Err(invalid(pos + 1, DIGIT_AFTER_POINT));
        }
        pos = skip_digits(pos + 1);
    }
    if matches!(input.get(pos), Some(b'e' | b'E')) {
        pos += 1;
        if matches!(input.get(pos), Some(b'+' | b'-')) {
            pos += 1;
        }
        if !is_digit(pos) {
            return Err(invalid(pos, DIGIT_IN_EXPONENT));
        }
        pos = skip_digits(pos);
    }
    Ok(pos)
}

fn scan_literal(input: &[u8], pos: usize, literal: &[u8]) -> Result<usize, InvalidJson> {
    if input[pos..].starts_with(literal) {
        Ok(pos + literal.len())
    } else {
        Err(invalid(pos, BAD_LITERAL))
    }
}

/// Decodes the contents of a validated JSON string (without its quotes) into `out`.
fn decode_string(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut pos = 0;
    while let Some(&byte) = raw.get(pos) {
        if byte != b'\\' {
            out.push(byte);
            pos += 1;
            continue;
        }
        let unescaped = match raw.get(pos + 1) {
            Some(b'b') => 0x08,
            Some(b'f') => 0x0C,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'u') => {
                let unit = hex4(raw, pos + 2).unwrap_or_default();
                let (code_point, length) = if (0xD800..=0xDBFF).contains(&unit) {
                    let low = hex4(raw, pos + 8).unwrap_or_default();
                    (
                        0x10000 + ((unit - 0xD800) << 10 | (low.wrapping_sub(0xDC00) & 0x3FF)),
                        12,
                    )
                } else {
                    (unit, 6)
                };
                let decoded = char::from_u32(code_point).unwrap_or(char::REPLACEMENT_CHARACTER);
                out.extend_from_slice(decoded.encode_utf8(&mut [0; 4]).as_bytes());
                pos += length;
                continue;
            }
            Some(&other) => other,
            None => break,
        };
        out.push(unescaped);
        pos += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;
    use std::collections::HashSet;

    fn rule(array_pointers: &[&str], unique_key_pointer: Option<&str>) -> PointsRule {
        PointsRule {
            array_pointers: array_pointers.iter().map(|p| p.to_string()).collect(),
            unique_key_pointer: unique_key_pointer.map(str::to_string),
        }
    }

    fn count(body: &str, array_pointers: &[&str], key: Option<&str>) -> Points {
        match count_points(body.as_bytes(), &rule(array_pointers, key)) {
            Ok(points) => points,
            Err(error) => panic!("{body}: {error}"),
        }
    }

    fn points(points: u64, unique_points: u64) -> Points {
        Points {
            points,
            unique_points,
        }
    }

    fn error(body: &[u8]) -> InvalidJson {
        match count_points(body, &rule(&["/a"], Some("/k"))) {
            Ok(points) => panic!(
                "{:?} accepted with {points:?}",
                String::from_utf8_lossy(body)
            ),
            Err(error) => error,
        }
    }

    #[test]
    fn validate_accepts_rfc_6901_pointers() {
        let valid = rule(
            &["", "/", "/locations", "/tasks/0/orders", "/a~0b~1c"],
            Some("/key"),
        );
        assert_eq!(valid.validate(), Ok(()));
        assert_eq!(rule(&[], Some("")).validate(), Ok(()));
    }

    #[test]
    fn validate_names_the_pointer_and_the_rule_broken() {
        let message = rule(&["/ok", "locations"], None).validate().unwrap_err();
        assert!(
            message.starts_with("array_pointers[1] \"locations\":"),
            "{message}"
        );
        assert!(message.contains("start with '/'"), "{message}");

        for bad in ["/a~2", "/a~", "/~/b"] {
            let message = rule(&[bad], None).validate().unwrap_err();
            assert!(message.contains("'~' must be followed by '0'"), "{message}");
        }

        let message = rule(&["/a"], Some("key")).validate().unwrap_err();
        assert!(
            message.starts_with("unique_key_pointer \"key\":"),
            "{message}"
        );
    }

    #[test]
    fn empty_rule_costs_nothing_and_reads_no_body() {
        let nothing = rule(&[], Some("/key"));
        assert_eq!(
            count_points(b"\xff not json", &nothing),
            Ok(Points::default())
        );
    }

    #[test]
    fn counts_the_elements_of_the_named_array() {
        assert_eq!(
            count(r#"{"locations":[1,2,3]}"#, &["/locations"], None),
            points(3, 3)
        );
        assert_eq!(
            count(r#"{"locations":[]}"#, &["/locations"], None),
            points(0, 0)
        );
        assert_eq!(count("[[],{},null]", &[""], None), points(3, 3));
    }

    #[test]
    fn follows_nested_pointers_and_array_indices() {
        let body = r#"{"tasks":[{"orders":[1,2]},{"orders":[3,4,5]}],"x":{"y":{"z":[9]}}}"#;
        assert_eq!(count(body, &["/tasks/0/orders"], None), points(2, 2));
        assert_eq!(count(body, &["/tasks/1/orders"], None), points(3, 3));
        assert_eq!(count(body, &["/tasks/2/orders"], None), points(0, 0));
        assert_eq!(count(body, &["/x/y/z"], None), points(1, 1));
        assert_eq!(count(body, &["/tasks"], None), points(2, 2));
        assert_eq!(
            count(
                body,
                &["/tasks/0/orders", "/tasks/1/orders", "/x/y/z"],
                None
            ),
            points(6, 6)
        );
    }

    #[test]
    fn array_index_tokens_follow_rfc_6901() {
        let body =
            r#"{"a":[[1],[2,2],[3,3,3],[4,4,4,4],[5,5,5,5,5],[6],[7],[8],[9],[10],[11,11]]}"#;
        assert_eq!(count(body, &["/a/10"], None), points(2, 1));
        assert_eq!(count(body, &["/a/01"], None), points(0, 0));
        assert_eq!(count(body, &["/a/-"], None), points(0, 0));
        assert_eq!(count(body, &["/a/+1"], None), points(0, 0));
        assert_eq!(
            count(body, &["/a/99999999999999999999999"], None),
            points(0, 0)
        );
        // In an object the same token is just a member name.
        assert_eq!(
            count(r#"{"a":{"01":[1],"-":[1,2]}}"#, &["/a/01", "/a/-"], None),
            points(3, 2)
        );
    }

    #[test]
    fn pointer_escapes_and_member_name_escapes_are_decoded() {
        let body = r#"{"a/b":[1],"m~n":[1,2],"~1":[1,2,3],"lo\u0063ations":[1,2,3,4],"x\/y":[5]}"#;
        assert_eq!(count(body, &["/a~1b"], None), points(1, 1));
        assert_eq!(count(body, &["/m~0n"], None), points(2, 2));
        assert_eq!(count(body, &["/~01"], None), points(3, 3));
        assert_eq!(count(body, &["/locations"], None), points(4, 4));
        assert_eq!(count(body, &["/x~1y"], None), points(1, 1));
        let unicode = r#"{"\u00e9\ud83d\ude00":[1,2],"é😀t":[3]}"#;
        assert_eq!(count(unicode, &["/é😀"], None), points(2, 2));
        assert_eq!(count(unicode, &["/é😀t"], None), points(1, 1));
    }

    #[test]
    fn missing_members_count_zero() {
        let body = r#"{"locations":[1,2],"other":{"x":[1]}}"#;
        assert_eq!(count(body, &["/missing"], None), points(0, 0));
        assert_eq!(count(body, &["/other/y", "/locations"], None), points(2, 2));
        assert_eq!(count(body, &["/locations/0/deeper"], None), points(0, 0));
    }

    #[test]
    fn non_array_targets_count_zero() {
        let body = r#"{"o":{"a":[1]},"s":"[1,2]","n":12,"t":true,"z":null,"a":[1]}"#;
        for pointer in ["/o", "/s", "/n", "/t", "/z"] {
            assert_eq!(count(body, &[pointer], None), points(0, 0), "{pointer}");
        }
        assert_eq!(count(r#""text""#, &[""], None), points(0, 0));
    }

    #[test]
    fn invalid_pointers_resolve_nowhere_but_the_body_is_still_checked() {
        assert_eq!(count(r#"{"a":[1]}"#, &["a"], None), points(0, 0));
        let truncated = count_points(b"{\"a\":[1]", &rule(&["a"], None));
        assert_eq!(truncated, Err(invalid(8, UNEXPECTED_END)));
        let bad_key = rule(&["/a"], Some("k"));
        let body = br#"{"a":[{"k":1},{"k":1}]}"#;
        assert_eq!(count_points(body, &bad_key), Ok(points(2, 1)));
    }

    #[test]
    fn same_array_named_twice_counts_twice_but_is_unique_once() {
        assert_eq!(count(r#"{"a":[1,2]}"#, &["/a", "/a"], None), points(4, 2));
    }

    #[test]
    fn repetitive_bodies_keep_memory_bounded() {
        let mut distinct = DistinctElements::default();
        let body = b"[0,1,2]";
        for index in 0..3 * HASHES_BEFORE_EARLY_DEDUP {
            let start = 1 + 2 * (index % 3);
            let element = Span {
                start,
                end: start + 1,
                has_whitespace: false,
            };
            let element = distinct.element(body, None, element);
            distinct.add(element);
        }
        assert!(distinct.whole_elements.capacity() <= 2 * HASHES_BEFORE_EARLY_DEDUP);
        assert_eq!(distinct.count(), 3);
    }

    #[test]
    fn early_deduplication_keeps_the_count() {
        let elements = HASHES_BEFORE_EARLY_DEDUP + 1000;
        let mut body = String::from("[");
        for index in 0..elements {
            body.push_str(&format!("{},", index % 5000));
        }
        body.push_str("-1]");
        let expected = points(elements as u64 + 1, 5001);
        assert_eq!(count(&body, &[""], None), expected);
    }

    #[test]
    fn unique_by_key() {
        let body = r#"{"locations":[{"key":"a","x":1},{"key":"b","x":2},{"x":3,"key":"a"}]}"#;
        assert_eq!(count(body, &["/locations"], Some("/key")), points(3, 2));
        assert_eq!(count(body, &["/locations"], None), points(3, 3));
    }

    #[test]
    fn unique_by_nested_and_composite_keys() {
        let body = r#"{"a":[{"id":{"n":1,"m":[1,2]}},{"id":{"n":1, "m":[1,2]}},{"id":{"m":[1,2],"n":1}}]}"#;
        // Whitespace is ignored; member order is not normalised.
        assert_eq!(count(body, &["/a"], Some("/id")), points(3, 2));
        let nested = r#"{"a":[{"p":{"q":[5,6]}},{"p":{"q":[7,6]}},{"p":{"q":[9,8]}}]}"#;
        assert_eq!(count(nested, &["/a"], Some("/p/q/1")), points(3, 2));
    }

    #[test]
    fn element_without_key_is_compared_whole_and_apart_from_keys() {
        let body = r#"{"a":[{"k":"x"},"x","\"x\"",{"j":1},{"j":1},{"j":2},{"k":"x","j":3}]}"#;
        // Keyed: "x" (twice). Whole: "x", "\"x\"", {"j":1} (twice), {"j":2}.
        assert_eq!(count(body, &["/a"], Some("/k")), points(7, 5));
    }

    #[test]
    fn empty_key_pointer_is_the_whole_element() {
        let body = r#"{"a":[1,2,1,{"k":1},{"k":1}]}"#;
        assert_eq!(count(body, &["/a"], Some("")), points(5, 3));
    }

    #[test]
    fn unique_by_whole_element() {
        // Numbers compare as written: 1 and 1.0 are two.
        let body = r#"{"a":[{"x":1},{"x":1},{"x":2},[1],[1],"s","s",1,1.0,"a","\u0061"]}"#;
        assert_eq!(count(body, &["/a"], None), points(11, 7));
    }

    #[test]
    fn a_backslash_is_found_at_any_place_of_any_length() {
        for len in 0..70 {
            let mut raw = vec![b'a'; len];
            assert!(!has_backslash(&raw), "{len}");
            for at in 0..len {
                raw[at] = b'\\';
                assert!(has_backslash(&raw), "{len} {at}");
                raw[at] = 0xdc; // a byte whose high bit is set, next to none
            }
            assert!(!has_backslash(&raw), "{len}");
        }
    }

    #[test]
    fn strings_compare_by_their_characters_however_escaped() {
        let body = concat!(
            r#"{"a":[{"k":"a"},{"k":"\u0061"},{"k":"a\/b"},{"k":"a/b"},{"k":"é"},{"k":"\u00e9"},"#,
            r#"{"k":"\u00E9"},{"k":"😀"},{"k":"\ud83d\ude00"},{"k":"\n"},{"k":"\u000A"},"#,
            r#"{"k":"\""},{"k":"\u0022"},{"k":"\\"},{"k":"\u005c"},{"k":"\\u0061"}]}"#
        );
        // a, a/b, é, 😀, a newline, a quote, a backslash, and the six characters \u0061.
        assert_eq!(count(body, &["/a"], Some("/k")), points(16, 8));
        // The same, compared whole, with whitespace and escapes mixed.
        let whole = r#"{"a":[{"k": "\u0061", "v":[1, "\/"]}, {"k":"a","v":[1,"/"]}, {"k":"a","v":[1,"\\/"]}]}"#;
        assert_eq!(count(whole, &["/a"], None), points(3, 2));
    }

    #[test]
    fn whitespace_outside_strings_does_not_make_elements_distinct() {
        let body = concat!(
            r#"{"a":[{"x":[1,2]},"#,
            "\n  ",
            r#"{ "x" : [ 1 , 2 ] },{"s":"ab"},{ "s": "ab" },{ "s": "a b" },"#,
            r#"{ "q": "\" a" },{ "q": "\"  a" }]}"#
        );
        // Distinct: {"x":[1,2]}, {"s":"ab"}, {"s":"a b"}, {"q":"\" a"}, {"q":"\"  a"}:
        // whitespace inside strings, escaped quotes or not, is content.
        assert_eq!(count(body, &["/a"], None), points(7, 5));
        assert_eq!(count(body, &["/a"], Some("")), points(7, 5));
    }

    #[test]
    fn unique_counts_across_all_named_arrays() {
        let body = r#"{"a":[{"k":1},{"k":2}],"b":{"c":[{"k":2},{"k":3}]}}"#;
        assert_eq!(count(body, &["/a", "/b/c"], Some("/k")), points(4, 3));
    }

    #[test]
    fn nested_counted_arrays_are_both_counted() {
        let body = r#"{"a":[[1,2],[3],[1,2]]}"#;
        // Elements of /a: [1,2], [3], [1,2]; of /a/0: 1, 2.
        assert_eq!(count(body, &["/a", "/a/0"], None), points(5, 4));
        assert_eq!(count(body, &["/a", "/a/0"], Some("/0")), points(5, 4));
    }

    #[test]
    fn repeated_member_names_on_a_pointer_path_are_rejected() {
        let repeated = error(br#"{"a":[1],"a":[2,3]}"#);
        assert_eq!(repeated, invalid(9, DUPLICATE_MEMBER));
        let repeated_key = error(br#"{"a":[{"k":1,"k":2}]}"#);
        assert_eq!(repeated_key, invalid(13, DUPLICATE_MEMBER));
        let escaped_repeat = error(br#"{"a":[],"\u0061":[]}"#);
        assert_eq!(escaped_repeat.reason, DUPLICATE_MEMBER);
        // Off the pointer paths, repeats are left to the upstream.
        assert_eq!(
            count(r#"{"b":1,"b":2,"a":[{"j":1,"j":2}]}"#, &["/a"], Some("/k")),
            points(1, 1)
        );
    }

    fn nested_arrays(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        let deepest = nested_arrays(MAX_NESTING_DEPTH);
        assert_eq!(count(&deepest, &[""], None), points(1, 1));
        assert_eq!(count(&deepest, &["/0/0/0"], None), points(1, 1));
        let body = format!(
            r#"{{"a":[1],"b":{}}}"#,
            nested_arrays(MAX_NESTING_DEPTH - 1)
        );
        assert_eq!(count(&body, &["/a"], None), points(1, 1));
    }

    #[test]
    fn nesting_beyond_the_limit_is_rejected_when_skipped_or_followed() {
        assert!(TOO_DEEP.contains(&MAX_NESTING_DEPTH.to_string()));
        let too_deep = nested_arrays(MAX_NESTING_DEPTH + 1);
        for pointers in [&["/x"][..], &[""], &["/0/0/0"]] {
            let result = count_points(too_deep.as_bytes(), &rule(pointers, None));
            assert_eq!(
                result,
                Err(invalid(MAX_NESTING_DEPTH, TOO_DEEP)),
                "{pointers:?}"
            );
        }
        let objects = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_NESTING_DEPTH + 1),
            "}".repeat(MAX_NESTING_DEPTH + 1)
        );
        let result = count_points(objects.as_bytes(), &rule(&["/a/a"], None));
        assert_eq!(result.map_err(|e| e.reason), Err(TOO_DEEP));
        // Far beyond the limit, skipped or followed, the error comes back instead of the stack
        // running out.
        let huge = nested_arrays(1_000_000);
        let followed = "/0".repeat(1_000);
        for pointers in [&["/a"][..], &[followed.as_str()]] {
            let result = count_points(huge.as_bytes(), &rule(pointers, None));
            assert_eq!(result, Err(invalid(MAX_NESTING_DEPTH, TOO_DEEP)));
        }
    }

    #[test]
    fn invalid_json_says_where_and_why() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"", 0, UNEXPECTED_END),
            (b"  \n", 3, UNEXPECTED_END),
            (b"{\"a\":[1,2]", 10, UNEXPECTED_END),
            (b"{\"a\":[1,2]} x", 12, TRAILING_CHARACTERS),
            (b"{\"a\":[1,2]}{}", 11, TRAILING_CHARACTERS),
            (b"{\"a\":[1,2,]}", 10, EXPECTED_VALUE),
            (b"{\"a\":[1 2]}", 8, EXPECTED_ARRAY_NEXT),
            (b"{\"a\":[1],}", 9, EXPECTED_MEMBER_NAME),
            (b"{\"a\" [1]}", 5, EXPECTED_COLON),
            (b"{a:[1]}", 1, EXPECTED_MEMBER_NAME),
            (b"{\"a\":[1] \"b\":2}", 9, EXPECTED_OBJECT_NEXT),
            (b"{\"a\":[01]}", 6, LEADING_ZERO),
            (b"{\"a\":[-01]}", 7, LEADING_ZERO),
            (b"{\"a\":[1.]}", 8, DIGIT_AFTER_POINT),
            (b"{\"a\":[.5]}", 6, EXPECTED_VALUE),
            (b"{\"a\":[-]}", 7, DIGIT_AFTER_MINUS),
            (b"{\"a\":[1e]}", 8, DIGIT_IN_EXPONENT),
            (b"{\"a\":[1e+]}", 9, DIGIT_IN_EXPONENT),
            (b"{\"a\":[+1]}", 6, EXPECTED_VALUE),
            (b"{\"a\":[tru]}", 6, BAD_LITERAL),
            (b"{\"a\":[nul", 6, BAD_LITERAL),
            (b"{\"a\":[\"\\x\"]}", 7, BAD_ESCAPE),
            (b"{\"a\":[\"\\u12G4\"]}", 9, BAD_UNICODE_ESCAPE),
            (b"{\"a\":[\"\\u12", 11, UNEXPECTED_END),
            (b"{\"a\":[\"\\ud800\"]}", 7, LONE_SURROGATE),
            (b"{\"a\":[\"\\ud800\\u0041\"]}", 7, LONE_SURROGATE),
            (b"{\"a\":[\"\\udc00\"]}", 7, LONE_SURROGATE),
            (b"{\"a\":[\"tab\there\"]}", 10, CONTROL_IN_STRING),
            (b"{\"a\":[\"\xff\"]}", 7, BAD_UTF8),
            (b"{\"a\":[\"\xc0\x80\"]}", 7, BAD_UTF8),
            (b"{\"a\":[\"\xed\xa0\x80\"]}", 8, BAD_UTF8),
            (b"{\"a\":[\"\xf4\x90\x80\x80\"]}", 8, BAD_UTF8),
            (b"{\"a\":[\"\xe2\x82\"]}", 9, BAD_UTF8),
            (b"{\"a\":[\"unterminated", 19, UNEXPECTED_END),
            (b"{\"a\":[1],\"b\":\"\xfe\"}", 14, BAD_UTF8),
            (b"\xef\xbb\xbf{\"a\":[]}", 0, EXPECTED_VALUE),
        ];
        for &(body, offset, reason) in cases {
            assert_eq!(
                error(body),
                invalid(offset, reason),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn long_strings_are_validated_in_every_position() {
        // The word-at-a-time scan must stop at a bad byte wherever it falls in a word.
        for prefix_length in 0..24 {
            let prefix = "x".repeat(prefix_length);
            let bad_at = 7 + prefix_length;
            for (bad, reason) in [(&b"\x01"[..], CONTROL_IN_STRING), (b"\x80", BAD_UTF8)] {
                let mut body = format!("{{\"a\":[\"{prefix}").into_bytes();
                body.extend_from_slice(bad);
                body.extend_from_slice(b"yyyyyyyyyy\"]}");
                assert_eq!(error(&body), invalid(bad_at, reason), "{prefix_length}");
            }
            let body = format!("{{\"a\":[\"{prefix}\\\"é😀\\\\\",\"{prefix}\"]}}");
            assert_eq!(count(&body, &["/a"], None), points(2, 2));
        }
    }

    #[test]
    fn errors_after_the_counted_arrays_are_still_reported() {
        assert_eq!(error(br#"{"a":[1],"b":[1,}"#).reason, EXPECTED_VALUE);
    }

    #[test]
    fn display_says_where_and_why() {
        assert_eq!(
            invalid(12, LEADING_ZERO).to_string(),
            "invalid JSON at byte 12: number has a leading zero"
        );
    }

    #[test]
    fn deduplicate_keeps_one_of_each_hash() {
        // Repeats, the hash 0 (the table's free mark), and long probe runs: small values all
        // start probing at slot 0.
        let mut hashes: Vec<u64> = (0..5000u64)
            .map(|index| (index % 1234).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .chain((0..500).chain(0..500))
            .chain([0, u64::MAX, 0, u64::MAX - 1, u64::MAX])
            .collect();
        let mut expected = hashes.clone();
        expected.sort_unstable();
        expected.dedup();
        deduplicate(&mut hashes);
        hashes.sort_unstable();
        assert_eq!(hashes, expected);
        for length in 0..3 {
            let mut same = vec![7; length];
            deduplicate(&mut same);
            assert_eq!(same.len(), length.min(1));
        }
    }

    /// `scan_number` against the byte-at-a-time scan (the original one) on `candidate` placed
    /// at each distance from the end of the input, so that each of its bytes falls at each
    /// place of a 16-byte block and past it.
    fn check_number_scan(candidate: &[u8]) {
        for tail in [
            &b""[..],
            b"0",
            b"1234567890123456789",
            b",",
            b"e",
            b".",
            b"-",
        ] {
            let mut input = candidate.to_vec();
            input.extend_from_slice(tail);
            for lead in 0..=17 {
                let mut padded = vec![b' '; lead];
                padded.extend_from_slice(&input);
                if !matches!(padded.get(lead), Some(b'-' | b'0'..=b'9')) {
                    continue;
                }
                for cut in lead + 1..=padded.len() {
                    let input = &padded[..cut];
                    assert_eq!(
                        scan_number(input, lead),
                        scan_number_bytewise(input, lead),
                        "{:?} at {lead}",
                        String::from_utf8_lossy(input)
                    );
                }
            }
        }
    }

    #[test]
    fn number_scan_agrees_with_the_bytewise_scan_on_short_inputs() {
        // Every string of up to 4 bytes over the bytes a number scan tells apart.
        let alphabet = b"0159-+.eEx";
        let mut candidate = Vec::new();
        fn every(alphabet: &[u8], candidate: &mut Vec<u8>, left: usize) {
            check_number_scan(candidate);
            if left > 0 {
                for &byte in alphabet {
                    candidate.push(byte);
                    every(alphabet, candidate, left - 1);
                    candidate.pop();
                }
            }
        }
        every(alphabet, &mut candidate, 4);
        for number in [
            "-0.0e+0",
            "12345678901234.5",
            "1.234567890123456",
            "123456789012345e1",
            "1.5e123456789012",
            "0.000000000000001",
            "-1234567890123456",
            "1E-07x",
        ] {
            check_number_scan(number.as_bytes());
        }
    }

    proptest! {
        #[test]
        fn number_scan_agrees_with_the_bytewise_scan(
            candidate in proptest::collection::vec(
                proptest::sample::select(b"0123456789-+.eE \x80".to_vec()), 1..40),
        ) {
            check_number_scan(&candidate);
        }
    }

    #[test]
    fn remembered_member_names_are_checked() {
        // Records of one shape make the scanner remember member names with their ':'
        // (`LengthGuesses::recall_name`). A last name like the remembered one but for a byte,
        // its length, an escape, whitespace, or a repeat of the key must be judged as if
        // nothing were remembered, by each path: keys, whole elements, skipping.
        let replacements: [&[u8]; 10] = [
            b"y",
            b"",
            b"yy",
            b"\\u0069",
            b"\"",
            b" ",
            b"\x01",
            b"\x80",
            "é".as_bytes(),
            b"id",
        ];
        for name in [
            "i",
            "ix",
            "name",
            "abcdefghijkl",
            "abcdefghijklm",
            "abcdefghijklmn",
        ] {
            let record = format!(r#"{{"{name}":"v","id":1,"p":{{"{name}":2,"q":3}}}},"#);
            for at in 0..=name.len() + 2 {
                for replacement in replacements {
                    // The name with its quotes and colon, a byte of it replaced.
                    let mut last = format!("\"{name}\":").into_bytes();
                    last.splice(at..(at + 1).min(last.len()), replacement.iter().copied());
                    let mut body = b"{\"a\":[".to_vec();
                    body.extend_from_slice(record.repeat(3).as_bytes());
                    for part in [&b"{"[..], &last, b"\"v\",\"id\":1,\"p\":{", &last, b"2}}]}"] {
                        body.extend_from_slice(part);
                    }
                    let expected = serde_json::from_slice::<Value>(&body).ok();
                    for (pointer, key) in [
                        ("/a", Some("/id")),
                        ("/a", Some(&*format!("/{name}"))),
                        ("/a", None),
                        ("/missing", None),
                    ] {
                        let rule = rule(&[pointer], key);
                        let ours = count_points(&body, &rule);
                        let body = String::from_utf8_lossy(&body);
                        match (&expected, &ours) {
                            // A repeated "id" on the key's path, which serde_json accepts.
                            (Some(_), Err(error)) if error.reason == DUPLICATE_MEMBER => {
                                assert_eq!(replacement, b"id", "{body}");
                            }
                            (Some(doc), _) => assert_eq!(ours, Ok(reference(doc, &rule)), "{body}"),
                            (None, _) => assert!(ours.is_err(), "{body}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn guessed_string_lengths_are_checked() {
        // Records of one shape make the scanner guess string lengths (`LengthGuesses`). A last
        // string of the guessed length or not, with a byte needing a look anywhere, must be
        // judged as if nothing were guessed, by each path: keys, whole elements, skipping.
        let replacements: [&[u8]; 8] = [
            b"\x01",
            b"\x80",
            b"\"",
            b"\\n",
            b"\\",
            "é".as_bytes(),
            b"\\u00e9",
            b"yy",
        ];
        for length in 1..40 {
            let plain = "x".repeat(length);
            let record = format!(r#"{{"id":"{plain}","n":["{plain}",1]}},"#);
            // Replaced anywhere, or appended where the guessed closing quote would be.
            for at in 0..=length {
                for replacement in replacements {
                    let mut last = plain.clone().into_bytes();
                    last.splice(at..(at + 1).min(length), replacement.iter().copied());
                    let mut body = b"{\"a\":[".to_vec();
                    body.extend_from_slice(record.repeat(4).as_bytes());
                    for part in [
                        &b"{\"id\":\""[..],
                        &last,
                        b"\",\"n\":[\"",
                        &last,
                        b"\",1]}]}",
                    ] {
                        body.extend_from_slice(part);
                    }
                    let expected = serde_json::from_slice::<Value>(&body).ok();
                    for (pointer, key) in [("/a", Some("/id")), ("/a", None), ("/missing", None)] {
                        let rule = rule(&[pointer], key);
                        let ours = count_points(&body, &rule);
                        let body = String::from_utf8_lossy(&body);
                        match &expected {
                            Some(doc) => assert_eq!(ours, Ok(reference(doc, &rule)), "{body}"),
                            None => assert!(ours.is_err(), "{body}"),
                        }
                    }
                }
            }
        }
    }

    fn member_name() -> impl Strategy<Value = String> {
        prop_oneof!["[ab]{0,2}", "[ab~/\"\\\\é😀\u{0}\n]{0,3}",]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-2i64..3).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[ab~\"\\\\é😀\u{1}\u{7f}]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(member_name(), inner.clone(), 0..5)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
                // Records whose keys repeat while the records differ, as in real bodies.
                ((0..3u8).prop_map(Value::from), inner).prop_map(|(key, value)| {
                    Value::Object(
                        [("k".into(), key), ("v".into(), value)]
                            .into_iter()
                            .collect(),
                    )
                }),
            ]
        })
    }

    fn escape_token(token: &str) -> String {
        token.replace('~', "~0").replace('/', "~1")
    }

    /// Every pointer into `value`, each prefixed with `prefix`.
    fn pointers_into(value: &Value, prefix: &str, found: &mut Vec<String>) {
        found.push(prefix.to_string());
        match value {
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    pointers_into(item, &format!("{prefix}/{index}"), found);
                }
            }
            Value::Object(members) => {
                for (name, member) in members {
                    pointers_into(member, &format!("{prefix}/{}", escape_token(name)), found);
                }
            }
            _ => {}
        }
    }

    /// Pointers a rule could use on `doc`: to its arrays, to anything in it (or nowhere), and
    /// into the elements of its arrays (candidate keys).
    fn candidate_pointers(doc: &Value) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut anything = vec!["/missing".to_string(), "/0/missing".to_string()];
        pointers_into(doc, "", &mut anything);
        let mut arrays = Vec::new();
        let mut keys = vec!["/missing".to_string()];
        for pointer in &anything {
            if let Some(Value::Array(items)) = doc.pointer(pointer) {
                arrays.push(pointer.clone());
                for item in items {
                    pointers_into(item, "", &mut keys);
                }
            }
        }
        (arrays, anything, keys)
    }

    fn reference(doc: &Value, rule: &PointsRule) -> Points {
        let mut points = 0;
        let mut keyed = HashSet::new();
        let mut unkeyed = HashSet::new();
        for pointer in &rule.array_pointers {
            let Some(Value::Array(items)) = doc.pointer(pointer) else {
                continue;
            };
            points += items.len() as u64;
            for item in items {
                match rule
                    .unique_key_pointer
                    .as_deref()
                    .and_then(|key| item.pointer(key))
                {
                    Some(key) => keyed.insert(key.to_string()),
                    None => unkeyed.insert(item.to_string()),
                };
            }
        }
        Points {
            points,
            unique_points: (keyed.len() + unkeyed.len()) as u64,
        }
    }

    /// A body like the upload bench's: `n` locations, every tenth key repeated, after a member
    /// that a pointer also counts.
    fn locations_body(n: usize, pretty: bool) -> (Value, Vec<u8>) {
        let locations: Vec<Value> = (0..n)
            .map(|i| {
                serde_json::json!({
                    "key": format!("loc-{}", i - i % 10 * usize::from(i % 10 == 3)),
                    "latlon": [55.0 + i as f64 * 1e-6, 37.5],
                    "comment": "dock \"east\" \u{e9}",
                })
            })
            .collect();
        let doc = serde_json::json!({"vehicles": [1, 2, 3], "locations": locations});
        let body = serialise(&doc, pretty);
        (doc, body)
    }

    #[test]
    fn a_count_fed_as_the_body_arrives_goes_on_from_where_it_stopped() {
        let rule = rule(&["/vehicles", "/locations"], Some("/key"));
        for pretty in [false, true] {
            let (doc, body) = locations_body(5_000, pretty);
            let mut count = PointsCount::with_step(&rule, 8 << 10);
            for end in (0..body.len()).step_by(4 << 10) {
                count.feed(&body[..end]);
            }
            let last_kept = count.resume.as_ref().map(|kept| kept.at.pos);
            let counted = count.finish(&body);
            assert_eq!(counted, Ok(reference(&doc, &rule)));
            assert_eq!(counted, count_points(&body, &rule));
            // The last count went on from its array's last 8-12 KiB, not from the start.
            let kept = last_kept.expect("a point kept inside the locations");
            assert!(
                kept + (16 << 10) > body.len(),
                "kept {kept} of {}",
                body.len()
            );
        }
    }

    #[test]
    fn a_long_element_still_arriving_is_not_scanned_again_per_feed() {
        // One element of 4 MiB arriving in 1 KiB pieces: each feed stops at its start, so the
        // feeds must space out as it grows (in all, scanning stays within a few times the body).
        let rule = rule(&["/items"], None);
        let blob = "x".repeat(4 << 20);
        let body = format!(r#"{{"items":[{{"blob":"{blob}"}}]}}"#).into_bytes();
        let mut count = PointsCount::with_step(&rule, 1 << 10);
        for end in (0..body.len()).step_by(1 << 10) {
            count.feed(&body[..end]);
        }
        assert!(count.scans <= 16, "{} scans", count.scans);
        assert_eq!(
            count.finish(&body),
            Ok(Points {
                points: 1,
                unique_points: 1
            })
        );
    }

    #[test]
    fn a_count_fed_as_the_body_arrives_reports_what_the_whole_body_count_reports() {
        let rule = rule(&["/locations"], Some("/key"));
        let (_, valid) = locations_body(2_000, false);
        let broken_at = |body: &[u8], at: usize, bytes: &[u8]| {
            let mut broken = body.to_vec();
            broken.splice(at..at + bytes.len(), bytes.iter().copied());
            broken
        };
        let middle = valid.len() / 2;
        // A separator (no string of this body holds a comma), made a stray '}'.
        let comma = 1000 + valid[1000..].iter().position(|&b| b == b',').unwrap();
        for body in [
            // Cut where a feed stops: the last element unfinished, the array unclosed.
            valid[..middle].to_vec(),
            // Wrong before a feed's end, and wrong after the last feed.
            broken_at(&valid, comma, b"}"),
            broken_at(&valid, valid.len() - 20, b"\x01"),
            [valid.as_slice(), b" x"].concat(),
        ] {
            let mut count = PointsCount::with_step(&rule, 4 << 10);
            for end in (0..body.len()).step_by(1 << 10) {
                count.feed(&body[..end]);
            }
            let whole = count_points(&body, &rule);
            assert!(whole.is_err());
            assert_eq!(count.finish(&body), whole);
        }
    }

    /// A document (an array or object, as request bodies are) and a rule that mostly names its
    /// arrays.
    fn document_and_rule() -> impl Strategy<Value = (Value, PointsRule, bool)> {
        let document = prop_oneof![
            prop::collection::vec(json_value(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(member_name(), json_value(), 0..5)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ];
        document.prop_flat_map(|doc| {
            let (arrays, anything, keys) = candidate_pointers(&doc);
            // The root is always an array or object, so `anything` is never empty.
            let pointer = if arrays.is_empty() {
                prop::sample::select(anything).boxed()
            } else {
                prop_oneof![
                    3 => prop::sample::select(arrays),
                    1 => prop::sample::select(anything),
                ]
                .boxed()
            };
            let array_pointers = prop::collection::vec(pointer, 1..4);
            let key = prop::option::of(prop::sample::select(keys));
            (Just(doc), array_pointers, key, any::<bool>()).prop_map(
                |(doc, array_pointers, unique_key_pointer, pretty)| {
                    let rule = PointsRule {
                        array_pointers,
                        unique_key_pointer,
                    };
                    (doc, rule, pretty)
                },
            )
        })
    }

    fn serialise(doc: &Value, pretty: bool) -> Vec<u8> {
        let serialised = if pretty {
            serde_json::to_vec_pretty(doc)
        } else {
            serde_json::to_vec(doc)
        };
        serialised.expect("a serde_json::Value always serialises")
    }

    proptest! {
        // 512 cases, or PROPTEST_CASES for a longer search.
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(512)
        ))]

        #[test]
        fn agrees_with_a_document_tree((doc, rule, pretty) in document_and_rule()) {
            prop_assert_eq!(rule.validate(), Ok(()));
            let body = serialise(&doc, pretty);
            prop_assert_eq!(count_points(&body, &rule), Ok(reference(&doc, &rule)));
        }

        #[test]
        fn mutated_bodies_never_panic_and_are_judged_like_serde_json(
            (doc, rule, pretty) in document_and_rule(),
            mutations in prop::collection::vec(
                (any::<prop::sample::Index>(), 0..3u8, prop_oneof![
                    prop::sample::select(b"{}[],:\"\\0123456789.eE+-tfnu \n\x01\x7f\x80\xc3\xed\xff".to_vec()),
                    any::<u8>(),
                ]),
                1..4,
            ),
        ) {
            let mut body = serialise(&doc, pretty);
            for (at, operation, byte) in mutations {
                match operation {
                    0 if !body.is_empty() => {
                        let index = at.index(body.len());
                        body[index] = byte;
                    }
                    1 => body.insert(at.index(body.len() + 1), byte),
                    _ if !body.is_empty() => {
                        body.remove(at.index(body.len()));
                    }
                    _ => {}
                }
            }
            let ours = count_points(&body, &rule);
            let theirs = serde_json::from_slice::<Value>(&body);
            match (&ours, &theirs) {
                (Err(error), _) if error.reason == DUPLICATE_MEMBER => {}
                (Ok(_), Err(error)) if error.to_string().contains("number out of range") => {}
                (Ok(counted), Ok(parsed)) => {
                    prop_assert_eq!(counted.points, reference(parsed, &rule).points);
                }
                (Err(error), Ok(_)) => prop_assert!(false, "rejected valid JSON: {}", error),
                (Ok(_), Err(error)) => prop_assert!(false, "accepted invalid JSON: {}", error),
                (Err(_), Err(_)) => {}
            }
        }

        #[test]
        fn repeated_records_agree_with_a_document_tree(
            record in json_value(),
            copies in 3..7usize,
            key in prop::option::of(prop_oneof![Just("/k"), Just("/v"), Just(""), Just("/0")]),
            pretty in any::<bool>(),
            mutation in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
        ) {
            // Copies of one record make string lengths guessed; a mutation in a late copy
            // then meets a guess.
            let doc = serde_json::json!({"a": vec![record; copies]});
            let rule = rule(&["/a"], key);
            let mut body = serialise(&doc, pretty);
            match mutation {
                None => prop_assert_eq!(count_points(&body, &rule), Ok(reference(&doc, &rule))),
                Some((at, byte)) => {
                    let index = body.len() / 2 + at.index(body.len() / 2);
                    let numeric = |b: u8| b.is_ascii_digit() || b"eE.+-".contains(&b);
                    // A number's text changed into another spelling of the same float ("1e5"
                    // into "1E5"): the tree sees one value where the counter, comparing bytes
                    // as documented, sees two.
                    let respelled_number = numeric(body[index]) && numeric(byte);
                    body[index] = byte;
                    let ours = count_points(&body, &rule);
                    match (&ours, serde_json::from_slice::<Value>(&body)) {
                        (Err(error), _) if error.reason == DUPLICATE_MEMBER => {}
                        (Ok(_), Err(error)) if error.to_string().contains("number out of range") => {}
                        (Ok(counted), Ok(parsed)) if respelled_number => {
                            let expected = reference(&parsed, &rule);
                            prop_assert_eq!(counted.points, expected.points);
                            prop_assert!(counted.unique_points >= expected.unique_points);
                        }
                        (Ok(counted), Ok(parsed)) => {
                            prop_assert_eq!(*counted, reference(&parsed, &rule));
                        }
                        (Err(error), Ok(_)) => prop_assert!(false, "rejected valid JSON: {}", error),
                        (Ok(_), Err(error)) => prop_assert!(false, "accepted invalid JSON: {}", error),
                        (Err(_), Err(_)) => {}
                    }
                }
            }
        }

        #[test]
        fn a_body_fed_as_it_arrives_counts_as_the_whole_body(
            (doc, rule, pretty) in document_and_rule(),
            mutation in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            step in 1..32usize,
        ) {
            let mut body = serialise(&doc, pretty);
            if let Some((at, byte)) = mutation {
                let index = at.index(body.len());
                body[index] = byte;
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
            cuts.sort_unstable();
            let mut count = PointsCount::with_step(&rule, step);
            for cut in cuts {
                count.feed(&body[..cut]);
            }
            prop_assert_eq!(count.finish(&body), count_points(&body, &rule));
        }

        #[test]
        fn per_element_fast_path_agrees_with_the_cursor_path(
            (doc, rule, pretty) in document_and_rule(),
        ) {
            // A pointer into the elements of a counted array (resolving nowhere: generated
            // arrays are short, and member names have no digits) makes the scanner follow
            // every element with cursors instead of `count_element`.
            let body = serialise(&doc, pretty);
            let mut followed = rule.clone();
            for pointer in &rule.array_pointers {
                followed.array_pointers.push(format!("{pointer}/999999"));
            }
            prop_assert_eq!(count_points(&body, &followed), count_points(&body, &rule));
        }
    }
}
