"""Tollgate's account API driven through the official generated client, vrt-lss-account 6.20.2258.

Run by run.sh against a live Tollgate started on tollgate.toml; the base URL and the accounts come
from environment variables (defaults: the values of tollgate.toml). Every check is something a
user of that client relies on: the client must accept each answer unchanged, and the values must
be the ones the traffic of this run produced.
"""

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import openpyxl
import pytest
import vrt_lss_account as vrt
from vrt_lss_account.exceptions import (
    ApiException,
    BadRequestException,
    ForbiddenException,
    NotFoundException,
    UnauthorizedException,
)

BASE_URL = os.environ.get("TOLLGATE_URL", "http://127.0.0.1:8080").rstrip("/")
SERVER_NAME = os.environ.get("TOLLGATE_SERVER_NAME", "conformance")
COMPANY = os.environ.get("TOLLGATE_COMPANY", "acme")
USER = os.environ.get("TOLLGATE_USER", "alice")
USER_PASSWORD = os.environ.get("TOLLGATE_USER_PASSWORD", "alice-password-1")
USER_TIMEZONE_HOURS = int(os.environ.get("TOLLGATE_USER_TIMEZONE", "3"))
ADMIN = os.environ.get("TOLLGATE_ADMIN", "root_admin")
ADMIN_PASSWORD = os.environ.get("TOLLGATE_ADMIN_PASSWORD", "admin-password-1")
PASSWORD_USER = os.environ.get("TOLLGATE_PASSWORD_USER", "bob")
PASSWORD_USER_PASSWORD = os.environ.get("TOLLGATE_PASSWORD_USER_PASSWORD", "bob-password-1")
PROFILE_USER = os.environ.get("TOLLGATE_PROFILE_USER", "carol")
PROFILE_USER_PASSWORD = os.environ.get("TOLLGATE_PROFILE_USER_PASSWORD", "carol-password-1")

USER_TZ = timezone(timedelta(hours=USER_TIMEZONE_HOURS))
PLAN_PATH = "/universal/plan/calculation"
PLAN_OPERATION = "run_plan_calculation"
# The demo upstream takes this long per calculation (tollgate.toml, compute_time_ms).
DEMO_COMPUTE_SECONDS = 0.3
# Audit and captured payloads reach the store through a batched writer, not at once.
STORE_VISIBLE_WITHIN_SECONDS = 10.0
# Tolerance between this machine's clock and the times Tollgate stamps (same machine).
CLOCK_SLACK = timedelta(seconds=2)
# Spacing between the proxied calls, so that their order in time is unambiguous.
CALL_SPACING_SECONDS = 0.05


def client(token=None):
    configuration = vrt.Configuration(host=BASE_URL)
    if token is not None:
        configuration.access_token = token
    return vrt.ApiClient(configuration)


def login(username, password, ttl_seconds=3600):
    request = vrt.TokenRequest(username=username, password=password, ttl_seconds=ttl_seconds)
    return vrt.AuthApi(client()).run_token_generation(request)


def jwt_claims(token):
    parts = token.split(".")
    assert len(parts) == 3, f"not a JWT: {token!r}"
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


def iso_duration_seconds(text):
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", text)
    assert match, f"not an ISO 8601 duration of days/hours/minutes/seconds: {text!r}"
    days, hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def assert_account_tracedata(tracedata, operation):
    """A complete tracedata of an account API answer: a code a user can quote to an operator."""
    assert isinstance(tracedata, vrt.Tracedata)
    assert uuid.UUID(tracedata.code)
    assert tracedata.server == SERVER_NAME
    assert tracedata.service == vrt.ServiceName.ACCOUNT
    assert tracedata.operation == operation
    assert tracedata.time.tzinfo is not None, "tracedata.time must carry an offset"
    assert abs(datetime.now(timezone.utc) - tracedata.time) < timedelta(minutes=5)


def raised(call):
    with pytest.raises(ApiException) as caught:
        call()
    return caught.value


def wait_until(check, timeout_seconds):
    """Polls `check` until it returns a truthy value; returns the last value."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        outcome = check()
        if outcome or time.monotonic() >= deadline:
            return outcome
        time.sleep(0.1)


@pytest.fixture(scope="session")
def user_token():
    return login(USER, USER_PASSWORD)


@pytest.fixture(scope="session")
def admin_token():
    return login(ADMIN, ADMIN_PASSWORD)


@dataclass
class ProxiedCall:
    tracecode: str
    status: int
    sent_body: bytes
    received_body: bytes


@dataclass
class Traffic:
    calls: list
    started: datetime
    finished: datetime

    @property
    def codes(self):
        return [call.tracecode for call in self.calls]


def proxied_plan_call(token, body):
    request = urllib.request.Request(
        BASE_URL + PLAN_PATH,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, received = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, received = error.code, error.headers, error.read()
    tracecode = headers.get("X-Tracecode")
    assert tracecode, f"no X-Tracecode on a proxied answer ({status}: {received[:200]!r})"
    assert uuid.UUID(tracecode)
    return ProxiedCall(tracecode, status, body, received)


# Three points, two of them unique by `key`; the two empty calls add audit records and no points,
# so the day's statistics are exactly 3 points / 2 unique whatever way unique points are summed.
# The uneven spacing makes any re-serialisation of the captured input show.
PLAN_BODY = b'{"locations": [ {"key": "a"},{"key":"b"},  {"key": "a"} ]}\n'
EMPTY_PLAN_BODY = b'{"locations": []}'


@pytest.fixture(scope="session")
def traffic(user_token):
    started = datetime.now(timezone.utc)
    calls = []
    for body in (PLAN_BODY, EMPTY_PLAN_BODY, EMPTY_PLAN_BODY):
        calls.append(proxied_plan_call(user_token, body))
        time.sleep(CALL_SPACING_SECONDS)
    finished = datetime.now(timezone.utc)
    assert 200 <= calls[0].status < 300, (
        f"the demo upstream refused the plan call: {calls[0].status} {calls[0].received_body[:300]!r}"
    )
    assert len(set(call.tracecode for call in calls)) == 3, "each new process needs its own tracecode"

    audit = vrt.AuditApi(client(user_token))
    data = vrt.DataApi(client(user_token))

    def stored():
        # Any failure here (an error status, or an answer the client's models reject: a
        # ValueError) is left for the tests that read audit and data to report.
        try:
            listed = audit.read_audit(service_name=vrt.ServiceName.UNIVERSAL, limit=100)
            data.read_data(calls[-1].tracecode, data_flow_type=vrt.FlowType.OUTPUT)
        except (ApiException, ValueError):
            return False
        return set(call.tracecode for call in calls) <= {a.tracedata.code for a in listed.actions}

    wait_until(stored, STORE_VISIBLE_WITHIN_SECONDS)
    return Traffic(calls, started, finished)


# --- system -----------------------------------------------------------------------------------


def test_version_answers_without_a_token():
    response = vrt.SystemApi(client()).version_with_http_info()
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    version = response.data
    assert isinstance(version, vrt.VersionResult)
    assert version.major >= 1 and version.minor >= 0 and version.build.strip()


def test_check_reports_a_running_server_as_healthy():
    check = vrt.SystemApi(client()).check()
    assert isinstance(check, vrt.CheckResult)
    assert 0 < check.health <= 1


# --- tokens -----------------------------------------------------------------------------------


def test_token_generation_honours_ttl_seconds():
    before = time.time()
    token = login(USER, USER_PASSWORD, ttl_seconds=120)
    after = time.time()
    assert isinstance(token, str)
    claims = jwt_claims(token)
    assert before + 120 - 2 <= claims["exp"] <= after + 120 + 2
    info = vrt.InfoApi(client(token)).read_info()
    assert (info.username, info.company_key) == (USER, COMPANY)


def test_token_generation_defaults_to_a_day():
    before = time.time()
    token = vrt.AuthApi(client()).run_token_generation(
        vrt.TokenRequest(username=USER, password=USER_PASSWORD)
    )
    assert abs(jwt_claims(token)["exp"] - (before + 86400)) <= 5


def test_validation_of_a_valid_token_gives_its_roles(user_token, admin_token):
    auth = vrt.AuthApi(client())
    user = auth.run_token_validation(user_token)
    assert user.valid is True
    assert user.roles == [vrt.UserRole.USER]
    admin = auth.run_token_validation(admin_token)
    assert admin.valid is True
    assert admin.roles == [vrt.UserRole.ADMIN]


def test_validation_of_garbage_is_invalid_not_an_error():
    result = vrt.AuthApi(client()).run_token_validation("garbage.not-a.jwt")
    assert result.valid is False
    assert not result.roles


def test_password_change_revokes_earlier_tokens():
    new_password = PASSWORD_USER_PASSWORD + "-changed"
    old_token = login(PASSWORD_USER, PASSWORD_USER_PASSWORD)
    new_token = vrt.AuthApi(client(old_token)).change_password(
        vrt.PasswordRequest(current_password=PASSWORD_USER_PASSWORD, new_password=new_password)
    )
    assert isinstance(new_token, str) and new_token != old_token
    assert jwt_claims(new_token)

    assert vrt.InfoApi(client(new_token)).read_info().username == PASSWORD_USER
    rejected = raised(lambda: vrt.InfoApi(client(old_token)).read_info())
    assert rejected.status == 401
    assert isinstance(rejected, UnauthorizedException)
    assert isinstance(rejected.data, vrt.General401)

    auth = vrt.AuthApi(client())
    assert auth.run_token_validation(old_token).valid is False
    assert auth.run_token_validation(new_token).valid is True

    assert raised(lambda: login(PASSWORD_USER, PASSWORD_USER_PASSWORD)).status == 401
    assert vrt.InfoApi(client(login(PASSWORD_USER, new_password))).read_info().username == PASSWORD_USER


# --- account info -----------------------------------------------------------------------------


def test_info_shows_the_configured_profile(user_token):
    info = vrt.InfoApi(client(user_token)).read_info()
    assert isinstance(info, vrt.AccountInfo)
    assert (info.username, info.company_key, info.timezone) == (USER, COMPANY, USER_TIMEZONE_HOURS)


def test_info_update_with_explicit_nulls_and_back():
    api = vrt.InfoApi(client(login(PROFILE_USER, PROFILE_USER_PASSWORD)))
    cleared = vrt.AccountInfo(
        username=PROFILE_USER, company_key=COMPANY, name=None, email=None, phone=None, timezone=5
    )
    assert '"name": null' in cleared.to_json()  # the client really sends the explicit nulls
    stored = api.update_info(cleared)
    assert (stored.username, stored.company_key, stored.timezone) == (PROFILE_USER, COMPANY, 5)
    assert (stored.name, stored.email, stored.phone) == (None, None, None)

    read = api.read_info()
    assert (read.name, read.email, read.phone, read.timezone) == (None, None, None, 5)
    # What users do: read, change one field, write the whole object back (absent -> explicit null).
    read.timezone = -12
    assert api.update_info(read).timezone == -12

    filled = vrt.AccountInfo(
        username=PROFILE_USER,
        company_key=COMPANY,
        name="Carol Second",
        email="carol.second@acme.example",
        phone="+15550199",
        timezone=12,
    )
    assert api.update_info(filled) == filled
    assert api.read_info() == filled


def test_info_update_of_another_user_is_forbidden_unless_admin(user_token, admin_token):
    someone_else = vrt.AccountInfo(
        username=PROFILE_USER, company_key=COMPANY, name="Not Allowed", timezone=1
    )
    forbidden = raised(lambda: vrt.InfoApi(client(user_token)).update_info(someone_else))
    assert forbidden.status == 403
    assert isinstance(forbidden, ForbiddenException)
    assert isinstance(forbidden.data, vrt.General403)
    assert_account_tracedata(forbidden.data.tracedata, "update_info")

    by_admin = vrt.AccountInfo(
        username=PROFILE_USER, company_key=COMPANY, name="Set By Admin", phone="+15550142", timezone=2
    )
    assert vrt.InfoApi(client(admin_token)).update_info(by_admin).name == "Set By Admin"
    seen = vrt.InfoApi(client(login(PROFILE_USER, PROFILE_USER_PASSWORD))).read_info()
    assert (seen.name, seen.phone, seen.timezone) == ("Set By Admin", "+15550142", 2)


# --- quota ------------------------------------------------------------------------------------


def test_quota_shows_the_configured_limits(user_token):
    quota = vrt.QuotasApi(client(user_token)).read_quota()
    assert [s.service for s in quota.base.services] == [vrt.ServiceName.UNIVERSAL]
    (plan,) = quota.base.services[0].methods
    assert plan.method_group == vrt.MethodGroup.PLAN
    assert plan.points_per_request == 1000
    assert plan.points_per_day == 100000
    assert plan.points_per_date_window == 300000
    assert plan.max_concurrent_execution == 5


# --- statistics and report --------------------------------------------------------------------


def user_today():
    return datetime.now(USER_TZ).date()


def test_statistics_for_today_count_the_proxied_points(user_token, traffic):
    today = user_today()
    stats = vrt.StatisticsApi(client(user_token)).generate_statistics(var_from=today, to=today)
    assert stats.username == USER
    assert [d.var_date for d in stats.dates] == [today]
    (service,) = stats.dates[0].services
    assert service.service == vrt.ServiceName.UNIVERSAL
    (method,) = service.methods
    assert method.method_group == vrt.MethodGroup.PLAN
    assert method.points_per_day == 3
    assert method.unique_points_per_day == 2


def test_statistics_default_period_includes_today(user_token, traffic):
    stats = vrt.StatisticsApi(client(user_token)).generate_statistics()
    today = [d for d in stats.dates if d.var_date == user_today()]
    assert len(today) == 1
    assert today[0].services[0].methods[0].points_per_day == 3


def test_statistics_leave_out_days_without_traffic(user_token, traffic):
    yesterday = user_today() - timedelta(days=1)
    stats = vrt.StatisticsApi(client(user_token)).generate_statistics(
        var_from=yesterday - timedelta(days=30), to=yesterday
    )
    assert stats.dates == []


def test_statistics_reject_a_reversed_period(user_token):
    today = user_today()
    error = raised(
        lambda: vrt.StatisticsApi(client(user_token)).generate_statistics(
            var_from=today, to=today - timedelta(days=1)
        )
    )
    assert error.status == 400
    assert isinstance(error, BadRequestException)
    assert isinstance(error.data, vrt.General400)
    assert_account_tracedata(error.data.tracedata, "generate_statistics")
    assert error.data.message


def cell_text(value):
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value).strip()


def test_report_is_an_xlsx_with_todays_usage(user_token, traffic):
    today = user_today()
    response = vrt.StatisticsApi(client(user_token)).read_report_with_http_info(
        var_from=today, to=today
    )
    assert response.status_code == 200
    disposition = response.headers.get("Content-Disposition", "")
    assert re.search(r'filename="?[^";]+\.xlsx', disposition), disposition
    content = bytes(response.data)
    assert content.startswith(b"PK"), "an XLSX file is a zip archive"
    workbook = openpyxl.load_workbook(io.BytesIO(content), read_only=True)
    rows = [
        [cell_text(value) for value in row]
        for sheet in workbook.worksheets
        for row in sheet.iter_rows(values_only=True)
    ]
    wanted = {today.isoformat(), "UNIVERSAL", "PLAN", "3", "2"}
    assert any(wanted <= set(row) for row in rows), f"no row holds {sorted(wanted)}: {rows}"


# --- audit ------------------------------------------------------------------------------------


def audit_api(token):
    return vrt.AuditApi(client(token))


def test_audit_lists_the_proxied_calls(user_token, traffic):
    result = audit_api(user_token).read_audit(service_name=vrt.ServiceName.UNIVERSAL)
    assert result.statistics.filter.total == 3
    assert result.statistics.overall.total >= 3
    by_code = {action.tracedata.code: action for action in result.actions}
    assert sorted(by_code) == sorted(traffic.codes)
    for call, expected_points in zip(traffic.calls, (3, 0, 0)):
        action = by_code[call.tracecode]
        assert (action.username, action.company_key) == (USER, COMPANY)
        assert action.method_group == vrt.MethodGroup.PLAN
        trace = action.tracedata
        assert trace.client == f"{COMPANY}_|_{USER}"
        assert trace.server == SERVER_NAME
        assert trace.service == vrt.ServiceName.UNIVERSAL
        assert trace.operation == PLAN_OPERATION
        assert trace.time.tzinfo is not None
        assert traffic.started - CLOCK_SLACK <= trace.time <= traffic.finished + CLOCK_SLACK
        assert action.statistics.points_count == expected_points
    first_duration = iso_duration_seconds(by_code[traffic.codes[0]].statistics.duration)
    assert 0 <= first_duration < 30


def test_audit_filters_by_service_operation_and_method_group(user_token, traffic):
    api = audit_api(user_token)
    matching = api.read_audit(
        service_name=vrt.ServiceName.UNIVERSAL,
        method_group=vrt.MethodGroup.PLAN,
        operation_id=PLAN_OPERATION,
    )
    assert sorted(a.tracedata.code for a in matching.actions) == sorted(traffic.codes)
    assert matching.statistics.filter.total == 3

    for filters in (
        {"service_name": vrt.ServiceName.ROUTING},
        {"method_group": vrt.MethodGroup.MATRIX},
        {"service_name": vrt.ServiceName.UNIVERSAL, "method_group": vrt.MethodGroup.TRACE},
        {"operation_id": "run_matrix_calculation"},
    ):
        none = api.read_audit(**filters)
        assert none.actions == [], filters
        assert none.statistics.filter.total == 0, filters
        assert none.statistics.overall.total >= 3, filters


def test_audit_sorts(user_token, traffic):
    api = audit_api(user_token)

    def codes(**sort):
        result = api.read_audit(service_name=vrt.ServiceName.UNIVERSAL, **sort)
        return [action.tracedata.code for action in result.actions]

    assert codes() == traffic.codes, "the default order is by time, ascending"
    assert codes(sort_field="time", sort_direction="ASC") == traffic.codes
    assert codes(sort_field="time", sort_direction="DESC") == traffic.codes[::-1]
    assert codes(sort_field="points_count", sort_direction="DESC")[0] == traffic.codes[0]
    assert codes(sort_field="points_count", sort_direction="ASC")[-1] == traffic.codes[0]
    unknown = raised(lambda: api.read_audit(sort_field="colour"))
    assert unknown.status == 400
    assert isinstance(unknown.data, vrt.General400)
    assert_account_tracedata(unknown.data.tracedata, "read_audit")


def test_audit_pages_with_offset_and_limit(user_token, traffic):
    api = audit_api(user_token)

    def page(offset, limit):
        return api.read_audit(
            service_name=vrt.ServiceName.UNIVERSAL,
            sort_field="time",
            sort_direction="ASC",
            offset=offset,
            limit=limit,
        )

    first_two = page(0, 2)
    assert [a.tracedata.code for a in first_two.actions] == traffic.codes[:2]
    assert first_two.statistics.filter.total == 3, "the total counts the whole filtered list"
    middle = page(1, 1)
    assert [a.tracedata.code for a in middle.actions] == traffic.codes[1:2]
    past_the_end = page(3, 10)
    assert past_the_end.actions == []
    assert past_the_end.statistics.filter.total == 3


def audited_codes(token, var_from, to):
    result = audit_api(token).read_audit(
        var_from=var_from, to=to, service_name=vrt.ServiceName.UNIVERSAL, limit=100
    )
    return sorted(action.tracedata.code for action in result.actions)


def test_audit_period_with_aware_datetimes(user_token, traffic):
    margin = timedelta(minutes=1)
    in_utc = (traffic.started - margin, traffic.finished + margin)
    assert audited_codes(user_token, *in_utc) == sorted(traffic.codes)
    plus_five = timezone(timedelta(hours=5))
    in_plus_five = tuple(moment.astimezone(plus_five) for moment in in_utc)
    assert audited_codes(user_token, *in_plus_five) == sorted(traffic.codes)
    the_day_before = (traffic.started - timedelta(days=2), traffic.started - timedelta(days=1))
    assert audited_codes(user_token, *the_day_before) == []


def test_audit_period_with_naive_datetimes_is_in_the_users_timezone(user_token, traffic):
    # Half an hour either side: read in UTC instead of UTC+3 this window would miss every call.
    margin = timedelta(minutes=30)
    wall_clock_from = traffic.started.astimezone(USER_TZ).replace(tzinfo=None) - margin
    wall_clock_to = traffic.finished.astimezone(USER_TZ).replace(tzinfo=None) + margin
    assert audited_codes(user_token, wall_clock_from, wall_clock_to) == sorted(traffic.codes)


# --- captured data ----------------------------------------------------------------------------


def test_data_input_is_the_bytes_sent(user_token, traffic):
    api = vrt.DataApi(client(user_token))
    plan = traffic.calls[0]
    assert bytes(api.read_data(plan.tracecode)) == plan.sent_body
    explicit = api.read_data(
        plan.tracecode,
        data_flow_type=vrt.FlowType.INPUT,
        data_flow_stage=0,
        data_flow_convert=vrt.FlowConvert.ORIGIN,
    )
    assert bytes(explicit) == plan.sent_body


def test_data_output_is_the_bytes_received(user_token, traffic):
    api = vrt.DataApi(client(user_token))
    for call in traffic.calls:
        output = api.read_data(call.tracecode, data_flow_type=vrt.FlowType.OUTPUT, data_flow_stage=0)
        assert bytes(output) == call.received_body


def test_data_json_convert_gives_the_document(user_token, traffic):
    plan = traffic.calls[0]
    converted = vrt.DataApi(client(user_token)).read_data(
        plan.tracecode, data_flow_type=vrt.FlowType.INPUT, data_flow_convert=vrt.FlowConvert.JSON
    )
    assert json.loads(bytes(converted)) == json.loads(plan.sent_body)


def test_data_of_an_unknown_tracecode_is_404(user_token):
    unknown = str(uuid.uuid4())
    error = raised(lambda: vrt.DataApi(client(user_token)).read_data(unknown))
    assert error.status == 404
    assert isinstance(error, NotFoundException)
    assert isinstance(error.data, vrt.General404)
    assert error.data.resource_id == unknown
    assert error.data.detail is not None, "a 404 carries detail.tracedata"
    assert_account_tracedata(error.data.detail.tracedata, "read_data")


def test_data_of_a_malformed_tracecode_is_400(user_token):
    error = raised(lambda: vrt.DataApi(client(user_token)).read_data("not-a-uuid"))
    assert error.status == 400
    assert isinstance(error.data, vrt.General400)
    assert_account_tracedata(error.data.tracedata, "read_data")


# --- errors -----------------------------------------------------------------------------------


def test_bad_password_is_401_with_complete_tracedata():
    error = raised(lambda: login(USER, "definitely-not-the-password"))
    assert error.status == 401
    assert isinstance(error, UnauthorizedException)
    body = json.loads(error.body)
    assert set(body["tracedata"]) >= {"code", "client", "server", "service", "operation", "time"}
    assert isinstance(body.get("message"), str) and body["message"]
    parsed = vrt.General401.from_json(error.body)
    assert parsed == error.data, "the client itself must accept the error body"
    assert_account_tracedata(parsed.tracedata, "run_token_generation")
    assert parsed.tracedata.client.endswith(USER), "the client field names the username tried"
    assert "definitely-not-the-password" not in error.body


def test_missing_token_is_401_for_anonymous():
    error = raised(lambda: vrt.InfoApi(client()).read_info())
    assert error.status == 401
    assert isinstance(error.data, vrt.General401)
    assert_account_tracedata(error.data.tracedata, "read_info")
    assert error.data.tracedata.client == "anonymous"


def test_garbage_token_is_401():
    error = raised(lambda: vrt.QuotasApi(client("garbage.not-a.jwt")).read_quota())
    assert error.status == 401
    assert isinstance(error.data, vrt.General401)
    assert_account_tracedata(error.data.tracedata, "read_quota")
