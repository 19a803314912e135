#!/usr/bin/env bash
# Client conformance run: starts the real Tollgate binary on loopback ports with a fresh store
# and drives its account API with the official generated client (vrt-lss-account 6.20.2258).
#
#   tests/conformance/run.sh [pytest args...]
#
# Environment:
#   TOLLGATE_BIN       binary to run (default: target/release/tollgate under the repo root)
#   CONFORMANCE_VENV   reuse this venv instead of a throwaway one (created if missing)
#   KEEP_WORK=1        keep the temp dir (config, store, tollgate.log) after the run
# Exits with pytest's status (2 when the run could not be set up).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TOLLGATE_BIN="${TOLLGATE_BIN:-$ROOT/target/release/tollgate}"
CLIENT_VERSION="6.20.2258"
READY_TIMEOUT_SECONDS=30
STOP_TIMEOUT_SECONDS=10

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-conformance.XXXXXX")"
TOLLGATE_PID=""
PYTEST_PID=""

say() { printf 'conformance: %s\n' "$*" >&2; }

stop_tollgate() {
  local status=$?
  if [[ -n "$PYTEST_PID" ]]; then
    kill -TERM "$PYTEST_PID" 2>/dev/null || true
    wait "$PYTEST_PID" 2>/dev/null || true
  fi
  if [[ -n "$TOLLGATE_PID" ]] && kill -0 "$TOLLGATE_PID" 2>/dev/null; then
    kill -TERM "$TOLLGATE_PID" 2>/dev/null || true
    local waited_tenths=0
    while kill -0 "$TOLLGATE_PID" 2>/dev/null && ((waited_tenths < STOP_TIMEOUT_SECONDS * 10)); do
      sleep 0.1
      waited_tenths=$((waited_tenths + 1))
    done
    if kill -0 "$TOLLGATE_PID" 2>/dev/null; then
      say "tollgate (pid $TOLLGATE_PID) ignored SIGTERM for ${STOP_TIMEOUT_SECONDS}s; killing it"
      kill -KILL "$TOLLGATE_PID" 2>/dev/null || true
    fi
    wait "$TOLLGATE_PID" 2>/dev/null || true
  fi
  if ((status != 0)) && [[ -s "$WORK/tollgate.log" ]]; then
    say "last lines of tollgate.log:"
    tail -n 40 "$WORK/tollgate.log" >&2 || true
  fi
  if [[ "${KEEP_WORK:-0}" == "1" ]]; then
    say "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap stop_tollgate EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ ! -x "$TOLLGATE_BIN" ]]; then
  say "no executable at $TOLLGATE_BIN (build it with 'cargo build --release' or set TOLLGATE_BIN)"
  exit 2
fi

# --- client environment -------------------------------------------------------------------
VENV="${CONFORMANCE_VENV:-$WORK/venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "vrt-lss-account==$CLIENT_VERSION" pytest openpyxl
# Fail early, with a clear message, if the installed client is not the one the tests are for.
"$VENV/bin/python" - "$CLIENT_VERSION" <<'EOF'
import sys
import vrt_lss_account as v
if v.__version__ != sys.argv[1]:
    sys.exit(f"vrt_lss_account {v.__version__} installed, {sys.argv[1]} expected")
for api in ("AuthApi", "InfoApi", "SystemApi", "QuotasApi", "StatisticsApi", "AuditApi", "DataApi"):
    getattr(v, api)
EOF

# --- Tollgate ---------------------------------------------------------------------------------
# Three distinct free loopback ports, picked while all three sockets are held.
read -r LISTEN_PORT METRICS_PORT DEMO_PORT < <("$VENV/bin/python" - <<'EOF'
import socket
held = [socket.socket() for _ in range(3)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))
for s in held:
    s.close()
EOF
)
LISTEN="127.0.0.1:$LISTEN_PORT"
STORE="$WORK/store"
mkdir -m 700 "$STORE"
CONFIG="$WORK/tollgate.toml"
sed -e "s|@LISTEN@|$LISTEN|g" \
    -e "s|@METRICS@|127.0.0.1:$METRICS_PORT|g" \
    -e "s|@DEMO@|127.0.0.1:$DEMO_PORT|g" \
    -e "s|@STORE@|$STORE|g" \
    "$HERE/tollgate.toml" >"$CONFIG"

"$TOLLGATE_BIN" serve --config "$CONFIG" >"$WORK/tollgate.log" 2>&1 &
TOLLGATE_PID=$!
say "tollgate pid $TOLLGATE_PID listening on $LISTEN (log: $WORK/tollgate.log)"

BASE_URL="http://$LISTEN"
ready_deadline=$((SECONDS + READY_TIMEOUT_SECONDS))
until curl -fsS -o /dev/null --max-time 2 "$BASE_URL/account/system/version" 2>/dev/null; do
  if ! kill -0 "$TOLLGATE_PID" 2>/dev/null; then
    say "tollgate exited before answering GET /account/system/version"
    exit 2
  fi
  if ((SECONDS >= ready_deadline)); then
    say "tollgate did not answer GET /account/system/version within ${READY_TIMEOUT_SECONDS}s"
    exit 2
  fi
  sleep 0.2
done

# --- the tests ----------------------------------------------------------------------------------
export TOLLGATE_URL="$BASE_URL"
export TOLLGATE_SERVER_NAME="conformance"
export TOLLGATE_COMPANY="acme"
export TOLLGATE_USER="alice" TOLLGATE_USER_PASSWORD="alice-password-1" TOLLGATE_USER_TIMEZONE="3"
export TOLLGATE_ADMIN="root_admin" TOLLGATE_ADMIN_PASSWORD="admin-password-1"
export TOLLGATE_PASSWORD_USER="bob" TOLLGATE_PASSWORD_USER_PASSWORD="bob-password-1"
export TOLLGATE_PROFILE_USER="carol" TOLLGATE_PROFILE_USER_PASSWORD="carol-password-1"
# Keep pytest's cache and bytecode out of the repository.
export PYTHONDONTWRITEBYTECODE=1

# In the background so that a signal to this script is handled at once, not after the tests.
(cd "$HERE" && exec "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfE test_client.py "$@") &
PYTEST_PID=$!
pytest_status=0
wait "$PYTEST_PID" || pytest_status=$?
PYTEST_PID=""
exit "$pytest_status"
