#!/usr/bin/env bash
# Instructions per proxied call, counted by valgrind's callgrind: Tollgate's own CPU work per
# pass-through call (every thread of the process, the kernel not included), the same count
# on every run of the same binary however busy the machine is. For A/B of a change where the
# load bench's requests per second drown in the machine's noise.
#
#   benches/load/instructions.sh [BINARY...]      # default: target/production/tollgate
#   MODE=metered benches/load/instructions.sh OLD NEW
#
# Per binary: starts an nginx upstream (`return 200 "ok"`) and the binary under callgrind with
# the load bench's config for MODE (configs.sh: `passthrough`, no token, no points, no
# capture, each call audited; `metered`, token, points of /locations unique by /id, a quota,
# audit, no capture; `full`, metered with capture),
# warms it with WARMUP calls, zeroes the counters, sends CALLS GET and CALLS POST (the load
# bench's ~10 KB JSON body) one after another on one keep-alive connection, and prints the
# instructions counted per call. Settings: MODE (passthrough), CALLS (3000), WARMUP (500),
# PORT_BASE (18600), KEEP_DIR (keeps each run's callgrind files there, for callgrind_annotate).
set -euo pipefail
# A failed call inside $(count ...) must stop the script, not print a count of nothing.
shopt -s inherit_errexit

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
MODE=${MODE:-passthrough}
CALLS=${CALLS:-3000}
WARMUP=${WARMUP:-500}
PORT_BASE=${PORT_BASE:-18600}
UP_PORT=$PORT_BASE
TG_PORT=$((PORT_BASE + 1))
METRICS_PORT=$((PORT_BASE + 2))
BENCH_USERNAME=${BENCH_USERNAME:-bench_user}
BENCH_PASSWORD=${BENCH_PASSWORD:-bench-password-0123456789}
BINARIES=("$@")
die() {
    echo "$*" >&2
    exit 1
}
# The load bench's Tollgate config and upstream (tollgate_config, write_nginx_upstream_conf).
# shellcheck source=configs.sh
source "$SCRIPT_DIR/configs.sh"
[ ${#BINARIES[@]} -gt 0 ] || BINARIES=("$REPO_ROOT/target/production/tollgate")

for tool in valgrind callgrind_control nginx python3 curl; do
    command -v "$tool" >/dev/null || {
        echo "needs $tool (apt-get install valgrind nginx-light curl)" >&2
        exit 1
    }
done

TMP=$(mktemp -d /tmp/tollgate-instructions.XXXXXX)
PIDS=()
cleanup() {
    # The Tollgate of an interrupted count() (a subshell, so not in PIDS).
    if [ -f "$TMP/tollgate.pid" ]; then kill "$(cat "$TMP/tollgate.pid")" 2>/dev/null || true; fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

for port in "$UP_PORT" "$TG_PORT" "$METRICS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is in use (another run?): set PORT_BASE"
    fi
done
write_nginx_upstream_conf "$TMP/up" "$UP_PORT"
nginx -c "$TMP/up/nginx.conf" -p "$TMP/up" &
PIDS+=($!)

# The load bench's POST body, byte for byte (configs.sh).
write_body "$TMP/body.json"

cat >"$TMP/client.py" <<'PY'
import socket, sys
port, n, kind, body_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
token = sys.argv[5].encode() if len(sys.argv) > 5 and sys.argv[5] else b""
auth = b"Authorization: Bearer " + token + b"\r\n" if token else b""
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if kind == "get":
    req = b"GET /bench/get HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"\r\n"
else:
    body = open(body_path, "rb").read()
    req = (b"POST /bench/post HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           + auth + b"Content-Length: %d\r\n\r\n" % len(body)) + body
buf = b""
for _ in range(n):
    s.sendall(req)
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].lower()
            if not head.startswith(b"http/1.1 200"):
                sys.exit("answered: %r" % head[:80])
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            if len(buf) >= end + 4 + length:
                buf = buf[end + 4 + length:]
                break
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed")
        buf += chunk
PY

count() { # binary kind -> instructions per call
    local bin=$1 kind=$2 dir="$TMP/run-$RANDOM" pid total
    mkdir -p "$dir"
    tollgate_config "$MODE" "$TG_PORT" "$METRICS_PORT" "$UP_PORT" "$dir" >"$dir/tollgate.toml"
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.%p" \
        "$bin" serve --config "$dir/tollgate.toml" >"$dir/log" 2>&1 &
    pid=$!
    echo "$pid" >"$TMP/tollgate.pid"
    for _ in $(seq 200); do
        curl -s -o /dev/null "http://127.0.0.1:$TG_PORT/account/system/version" && break
        sleep 0.2
    done
    local token=""
    if [ "$MODE" != passthrough ]; then
        token=$(curl -s -H 'content-type: application/json' \
            -d "{\"username\":\"$BENCH_USERNAME\",\"password\":\"$BENCH_PASSWORD\",\"ttl_seconds\":3600}" \
            "http://127.0.0.1:$TG_PORT/account/token/generation" | tr -d '"')
    fi
    kill -0 "$pid" 2>/dev/null || die "tollgate did not start: $(tail -3 "$dir/log")"
    python3 "$TMP/client.py" "$TG_PORT" "$WARMUP" "$kind" "$TMP/body.json" "$token"
    callgrind_control -z "$pid" >/dev/null 2>&1
    python3 "$TMP/client.py" "$TG_PORT" "$CALLS" "$kind" "$TMP/body.json" "$token"
    # The store writer's batch for these calls is counted too.
    sleep 1
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 0.5
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    if [ -n "${KEEP_DIR:-}" ]; then
        mkdir -p "$KEEP_DIR"
        cp "$dir"/cg."$pid".[0-9]* "$KEEP_DIR/$(basename "$bin")-$MODE-$kind.callgrind"
    fi
    total=0
    for f in "$dir"/cg."$pid".[0-9]*; do
        total=$((total + $(awk '/^(summary|totals):/ {print $2; exit}' "$f")))
    done
    echo $((total / CALLS))
}

echo "mode: $MODE, $CALLS calls per kind after $WARMUP unmeasured"
printf '%-50s %14s %14s\n' binary "GET instr/call" "POST instr/call"
for bin in "${BINARIES[@]}"; do
    get=$(count "$bin" get)
    post=$(count "$bin" post)
    printf '%-50s %14s %14s\n' "$bin" "$get" "$post"
done
