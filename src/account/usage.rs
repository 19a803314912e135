//! What a caller has used and may still use: GET /account/quota, /statistics, /report,
//! /audit and /data/{tracecode}. Reads first flush the store writer, so a call that just
//! finished is visible at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{check_len, AccountResponse, Call};
use crate::coding::{self, Codings, DecodeError};
use crate::error::ApiError;
use crate::model::{MethodGroup, Role, ServiceName};
use crate::report::{self, DailyRow};
use crate::store::{self, AuditQuery, AuditSort, Flow, Payload, UserRecord, Visibility};
use crate::trace;

/// The API's bounds for quota values; an unlimited quota is shown as its bound.
const MAX_POINTS_PER_REQUEST: u64 = 1_000_000;
const MAX_POINTS_PER_DAY: u64 = 100_000_000;
/// The API's bound for the points of one audited call and of one statistics day: a larger
/// value (possible where no quota limits it) is shown as the bound, as the API's clients
/// refuse anything above it. The charge itself is exact, and the report's workbook shows it
/// whole.
const MAX_POINTS_SHOWN: u64 = 10_000_000;
/// The longest statistics period, in days.
const MAX_PERIOD_DAYS: i64 = 3653;

fn internal(e: store::StoreError) -> ApiError {
    tracing::error!(error = %e, "store read failed");
    ApiError::internal("the store could not be read")
}

/// How long a read waits for the calls before it to be on record.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn flush(call: &Call<'_>) -> Result<(), ApiError> {
    match call.app.writer.flush(FLUSH_WAIT).await {
        Ok(()) => Ok(()),
        Err(e @ (store::StoreError::Behind(_) | store::StoreError::Failing)) => {
            tracing::error!(error = %e, "an account read did not see the latest calls on record");
            Err(ApiError::unavailable(
                "store: the latest calls are not on record yet; try again shortly",
                1,
            ))
        }
        Err(e) => Err(internal(e)),
    }
}

fn get<'q>(query: &'q [(String, String)], name: &str) -> Option<&'q str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn offset_of(user: &UserRecord) -> FixedOffset {
    FixedOffset::east_opt(user.timezone * 3600)
        .unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero offset"))
}

pub fn quota(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let user = call.caller()?;
    let mut services: BTreeMap<ServiceName, Vec<Value>> = BTreeMap::new();
    for (service, group, v) in call.app.quotas.all_for(&user) {
        let mut method = json!({
            "method_group": group,
            "points_per_request": v.points_per_request.unwrap_or(MAX_POINTS_PER_REQUEST).min(MAX_POINTS_PER_REQUEST),
            "points_per_day": v.points_per_day.unwrap_or(MAX_POINTS_PER_DAY).min(MAX_POINTS_PER_DAY),
        });
        if let Some(w) = v.points_per_date_window {
            method["points_per_date_window"] = json!(w);
        }
        if let Some(c) = v.max_concurrent_execution {
            method["max_concurrent_execution"] = json!(c);
        }
        services.entry(service).or_default().push(method);
    }
    let services: Vec<Value> = services
        .into_iter()
        .map(|(s, m)| json!({"service": s, "methods": m}))
        .collect();
    Ok(AccountResponse::json(
        &json!({"base": {"services": services}}),
    ))
}

/// The statistics/report period: inclusive local dates, defaulting to this month so far; and
/// whether `to` was left to its default.
fn period(call: &Call<'_>, user: &UserRecord) -> Result<(NaiveDate, NaiveDate, bool), ApiError> {
    let query = call.query()?;
    let today = Utc::now().with_timezone(&offset_of(user)).date_naive();
    let date = |field: &str| -> Result<Option<NaiveDate>, ApiError> {
        get(&query, field)
            .map(|v| {
                iso_date(v).ok_or_else(|| {
                    ApiError::invalid(field, "must be a date YYYY-MM-DD (years 0001 to 9999)")
                })
            })
            .transpose()
    };
    let from = date("from")?.unwrap_or_else(|| today.with_day(1).unwrap_or(today));
    let given_to = date("to")?;
    // Left out, `to` is today, or the day after when `from` asks for it (a continued quota
    // day may be ahead of the local date; see `through_continued_day`).
    let to = given_to.unwrap_or(if Some(from) == today.succ_opt() {
        from
    } else {
        today
    });
    if to < from {
        return Err(match given_to {
            Some(_) => ApiError::invalid("to", "must not be before from"),
            None => ApiError::invalid(
                "from",
                format!("must not be after to, which is today ({to}) when left out"),
            ),
        });
    }
    if (to - from).num_days() + 1 > MAX_PERIOD_DAYS {
        return Err(ApiError::invalid(
            "from, to",
            format!("the period may span at most {MAX_PERIOD_DAYS} days"),
        ));
    }
    Ok((from, to, given_to.is_none() && to == today))
}

/// The end of a period whose `to` was left out: today, or the day after when it holds points.
/// A user who set its timezone back keeps charging the later day it had reached (quota days
/// never go back), and "today's traffic shows at once" holds for that day too.
fn through_continued_day(
    call: &Call<'_>,
    user: &UserRecord,
    today: NaiveDate,
) -> Result<NaiveDate, ApiError> {
    let Some(next) = today.succ_opt() else {
        return Ok(today);
    };
    let day = store::day_of_date(next);
    let rows = call
        .app
        .store
        .stats(&user.username, day, day)
        .map_err(internal)?;
    Ok(
        if rows
            .iter()
            .any(|(_, _, _, c)| c.points > 0 || c.unique_points > 0)
        {
            next
        } else {
            today
        },
    )
}

/// A calendar date written exactly as `YYYY-MM-DD` (what the client's `date.isoformat()`
/// sends): no sign, no single-digit month or day, no year 0.
fn iso_date(v: &str) -> Option<NaiveDate> {
    let b = v.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape || v.starts_with("0000") {
        return None;
    }
    NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()
}

fn daily_rows(
    call: &Call<'_>,
    user: &UserRecord,
    from: NaiveDate,
    to: NaiveDate,
    first_visible: Option<NaiveDate>,
) -> Result<Vec<DailyRow>, ApiError> {
    let from = first_visible.map_or(from, |first| from.max(first));
    if from > to {
        return Ok(Vec::new());
    }
    let rows = call
        .app
        .store
        .stats(
            &user.username,
            store::day_of_date(from),
            store::day_of_date(to),
        )
        .map_err(internal)?;
    Ok(rows
        .into_iter()
        .filter(|(_, _, _, c)| c.points > 0 || c.unique_points > 0)
        .map(|(day, service, group, c)| DailyRow {
            date: store::date_of_day(day),
            service: service.to_string(),
            method_group: group.to_string(),
            points: c.points,
            unique_points: c.unique_points,
        })
        .collect())
}

/// Whose statistics a call reads: the caller's own, or, with the `username` parameter (beyond
/// the API's; its clients never send it), another account the caller's role sees: a PARTNER
/// its company's, an ADMIN anyone's. Any other name, or one that is no account, is a 404, the
/// same answer, so a name outside the caller's view is never confirmed to exist.
fn subject(call: &mut Call<'_>) -> Result<Arc<UserRecord>, ApiError> {
    let caller = call.caller()?;
    let query = call.query()?;
    let Some(name) = get(&query, "username") else {
        return Ok(caller);
    };
    if name == caller.username {
        return Ok(caller);
    }
    let seen = call
        .app
        .authority
        .user(name)
        .filter(|other| match visibility(&caller) {
            Visibility::All => true,
            Visibility::Company(c) => other.company_key == c,
            Visibility::User(_) => false,
        });
    if let Some(other) = seen {
        return Ok(other);
    }
    // A removed account's statistics stay under its name, for an ADMIN to read (its company
    // is no longer known, so a PARTNER cannot be shown to be its). Its days are read in the
    // caller's timezone.
    if matches!(visibility(&caller), Visibility::All)
        && call.app.store.was_removed(name).map_err(internal)?
    {
        return Ok(Arc::new(UserRecord {
            username: name.to_string(),
            password_hash: String::new(),
            company_key: String::new(),
            roles: Vec::new(),
            name: None,
            email: None,
            phone: None,
            timezone: caller.timezone,
            token_version: 0,
            password_changed: false,
            quotas: Vec::new(),
            company_days_from: None,
        }));
    }
    Err(ApiError::not_found(name.to_string()))
}

/// The first local date of `user`'s statistics the caller may see: a PARTNER looking at
/// another account sees the days wholly after it joined the PARTNER's company, not what it
/// used under another company (which that company's audit keeps). Statistics are daily, so
/// the day of the move itself, which may hold the former company's calls, is not shown.
fn first_visible_date(
    call: &mut Call<'_>,
    user: &UserRecord,
) -> Result<Option<NaiveDate>, ApiError> {
    let caller = call.caller()?;
    if caller.username == user.username || !matches!(visibility(&caller), Visibility::Company(_)) {
        return Ok(None);
    }
    Ok(user.company_days_from.map(store::date_of_day))
}

/// The rows of a statistics or report period, read once every call before this one is on
/// record; and the period's end, which a left-out `to` may move to a continued quota day.
async fn period_rows(
    call: &mut Call<'_>,
    user: &UserRecord,
    from: NaiveDate,
    to: NaiveDate,
    default_to: bool,
) -> Result<(NaiveDate, Vec<DailyRow>), ApiError> {
    let first_visible = first_visible_date(call, user)?;
    flush(call).await?;
    let to = if default_to {
        through_continued_day(call, user, to)?
    } else {
        to
    };
    Ok((to, daily_rows(call, user, from, to, first_visible)?))
}

pub async fn statistics(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let user = subject(call)?;
    let (from, to, default_to) = period(call, &user)?;
    let (_, rows) = period_rows(call, &user, from, to, default_to).await?;
    let mut dates: BTreeMap<NaiveDate, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for r in rows {
        dates
            .entry(r.date)
            .or_default()
            .entry(r.service)
            .or_default()
            .push(json!({
                "method_group": r.method_group,
                "unique_points_per_day": r.unique_points.min(MAX_POINTS_SHOWN),
                "points_per_day": r.points.min(MAX_POINTS_SHOWN),
            }));
    }
    let dates: Vec<Value> = dates
        .into_iter()
        .map(|(date, services)| {
            let services: Vec<Value> = services
                .into_iter()
                .map(|(s, m)| json!({"service": s, "methods": m}))
                .collect();
            json!({"date": date.format("%Y-%m-%d").to_string(), "services": services})
        })
        .collect();
    Ok(AccountResponse::json(
        &json!({"username": user.username, "dates": dates}),
    ))
}

pub async fn report(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let user = subject(call)?;
    let (from, to, default_to) = period(call, &user)?;
    // Excel has no dates before 1900: cells before it would read as errors.
    if from < report::FIRST_EXCEL_DATE {
        return Err(ApiError::invalid(
            "from",
            format!("the report's dates start at {}", report::FIRST_EXCEL_DATE),
        ));
    }
    let (to, rows) = period_rows(call, &user, from, to, default_to).await?;
    let bytes = report::statistics_workbook(&user.username, from, to, &rows)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let filename = format!(
        "report_{}_{}_{}.xlsx",
        user.username,
        from.format("%Y%m%d"),
        to.format("%Y%m%d")
    );
    Ok(AccountResponse::file(
        "application/octet-stream",
        Bytes::from(bytes),
        Some(filename),
    ))
}

/// Parses the date-times the official client and people send: RFC 3339 with `Z`, `+03:00`
/// or `+0300`, fractional seconds or not, and naive ones (taken in the user's timezone).
pub fn parse_time(value: &str, tz: FixedOffset) -> Option<DateTime<Utc>> {
    let mut v = value.trim().to_string();
    // RFC 3339 5.6 lets a space stand for the `T` between the date and the time.
    if v.as_bytes().get(10) == Some(&b' ') {
        v.replace_range(10..11, "T");
    }
    // A `+` that arrived unencoded in a query string was decoded to a space.
    let v = v.replace(' ', "+");
    if let Ok(t) = DateTime::parse_from_rfc3339(&v) {
        return Some(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%dT%H:%M:%S%z",
        "%Y-%m-%dT%H:%M%z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(&v, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&v, format) {
            return tz
                .from_local_datetime(&t)
                .single()
                .map(|t| t.with_timezone(&Utc));
        }
    }
    NaiveDate::parse_from_str(&v, "%Y-%m-%d")
        .ok()
        .and_then(|d| tz.from_local_datetime(&d.and_hms_opt(0, 0, 0)?).single())
        .map(|t| t.with_timezone(&Utc))
}

/// ISO 8601 duration, to the microsecond where that fits the API's 16 characters.
pub fn iso_duration(duration_us: u64) -> String {
    let seconds = duration_us / 1_000_000;
    let fraction = format!("{:06}", duration_us % 1_000_000);
    let mut fraction = fraction.trim_end_matches('0');
    let room = 16usize.saturating_sub(format!("PT{seconds}.S").len());
    if fraction.len() > room {
        fraction = &fraction[..room.min(fraction.len())];
    }
    if fraction.is_empty() {
        format!("PT{seconds}S")
    } else {
        format!("PT{seconds}.{fraction}S")
    }
}

fn int_param(
    query: &[(String, String)],
    field: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    match get(query, field) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| ApiError::invalid(field, format!("must be an integer {min}..{max}"))),
    }
}

fn enum_param<T: std::str::FromStr<Err = String>>(
    query: &[(String, String)],
    field: &str,
) -> Result<Option<T>, ApiError> {
    get(query, field)
        .map(|v| v.parse::<T>().map_err(|e| ApiError::invalid(field, e)))
        .transpose()
}

fn visibility(user: &UserRecord) -> Visibility {
    if user.roles.contains(&Role::ADMIN) {
        Visibility::All
    } else if user.roles.contains(&Role::PARTNER) {
        Visibility::Company(user.company_key.clone())
    } else {
        Visibility::User(user.username.clone())
    }
}

pub async fn audit(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let user = call.caller()?;
    let query = call.query()?;
    let tz = offset_of(&user);
    let now = Utc::now();
    let time = |field: &str, default: DateTime<Utc>| -> Result<DateTime<Utc>, ApiError> {
        match get(&query, field) {
            None => Ok(default),
            Some(v) => parse_time(v, tz).ok_or_else(|| {
                ApiError::invalid(
                    field,
                    "must be a date-time such as 2024-02-21T09:30:00+03:00",
                )
            }),
        }
    };
    let start_of_today = tz
        .from_local_datetime(
            &now.with_timezone(&tz)
                .date_naive()
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default(),
        )
        .single()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now);
    let from = time("from", start_of_today)?;
    // `to` is exclusive. Left out, it ends just after now's millisecond, so that a call which
    // ended just before this request shows, even within the same millisecond.
    let to = time("to", now + chrono::Duration::milliseconds(1))?;
    let offset = int_param(&query, "offset", 0, 0, 10_000_000)? as usize;
    let limit = int_param(&query, "limit", 100, 1, 10_000_000)? as usize;
    let service = enum_param::<ServiceName>(&query, "service_name")?;
    let method_group = enum_param::<MethodGroup>(&query, "method_group")?;
    let operation = get(&query, "operation_id").map(str::to_string);
    if let Some(op) = &operation {
        check_len("operation_id", op, 3, 256)?;
    }
    let sort = match get(&query, "sort_field").unwrap_or("time") {
        "time" => AuditSort::Time,
        "username" => AuditSort::Username,
        "service" => AuditSort::Service,
        "operation" => AuditSort::Operation,
        "method_group" => AuditSort::MethodGroup,
        "points_count" => AuditSort::PointsCount,
        "duration" => AuditSort::Duration,
        _ => {
            return Err(ApiError::invalid(
                "sort_field",
                "must be one of time, username, service, operation, method_group, points_count, duration",
            ))
        }
    };
    let descending = match get(&query, "sort_direction").unwrap_or("ASC") {
        "ASC" | "asc" => false,
        "DESC" | "desc" => true,
        _ => return Err(ApiError::invalid("sort_direction", "must be ASC or DESC")),
    };
    flush(call).await?;
    let app = call.app;
    let q = AuditQuery {
        visibility: visibility(&user),
        from_ms: from.timestamp_millis(),
        to_ms: to.timestamp_millis(),
        service,
        operation,
        method_group,
        sort,
        descending,
        offset,
        limit,
    };
    // A page takes milliseconds; sorted by another field than time, up to a second: off the
    // threads that serve calls.
    let store = app.store.clone();
    let sort_field = get(&query, "sort_field").unwrap_or("time").to_string();
    let page = tokio::task::spawn_blocking(move || store.audit(&q))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(internal)?;
    if page.too_many_to_sort {
        return Err(ApiError::invalid(
            "sort_field",
            format!(
                "sorting by {sort_field} reads every matching record, at most {}, and {} match: \
                 narrow from/to, or filter by service_name, operation_id or method_group",
                store::MAX_SORTED_MATCHES,
                page.filter_total
            ),
        ));
    }
    let actions: Vec<Value> = page
        .records
        .iter()
        .map(|r| {
            let time = trace::in_timezone(store::Store::utc_of_ms(r.time_ms), r.timezone);
            json!({
                "username": r.username,
                "company_key": r.company_key,
                "tracedata": {
                    "code": r.code,
                    "client": trace::client_label(&r.company_key, &r.username),
                    "server": &*app.config.server.name,
                    "service": r.service,
                    "operation": r.operation,
                    "time": trace::format_time(&time),
                },
                "method_group": r.method_group,
                "statistics": {
                    "points_count": r.points.min(MAX_POINTS_SHOWN),
                    "duration": iso_duration(r.duration_us),
                },
                // Beyond the API's AuditAction (its clients ignore it): the HTTP status the
                // caller got.
                "status": r.status,
            })
        })
        .collect();
    Ok(AccountResponse::json(&json!({
        "actions": actions,
        "statistics": {"overall": {"total": page.overall_total}, "filter": {"total": page.filter_total}},
    })))
}

pub async fn data(call: &mut Call<'_>, raw_code: &str) -> Result<AccountResponse, ApiError> {
    let user = call.caller()?;
    let code =
        Uuid::parse_str(raw_code).map_err(|_| ApiError::invalid("tracecode", "must be a UUID"))?;
    let query = call.query()?;
    let flow = match get(&query, "data_flow_type").unwrap_or("INPUT") {
        "INPUT" => Flow::Input,
        "OUTPUT" => Flow::Output,
        _ => {
            return Err(ApiError::invalid(
                "data_flow_type",
                "must be INPUT or OUTPUT",
            ))
        }
    };
    let stage = int_param(&query, "data_flow_stage", 0, 0, trace::MAX_STAGE as u64)? as u8;
    let convert = get(&query, "data_flow_convert").unwrap_or("ORIGIN");
    if !matches!(convert, "ORIGIN" | "JSON" | "XLSX") {
        return Err(ApiError::invalid(
            "data_flow_convert",
            "must be ORIGIN, JSON or XLSX",
        ));
    }
    flush(call).await?;
    let not_found = || ApiError::not_found(raw_code.to_string());
    let process = call
        .app
        .store
        .process(&code)
        .map_err(internal)?
        .ok_or_else(not_found)?;
    let visible = match visibility(&user) {
        Visibility::All => true,
        Visibility::Company(c) => process.company_key == c,
        Visibility::User(u) => process.owner == u,
    };
    if !visible {
        return Err(not_found());
    }
    let payload = call
        .app
        .store
        .payload(&code, flow, stage)
        .map_err(internal)?
        .ok_or_else(not_found)?;
    let mut response = match convert {
        "ORIGIN" => {
            let content_type = payload
                .content_type
                .as_deref()
                .unwrap_or("application/octet-stream");
            let (content_type, coding_field) = match &payload.content_encoding {
                None => (content_type, None),
                // The bytes as sent, in the coding they were sent in: HTTP clients decode them.
                Some(encoding)
                    if !payload.truncated
                        && coding::accepts(call.req.accept_encoding, encoding) =>
                {
                    (content_type, Some(("Content-Encoding", encoding.clone())))
                }
                // A stream cut at max_capture_bytes, which no decoder would take whole, or a
                // coding the caller does not take: the same bytes, as opaque ones, the coding
                // named beside them.
                Some(encoding) => (
                    "application/octet-stream",
                    Some(("X-Capture-Content-Encoding", encoding.clone())),
                ),
            };
            let mut response = AccountResponse::file(content_type, payload.body.clone(), None);
            response.headers.extend(coding_field);
            response
        }
        _ => {
            if payload.truncated {
                return Err(ApiError::invalid(
                    "data_flow_convert",
                    "the capture was truncated; only ORIGIN can be served",
                ));
            }
            // serde_json's reason: not JSON at all, or JSON this conversion cannot hold (nested
            // deeper than 128 levels, a number past f64 for XLSX).
            let not_json = |e: serde_json::Error| {
                let reason = e.to_string();
                let reason = reason.split(" at line ").next().unwrap_or(&reason);
                ApiError::invalid(
                    "data_flow_convert",
                    format!("the captured payload cannot be read as JSON ({reason}); use ORIGIN"),
                )
            };
            // Decoding, parsing and laying out a payload of up to max_capture_bytes is CPU
            // work of milliseconds to seconds: off the threads that serve calls. A coded
            // capture decodes to at most what a plain one may hold.
            let max_bytes = call.app.config.limits.max_capture_bytes;
            let as_json = convert == "JSON";
            let captured = payload.clone();
            let response = tokio::task::spawn_blocking(move || {
                let body = decoded(&captured, max_bytes)?;
                if as_json {
                    // Checked, then served as captured: parsing into values and printing them
                    // again would round long numbers and reorder members.
                    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(not_json)?;
                    return Ok(AccountResponse::file("application/json", body, None));
                }
                let value: Value = serde_json::from_slice(&body).map_err(not_json)?;
                let bytes =
                    report::json_workbook(&value).map_err(|e| ApiError::internal(e.to_string()))?;
                let name = format!(
                    "{code}_{}_{stage}.xlsx",
                    if flow == Flow::Input {
                        "input"
                    } else {
                        "output"
                    }
                );
                Ok::<_, ApiError>(AccountResponse::file(
                    "application/octet-stream",
                    Bytes::from(bytes),
                    Some(name),
                ))
            });
            response
                .await
                .map_err(|e| ApiError::internal(e.to_string()))??
        }
    };
    response
        .headers
        .push(("X-Capture-Truncated", payload.truncated.to_string()));
    // Captured bytes are the callers' (ORIGIN keeps their content type, text/html included):
    // a browser must neither guess another type nor run them as a page of this origin.
    response
        .headers
        .push(("X-Content-Type-Options", "nosniff".to_string()));
    response
        .headers
        .push(("Content-Security-Policy", "sandbox".to_string()));
    Ok(response)
}

/// A capture's body as it reads: decoded from its content coding, to at most `limit` bytes.
fn decoded(payload: &Payload, limit: usize) -> Result<Bytes, ApiError> {
    let Some(field) = &payload.content_encoding else {
        return Ok(payload.body.clone());
    };
    let cannot = |why: String| {
        ApiError::invalid(
            "data_flow_convert",
            format!("the captured payload (Content-Encoding: {field}) {why}; use ORIGIN"),
        )
    };
    match Codings::of_field(field) {
        Codings::Readable(codings) => match coding::decode(&codings, &payload.body, limit) {
            Ok(body) => Ok(Bytes::from(body)),
            Err(DecodeError::TooLarge(_)) => Err(cannot(format!(
                "decodes to more than max_capture_bytes ({limit})"
            ))),
            Err(e) => Err(cannot(e.to_string())),
        },
        Codings::Unreadable(name) => Err(cannot(format!(
            "is coded in '{name}', which cannot be read"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_dates_are_exactly_yyyy_mm_dd() {
        assert_eq!(iso_date("2024-02-29"), NaiveDate::from_ymd_opt(2024, 2, 29));
        assert_eq!(iso_date("0001-01-01"), NaiveDate::from_ymd_opt(1, 1, 1));
        for bad in [
            "2024-1-1",
            "+2026-11-29",
            " 2024-01-01",
            "2024-01-01 ",
            "0000-01-01",
            "-001-01-01",
            "2024-02-30",
            "2023-02-29",
            "2024/01/01",
            "20240101",
            "",
            "2024-01-01T00:00",
            "９９９９-01-01",
        ] {
            assert_eq!(iso_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_time_form_the_client_sends_parses() {
        let tz = FixedOffset::east_opt(3 * 3600).unwrap();
        let want = DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        for v in [
            "2025-01-02T03:04:05Z",
            "2025-01-02T03:04:05+00:00",
            "2025-01-02T03:04:05.000000+0000",
            "2025-01-02T06:04:05+03:00",
            "2025-01-02T06:04:05 0300",
            "2025-01-02T06:04:05",
            "2025-01-02T06:04:05.000000",
            "2025-01-02 03:04:05Z",
            "2025-01-02 06:04:05 03:00",
            "2025-01-02 06:04:05",
        ] {
            assert_eq!(parse_time(v, tz), Some(want), "{v}");
        }
        assert_eq!(parse_time("yesterday", tz), None);
    }

    #[test]
    fn durations_fit_sixteen_characters() {
        assert_eq!(iso_duration(153_000), "PT0.153S");
        assert_eq!(iso_duration(366), "PT0.000366S");
        assert_eq!(iso_duration(0), "PT0S");
        assert_eq!(iso_duration(2_000_000), "PT2S");
        assert_eq!(iso_duration(12_345_678_901_234), "PT12345678.9012S");
        assert!(iso_duration(86_400_000_000 * 365 + 123_456).len() <= 16);
    }
}
