#!/usr/bin/env bash
# Upload bench: the time of one large POST (default ~10 MB of JSON, 100k locations) sent through
# Tollgate against the same upload sent straight to the upstream, in alternating rounds in one
# run. The upstream is Tollgate's demo upstream (`tollgate demo-upstream`, its own process),
# whose plan calculation parses the body and counts its arrays, as a computation service would.
#
# Two Tollgate configurations are measured, each its own process and store: "full" (token,
# points over /locations unique by /key, quota admission, capture and audit) and "passthrough"
# (no token, no points, no capture; audit still on). Time = curl's time_total for the whole
# exchange, median of ROUNDS after one unrecorded warm-up round.
#
# Settings (environment): ROUNDS=15 LOCATIONS=100000 NICE=0 (as root, -20 keeps other work on
#   the machine from disturbing the figures) TOLLGATE_BIN (default target/production/tollgate,
#   then target/release/tollgate)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
ROUNDS=${ROUNDS:-15}
LOCATIONS=${LOCATIONS:-100000}
NICE=${NICE:-0}
BIN=${TOLLGATE_BIN:-}
if [ -z "$BIN" ]; then
    for b in "$REPO_ROOT/target/production/tollgate" "$REPO_ROOT/target/release/tollgate"; do
        if [ -x "$b" ]; then BIN=$b; break; fi
    done
fi
[ -n "$BIN" ] || { echo "build first: cargo build --profile production --bin tollgate" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
[ "$NICE" = 0 ] || renice -n "$NICE" $$ >/dev/null

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ~100 bytes per location, as in the load bench's body.
python3 - "$LOCATIONS" >"$TMP/body.json" <<'PY'
import json, sys
n = int(sys.argv[1])
locations = [
    {"key": f"loc-{i:08d}", "latlon": [55.0 + i * 1e-6, 37.0 + i * 1e-6],
     "duration": 300, "comment": "unloading dock"}
    for i in range(n)
]
sys.stdout.write(json.dumps({"locations": locations}))
PY
BYTES=$(stat -c %s "$TMP/body.json")

tollgate_config() { # mode port
    local mode=$1 port=$2 rule
    if [ "$mode" = full ]; then
        rule=$'auth = true\ncapture = true\npoints = ["/locations"]\nunique_key = "/key"'
    else
        rule=$'auth = false\ncapture = false'
    fi
    cat <<TOML
[server]
listen = "127.0.0.1:$port"
name = "upload-bench-$mode"
grace_period_seconds = 0
shutdown_timeout_seconds = 1

[metrics]
listen = "127.0.0.1:$(free_port)"

[store]
path = "$TMP/store-$mode"

[limits]
max_body_bytes = $((BYTES + 1048576))

[auth]
secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

[[users]]
username = "uploader"
password = "upload-password-0123"
company_key = "bench"
roles = ["USER"]

[[upstreams]]
name = "demo"
address = "127.0.0.1:$UP"
total_timeout_ms = 60000

[[routes]]
method = "POST"
path = "/universal/plan/calculation"
upstream = "demo"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "run_plan_calculation"
$rule
TOML
}

UP=$(free_port)
"$BIN" demo-upstream --listen "127.0.0.1:$UP" >"$TMP/demo.log" 2>&1 &
PIDS+=($!)
declare -A PORT
for mode in full passthrough; do
    PORT[$mode]=$(free_port)
    tollgate_config "$mode" "${PORT[$mode]}" >"$TMP/$mode.toml"
    "$BIN" serve --config "$TMP/$mode.toml" >"$TMP/$mode.log" 2>&1 &
    PIDS+=($!)
done
for url in "http://127.0.0.1:$UP/universal/system/version" \
    "http://127.0.0.1:${PORT[full]}/account/system/version" \
    "http://127.0.0.1:${PORT[passthrough]}/account/system/version"; do
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$url" && break
        sleep 0.1
    done
done
TOKEN=$(curl -s -H 'content-type: application/json' \
    -d '{"username":"uploader","password":"upload-password-0123","ttl_seconds":3600}' \
    "http://127.0.0.1:${PORT[full]}/account/token/generation" | tr -d '"')

upload() { # url [curl options...] -> "status seconds"
    local url=$1
    shift
    curl -s -o "$TMP/answer" -w '%{http_code} %{time_total}\n' \
        -H 'content-type: application/json' "$@" --data-binary @"$TMP/body.json" "$url"
}

declare -A TIMES
targets=(direct passthrough full)
for round in $(seq 0 "$ROUNDS"); do
    for t in "${targets[@]}"; do
        case $t in
            direct) out=$(upload "http://127.0.0.1:$UP/universal/plan/calculation") ;;
            passthrough) out=$(upload "http://127.0.0.1:${PORT[passthrough]}/universal/plan/calculation") ;;
            full) out=$(upload "http://127.0.0.1:${PORT[full]}/universal/plan/calculation" \
                -H "authorization: Bearer $TOKEN") ;;
        esac
        status=${out% *}
        if [ "$status" != 200 ]; then
            echo "$t answered $status: $(head -c 300 "$TMP/answer")" >&2
            exit 1
        fi
        [ "$round" = 0 ] || TIMES[$t]+="${out#* } "
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
direct=$(echo "${TIMES[direct]}" | median)
printf 'POST of %s bytes (%s locations), %s rounds, binary %s\n' \
    "$BYTES" "$LOCATIONS" "$ROUNDS" "$BIN"
# "x direct" divides the medians; "x direct per round" is the median of each round's own ratio
# (the targets of a round run back to back), which drifts less with the machine's other load.
printf '%-12s %10s %10s %10s %20s\n' target "median ms" "min ms" "x direct" "x direct per round"
for t in "${targets[@]}"; do
    m=$(echo "${TIMES[$t]}" | median)
    low=$(echo "${TIMES[$t]}" | tr ' ' '\n' | grep -v '^$' | sort -g | head -1)
    per_round=$(awk -v a="${TIMES[$t]}" -v b="${TIMES[direct]}" \
        'BEGIN { n = split(a, x, " "); split(b, y, " "); for (i = 1; i <= n; i++) print x[i] / y[i] }' |
        median)
    awk -v t="$t" -v m="$m" -v l="$low" -v d="$direct" -v r="$per_round" \
        'BEGIN { printf "%-12s %10.1f %10.1f %10.2f %20.2f\n", t, m * 1000, l * 1000, m / d, r }'
done
