#!/usr/bin/env bash
# Load bench: Tollgate against nginx as reverse proxies in front of the same fast upstream, on
# one machine, in one run. See README.md beside this file for what it measures and how to read it.
#
# Settings (environment):
#   DURATION=10 CONNECTIONS=32 ROUNDS=3 WARMUP=2 SETTLE_SECONDS=1 WRK_THREADS=1
#   MODES="passthrough"        Tollgate config variants to measure: passthrough, full, metered (full without capture)
#   PROXY_CPU=0 LOAD_CPU=1     CPU of the proxy under test / of the upstream and wrk
#   NICE=0                     nice level of everything the bench starts, and of its scheduler
#                              autogroup while it runs (-20 as root on a busy machine, so other
#                              work disturbs the figures less; see README.md)
#   LOCATIONS=100              objects in the POST body (~100 bytes each, ~10 KB in all)
#   TOLLGATE_BIN=...           default target/production/tollgate, then target/release/tollgate
#   SKIP_TOLLGATE=1            measure nginx and direct only
#   NO_BUILD=1                 fail instead of building Tollgate when its binary is missing
#   LOGIN_BURST=1 LOGIN_RATE=10  also measure passthrough GET under a login burst (logins/second)
#   PERF=1                     also record a perf profile of each proxy (extra, unmeasured runs)
#   RESULTS_DIR=benches/load   where results-<date>.md goes
#   KEEP_TMP=1                 keep the temp dir (configs, logs, raw wrk output)
#   BENCH_USERNAME BENCH_PASSWORD  the bench account written into the configs (letters,
#                              digits, '_' and '-'; defaults in the script)
#   BUILD_TIMEOUT_SECONDS=1800 the limit on building Tollgate when its binary is missing
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
SETTLE_SECONDS=${SETTLE_SECONDS:-1}
WRK_THREADS=${WRK_THREADS:-1}
MODES=${MODES:-passthrough}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
NICE=${NICE:-0}
LOCATIONS=${LOCATIONS:-100}
SKIP_TOLLGATE=${SKIP_TOLLGATE:-0}
NO_BUILD=${NO_BUILD:-0}
BUILD_TIMEOUT_SECONDS=${BUILD_TIMEOUT_SECONDS:-1800}
LOGIN_BURST=${LOGIN_BURST:-0}
LOGIN_RATE=${LOGIN_RATE:-10}
PERF=${PERF:-0}
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR}
KEEP_TMP=${KEEP_TMP:-0}
BENCH_USERNAME=${BENCH_USERNAME:-bench_user}
BENCH_PASSWORD=${BENCH_PASSWORD:-bench-password-0123456789}

BENCH_TMP=""
AUTOGROUP_NICE_BEFORE=""
PIDS=()
LAST_PID=""
CLK_TCK=""

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    printf '[bench] ERROR: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local status=$? pid waited
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Tollgate may sit in a shutdown grace period: give it a moment, then kill.
        waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 30 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    if [ -n "$AUTOGROUP_NICE_BEFORE" ]; then
        echo "$AUTOGROUP_NICE_BEFORE" >/proc/self/autogroup 2>/dev/null || true
    fi
    if [ -n "$BENCH_TMP" ] && [ -d "$BENCH_TMP" ]; then
        # A failure keeps the evidence; an interrupt does not.
        if [ "$KEEP_TMP" = 1 ] || { [ "$status" -ne 0 ] && [ "$status" -ne 130 ] && [ "$status" -ne 143 ]; }; then
            log "kept temp dir $BENCH_TMP (configs, logs, raw wrk output)"
        else
            rm -rf "$BENCH_TMP"
        fi
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

# ---------------------------------------------------------------------------------------------
# Tollgate: the two functions to adjust when its config format or command line changes.
# ---------------------------------------------------------------------------------------------

# tollgate_config MODE LISTEN_PORT METRICS_PORT UPSTREAM_PORT DIR, write_nginx_conf and
# write_nginx_upstream_conf DIR PORT: in configs.sh, shared with instructions.sh.
# shellcheck source=configs.sh
source "$SCRIPT_DIR/configs.sh"

# tollgate_command CONFIG_FILE: sets TOLLGATE_CMD to the command line that serves CONFIG_FILE.
tollgate_command() {
    TOLLGATE_CMD=("$TOLLGATE_BIN" serve --config "$1")
}

# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------

check_settings() {
    local name value
    for name in DURATION CONNECTIONS ROUNDS WRK_THREADS LOCATIONS LOGIN_RATE BUILD_TIMEOUT_SECONDS; do
        value=${!name}
        [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer (got '$value')"
    done
    for name in WARMUP SETTLE_SECONDS PROXY_CPU LOAD_CPU; do
        value=${!name}
        [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be a non-negative integer (got '$value')"
    done
    [[ "$NICE" =~ ^-?[0-9]+$ ]] && [ "$NICE" -ge -20 ] && [ "$NICE" -le 19 ] || die "NICE must be -20..19 (got '$NICE')"
    [ "$NICE" -ge 0 ] || [ "$(id -u)" -eq 0 ] || die "NICE=$NICE below 0 needs root"
    [ "$PROXY_CPU" != "$LOAD_CPU" ] || die "PROXY_CPU and LOAD_CPU must differ (both $PROXY_CPU)"
    local cpus
    cpus=$(nproc --all)
    [ "$PROXY_CPU" -lt "$cpus" ] && [ "$LOAD_CPU" -lt "$cpus" ] ||
        die "this machine has $cpus CPUs; PROXY_CPU=$PROXY_CPU and LOAD_CPU=$LOAD_CPU must be below that"
    local mode
    for mode in $MODES; do
        case "$mode" in passthrough | full | metered) ;; *) die "MODES: unknown mode '$mode' (known: passthrough full metered)" ;; esac
    done
    [[ "$BENCH_USERNAME" =~ ^[A-Za-z0-9_]{2,256}$ ]] || die "BENCH_USERNAME must match \\w{2,256}"
    [[ "$BENCH_PASSWORD" =~ ^[A-Za-z0-9_.-]{1,1000}$ ]] ||
        die "BENCH_PASSWORD: use letters, digits, '_', '.', '-' only (it is pasted into JSON and TOML)"
}

# Installs what is missing; the system nginx config is never read or changed.
ensure_tools() {
    local missing=() packages=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v wrk >/dev/null || packages+=(wrk)
    command -v curl >/dev/null || packages+=(curl)
    command -v taskset >/dev/null || packages+=(util-linux)
    if [ "$PERF" = 1 ]; then command -v perf >/dev/null || packages+=(linux-perf); fi
    [ "${#missing[@]}" -eq 0 ] && [ "${#packages[@]}" -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "missing ${missing[*]} ${packages[*]} and not root: install them first"
        sudo=sudo
    fi
    log "installing: ${missing[*]} ${packages[*]}"
    $sudo apt-get update -qq
    if [ "${#packages[@]}" -gt 0 ]; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light ||
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
    fi
    command -v nginx >/dev/null && command -v wrk >/dev/null && command -v curl >/dev/null ||
        die "installation did not provide nginx, wrk and curl"
}

# With autogroup scheduling on, nice only ranks processes within one session; competing with
# other sessions (builds started elsewhere) needs the session's autogroup niced too. Restored
# on exit, since the session outlives the script.
apply_nice() {
    [ "$NICE" != 0 ] || return 0
    if [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo 0)" = 1 ] && [ -w /proc/self/autogroup ]; then
        AUTOGROUP_NICE_BEFORE=$(sed -n 's/.* nice //p' /proc/self/autogroup)
        echo "$NICE" >/proc/self/autogroup || die "could not set the autogroup nice to $NICE"
        log "session autogroup nice $AUTOGROUP_NICE_BEFORE -> $NICE for the run"
    fi
}

# Sets TOLLGATE_BIN, or clears it when Tollgate is skipped.
resolve_tollgate() {
    if [ "$SKIP_TOLLGATE" = 1 ]; then
        log "SKIP_TOLLGATE=1: Tollgate is not measured (nginx and direct only)"
        TOLLGATE_BIN=""
        return 0
    fi
    if [ -n "${TOLLGATE_BIN:-}" ]; then
        [ -x "$TOLLGATE_BIN" ] || die "TOLLGATE_BIN=$TOLLGATE_BIN is not an executable file (unset it to use target/, or set SKIP_TOLLGATE=1)"
    elif [ -x "$REPO_ROOT/target/production/tollgate" ]; then
        TOLLGATE_BIN="$REPO_ROOT/target/production/tollgate"
    elif [ -x "$REPO_ROOT/target/release/tollgate" ]; then
        TOLLGATE_BIN="$REPO_ROOT/target/release/tollgate"
        log "using a release build; target/production/tollgate (fat LTO) is what the figures should come from"
    else
        [ "$NO_BUILD" != 1 ] ||
            die "no Tollgate binary (target/production/tollgate, target/release/tollgate) and NO_BUILD=1; set TOLLGATE_BIN, build it, or set SKIP_TOLLGATE=1"
        command -v cargo >/dev/null || die "no Tollgate binary and no cargo to build it; set TOLLGATE_BIN or SKIP_TOLLGATE=1"
        log "no Tollgate binary: cargo build --profile production (several minutes; at most ${BUILD_TIMEOUT_SECONDS}s)"
        (cd "$REPO_ROOT" && timeout --foreground "$BUILD_TIMEOUT_SECONDS" cargo build --profile production --bin tollgate) ||
            die "cargo build --profile production failed; fix the build or set SKIP_TOLLGATE=1"
        TOLLGATE_BIN="$REPO_ROOT/target/production/tollgate"
        [ -x "$TOLLGATE_BIN" ] || die "the build finished but $TOLLGATE_BIN is missing"
    fi
    if [ -d "$REPO_ROOT/src" ] && [ -n "$(find "$REPO_ROOT/src" -name '*.rs' -newer "$TOLLGATE_BIN" -print -quit)" ]; then
        log "WARNING: $TOLLGATE_BIN is older than some of src/: the figures may not match the code"
    fi
}

# Picks a free loopback port, never one already handed out in this run.
USED_PORTS=" "
pick_port() {
    local port tries=0
    while [ "$tries" -lt 200 ]; do
        port=$((20000 + RANDOM % 40000))
        tries=$((tries + 1))
        case "$USED_PORTS" in *" $port "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            USED_PORTS="$USED_PORTS$port "
            PICKED_PORT=$port
            return 0
        fi
    done
    die "found no free loopback port"
}

# start_pinned CPU LOGFILE CMD...: starts CMD pinned to CPU in the background; sets LAST_PID.
start_pinned() {
    local cpu=$1 logfile=$2
    shift 2
    nice -n "$NICE" taskset -c "$cpu" "$@" >"$logfile" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_listening NAME PID URL TIMEOUT_SECONDS LOGFILE: until URL answers any HTTP status.
wait_listening() {
    local name=$1 pid=$2 url=$3 timeout_seconds=$4 logfile=$5 deadline code
    deadline=$((SECONDS + timeout_seconds))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logfile" >&2 || true
            die "$name exited during startup (log above: $logfile)"
        fi
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        if [ -n "$code" ] && [ "$code" != 000 ]; then return 0; fi
        sleep 0.2
    done
    tail -n 20 "$logfile" >&2 || true
    die "$name did not answer on $url within ${timeout_seconds}s (log above: $logfile)"
}

# check_answer NAME BASE_URL [CURL_ARGS...]: GET and POST must reach the upstream (200, "ok").
check_answer() {
    local name=$1 base=$2 kind code body
    shift 2
    for kind in get post; do
        if [ "$kind" = get ]; then
            code=$(curl -s -o "$BENCH_TMP/answer" -w '%{http_code}' --max-time 5 "$@" "$base/bench/get" || true)
        else
            code=$(curl -s -o "$BENCH_TMP/answer" -w '%{http_code}' --max-time 5 "$@" \
                -H 'Content-Type: application/json' --data-binary "@$BENCH_TMP/body.json" "$base/bench/post" || true)
        fi
        body=$(head -c 200 "$BENCH_TMP/answer" 2>/dev/null || true)
        [ "$code" = 200 ] && [ "$body" = ok ] ||
            die "$name: ${kind^^} $base/bench/$kind answered $code '$body', expected 200 'ok' from the upstream"
    done
}

write_nginx_proxy_conf() {
    local dir=$1 port=$2 upstream_port=$3
    write_nginx_conf "$dir" "nginx as the reference reverse proxy: one worker, pooled keep-alive upstream connections." <<EOF
    upstream bench_upstream {
        server 127.0.0.1:$upstream_port;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
EOF
}

# wrk scripts: done() prints one machine-readable RESULT line with exact percentiles.
write_wrk_scripts() {
    local done_fn
    done_fn='function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50.0), latency:percentile(99.0),
    e.connect, e.read, e.write, e.status, e.timeout))
end'
    printf '%s\n' "$done_fn" >"$BENCH_TMP/get.lua"
    cat >"$BENCH_TMP/post.lua" <<EOF
local f = assert(io.open("$BENCH_TMP/body.json", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
$done_fn
EOF
    local interval_ms=$((1000 / LOGIN_RATE))
    cat >"$BENCH_TMP/login.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"username":"$BENCH_USERNAME","password":"$BENCH_PASSWORD","ttl_seconds":3600}'
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
ok, throttled, other = 0, 0, 0
function delay() return $interval_ms end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 429 then throttled = throttled + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local o, t, x = 0, 0, 0
  for _, th in ipairs(threads) do o = o + th:get("ok"); t = t + th:get("throttled"); x = x + th:get("other") end
  io.write(string.format("LOGIN requests=%d duration_us=%d ok=%d throttled=%d other=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, o, t, x, latency:percentile(50.0), latency:percentile(99.0)))
end
EOF
}

# CPU ticks (utime + stime, all threads) of PID; fields counted after the ')' closing comm.
cpu_ticks() {
    local stat
    stat=$(cat "/proc/$1/stat") || die "process $1 is gone (did the proxy crash? see $BENCH_TMP)"
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<<"$stat"
}

# ---------------------------------------------------------------------------------------------
# Targets: direct (the upstream itself), nginx, tollgate-<mode>
# ---------------------------------------------------------------------------------------------

declare -A TARGET_URL TARGET_PID TARGET_LABEL TARGET_AUTH
TARGETS=()
UPSTREAM_PORT=""

start_upstream() {
    pick_port
    UPSTREAM_PORT=$PICKED_PORT
    local dir="$BENCH_TMP/upstream"
    write_nginx_upstream_conf "$dir" "$UPSTREAM_PORT"
    start_pinned "$LOAD_CPU" "$dir/stdout.log" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    wait_listening "upstream nginx" "$LAST_PID" "http://127.0.0.1:$UPSTREAM_PORT/" 10 "$dir/error.log"
    TARGETS+=(direct)
    TARGET_URL[direct]="http://127.0.0.1:$UPSTREAM_PORT"
    TARGET_PID[direct]=$LAST_PID
    TARGET_LABEL[direct]="direct (no proxy)"
    TARGET_AUTH[direct]=""
}

start_nginx_proxy() {
    pick_port
    local port=$PICKED_PORT dir="$BENCH_TMP/nginx-proxy"
    write_nginx_proxy_conf "$dir" "$port" "$UPSTREAM_PORT"
    start_pinned "$PROXY_CPU" "$dir/stdout.log" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    wait_listening "nginx proxy" "$LAST_PID" "http://127.0.0.1:$port/" 10 "$dir/error.log"
    TARGETS+=(nginx)
    TARGET_URL[nginx]="http://127.0.0.1:$port"
    TARGET_PID[nginx]=$LAST_PID
    TARGET_LABEL[nginx]="nginx"
    TARGET_AUTH[nginx]=""
}

# fetch_token BASE_URL: prints the bench account's JWT (the API answers a JSON string).
fetch_token() {
    local base=$1 code answer
    code=$(curl -s -o "$BENCH_TMP/token" -w '%{http_code}' --max-time 10 -H 'Content-Type: application/json' \
        --data-binary "{\"username\":\"$BENCH_USERNAME\",\"password\":\"$BENCH_PASSWORD\",\"ttl_seconds\":86400}" \
        "$base/account/token/generation" || true)
    answer=$(head -c 4096 "$BENCH_TMP/token" 2>/dev/null || true)
    [ "$code" = 200 ] || die "token generation for '$BENCH_USERNAME' answered $code '${answer:0:200}' (is the bench user in tollgate_config()?)"
    answer=${answer#\"}
    answer=${answer%\"}
    [[ "$answer" =~ ^[A-Za-z0-9_.-]+$ ]] || die "token generation answered something that is not a JSON string of a JWT: '${answer:0:200}'"
    printf '%s' "$answer"
}

start_tollgate() {
    local mode=$1 target="tollgate-$1" dir="$BENCH_TMP/tollgate-$1" port metrics_port
    pick_port
    port=$PICKED_PORT
    pick_port
    metrics_port=$PICKED_PORT
    mkdir -p "$dir"
    tollgate_config "$mode" "$port" "$metrics_port" "$UPSTREAM_PORT" "$dir" >"$dir/tollgate.toml"
    tollgate_command "$dir/tollgate.toml"
    start_pinned "$PROXY_CPU" "$dir/tollgate.log" "${TOLLGATE_CMD[@]}"
    wait_listening "Tollgate ($mode)" "$LAST_PID" "http://127.0.0.1:$port/bench/get" 60 "$dir/tollgate.log"
    TARGETS+=("$target")
    TARGET_URL[$target]="http://127.0.0.1:$port"
    TARGET_PID[$target]=$LAST_PID
    TARGET_LABEL[$target]="tollgate ($mode)"
    TARGET_AUTH[$target]=""
    if [ "$mode" != passthrough ]; then
        TARGET_AUTH[$target]="Authorization: Bearer $(fetch_token "http://127.0.0.1:$port")"
    fi
}

# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

declare -A RPS P50 P99 CPU10K BUSY ERRORS

# wrk_run TARGET KIND SECONDS OUTFILE: one wrk run from LOAD_CPU; RESULT line in OUTFILE.
wrk_run() {
    local target=$1 kind=$2 seconds=$3 out=$4 script path
    local headers=()
    [ -z "${TARGET_AUTH[$target]}" ] || headers=(-H "${TARGET_AUTH[$target]}")
    if [ "$kind" = GET ]; then
        script="$BENCH_TMP/get.lua" path=/bench/get
    else
        script="$BENCH_TMP/post.lua" path=/bench/post
    fi
    timeout --foreground -k 5 $((seconds + 30)) nice -n "$NICE" taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${seconds}s" \
        --latency --timeout 5s -s "$script" "${headers[@]}" "${TARGET_URL[$target]}$path" >"$out" 2>&1 ||
        die "wrk against $target $kind failed: $(tail -n 5 "$out")"
    grep -q '^RESULT ' "$out" || die "wrk against $target $kind printed no RESULT line: $(tail -n 5 "$out")"
}

# field NAME FILE: a key=value from the RESULT line.
field() { grep '^RESULT ' "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }

# measure TARGET KIND ROUND: one recorded run; appends its figures to the per-target lists.
measure() {
    local target=$1 kind=$2 round=$3 pid=${TARGET_PID[$1]} before after out requests duration_us errors
    out="$BENCH_TMP/wrk-$target-$kind-$round.txt"
    before=$(cpu_ticks "$pid")
    wrk_run "$target" "$kind" "$DURATION" "$out"
    # Let the proxy finish work queued by the run (batched writes) inside the measured window.
    sleep "$SETTLE_SECONDS"
    after=$(cpu_ticks "$pid")
    requests=$(field requests "$out")
    duration_us=$(field duration_us "$out")
    errors=$(($(field connect "$out") + $(field read "$out") + $(field write "$out") + $(field status "$out") + $(field timeout "$out")))
    [ "$requests" -gt 0 ] || die "$target $kind: wrk completed no request ($out)"
    local key="$target|$kind" rps cpu_seconds
    rps=$(awk -v r="$requests" -v d="$duration_us" 'BEGIN { printf "%.1f", r / (d / 1e6) }')
    cpu_seconds=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" 'BEGIN { printf "%.4f", t / hz }')
    RPS[$key]+="$rps "
    P50[$key]+="$(field p50_us "$out") "
    P99[$key]+="$(field p99_us "$out") "
    CPU10K[$key]+="$(awk -v c="$cpu_seconds" -v r="$requests" 'BEGIN { printf "%.5f", c * 10000 / r }') "
    BUSY[$key]+="$(awk -v c="$cpu_seconds" -v d="$duration_us" 'BEGIN { printf "%.1f", 100 * c / (d / 1e6) }') "
    ERRORS[$key]=$((${ERRORS[$key]:-0} + errors))
    log "round $round $(printf '%-22s' "${TARGET_LABEL[$target]}") $kind: $rps rps, p99 $(field p99_us "$out") us, CPU ${cpu_seconds}s, errors $errors"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
med() { local -n list=$1; median <<<"${list[$2]:-}"; }
ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }

# LOGIN_BURST=1: passthrough GET p99 with and without logins hammering the account API.
login_burst_compare() {
    local target=tollgate-passthrough
    if [ -z "${TARGET_PID[$target]:-}" ]; then
        log "LOGIN_BURST=1 needs Tollgate in passthrough mode (MODES contains passthrough, no SKIP_TOLLGATE): skipped"
        return 0
    fi
    local round out login_out login_pid quiet_p99="" burst_p99="" quiet_rps="" burst_rps="" login_lines=""
    log "login burst: ~$LOGIN_RATE logins/s against $target during GET rounds"
    for ((round = 1; round <= ROUNDS; round++)); do
        out="$BENCH_TMP/burst-quiet-$round.txt"
        wrk_run "$target" GET "$DURATION" "$out"
        quiet_p99+="$(field p99_us "$out") "
        quiet_rps+="$(awk -v r="$(field requests "$out")" -v d="$(field duration_us "$out")" 'BEGIN { printf "%.1f", r / (d / 1e6) }') "
        login_out="$BENCH_TMP/burst-logins-$round.txt"
        timeout --foreground -k 5 $((DURATION + 30)) nice -n "$NICE" taskset -c "$LOAD_CPU" wrk -t1 -c1 -d"${DURATION}s" --timeout 10s \
            -s "$BENCH_TMP/login.lua" "${TARGET_URL[$target]}/account/token/generation" >"$login_out" 2>&1 &
        login_pid=$!
        PIDS+=("$login_pid")
        out="$BENCH_TMP/burst-loud-$round.txt"
        wrk_run "$target" GET "$DURATION" "$out"
        wait "$login_pid" || die "the login wrk failed: $(tail -n 5 "$login_out")"
        burst_p99+="$(field p99_us "$out") "
        burst_rps+="$(awk -v r="$(field requests "$out")" -v d="$(field duration_us "$out")" 'BEGIN { printf "%.1f", r / (d / 1e6) }') "
        login_lines+="- round $round: $(grep '^LOGIN ' "$login_out" || echo "no LOGIN line: $(tail -n 2 "$login_out")")"$'\n'
    done
    LOGIN_REPORT=$(
        printf '\n## Login burst (passthrough GET, ~%s logins/s to /account/token/generation)\n\n' "$LOGIN_RATE"
        printf '| | GET rps | GET p99 ms |\n|---|---|---|\n'
        printf '| without logins | %.0f | %s |\n' "$(median <<<"$quiet_rps")" "$(ms "$(median <<<"$quiet_p99")")"
        printf '| with logins | %.0f | %s |\n\n' "$(median <<<"$burst_rps")" "$(ms "$(median <<<"$burst_p99")")"
        printf 'Logins per round (ok = 200, throttled = 429):\n%s' "$login_lines"
    )
}

# PERF=1: extra, unrecorded runs of each proxy under perf; a flat profile (top symbols) is
# written beside the results, the call-graph data stays in the temp dir (KEEP_TMP=1 to keep it).
perf_profiles() {
    local target kind data report perf_pid
    for target in "${TARGETS[@]}"; do
        [ "$target" != direct ] || continue
        for kind in GET POST; do
            data="$BENCH_TMP/perf-$target-$kind.data"
            report="$RESULTS_DIR/results-$STAMP-perf-$target-$kind.txt"
            perf record -q -F 499 -g -p "${TARGET_PID[$target]}" -o "$data" -- sleep "$DURATION" >/dev/null 2>&1 &
            perf_pid=$!
            PIDS+=("$perf_pid")
            wrk_run "$target" "$kind" "$DURATION" "$BENCH_TMP/perf-wrk-$target-$kind.txt"
            wait "$perf_pid" || { log "perf record failed for $target $kind (perf_event_paranoid?)"; continue; }
            perf report -i "$data" --stdio --no-children -g none --percent-limit 0.5 2>/dev/null |
                grep -v -e '^$' -e '^# *$' | head -n 80 >"$report" || true
            log "perf profile: $report"
        done
    done
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0 || a == "nan" || b == "nan") print "n/a"; else printf "%.2f", a / b }'; }

report() {
    local target kind
    printf '# Load bench %s\n\n' "$(date '+%Y-%m-%d %H:%M %Z')"
    printf -- '- machine: %s, %s CPUs, kernel %s; load average at start %s, at end %s\n' \
        "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" "$(nproc --all)" "$(uname -r)" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf -- '- nginx %s, %s\n' "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2)"
    if [ -n "$TOLLGATE_BIN" ]; then
        printf -- '- tollgate: %s (built %s, commit %s), modes: %s\n' "$TOLLGATE_BIN" \
            "$(date -r "$TOLLGATE_BIN" '+%Y-%m-%d %H:%M')" "$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$MODES"
    else
        printf -- '- tollgate: skipped (SKIP_TOLLGATE=1)\n'
    fi
    printf -- '- pinning: proxy under test on CPU %s (one worker thread); upstream nginx and wrk on CPU %s; nice %s\n' "$PROXY_CPU" "$LOAD_CPU" "$NICE"
    printf -- '- wrk -t%s -c%s -d%ss, %s rounds per target alternating, medians shown; POST body %s bytes of JSON (%s locations)\n' \
        "$WRK_THREADS" "$CONNECTIONS" "$DURATION" "$ROUNDS" "$(wc -c <"$BENCH_TMP/body.json")" "$LOCATIONS"
    printf -- '- CPU = utime+stime of the proxy process over its runs (the upstream nginx for "direct")\n\n'

    printf '| target | GET rps | GET p50 ms | GET p99 ms | POST rps | POST p50 ms | POST p99 ms | CPU s/10k req GET | CPU s/10k req POST | errors |\n'
    printf '|---|---|---|---|---|---|---|---|---|---|\n'
    for target in "${TARGETS[@]}"; do
        printf '| %s | %.0f | %s | %s | %.0f | %s | %s | %.3f | %.3f | %s |\n' "${TARGET_LABEL[$target]}" \
            "$(med RPS "$target|GET")" "$(ms "$(med P50 "$target|GET")")" "$(ms "$(med P99 "$target|GET")")" \
            "$(med RPS "$target|POST")" "$(ms "$(med P50 "$target|POST")")" "$(ms "$(med P99 "$target|POST")")" \
            "$(med CPU10K "$target|GET")" "$(med CPU10K "$target|POST")" \
            "$((${ERRORS[$target|GET]:-0} + ${ERRORS[$target|POST]:-0}))"
    done

    local tollgates=()
    for target in "${TARGETS[@]}"; do [[ "$target" != tollgate-* ]] || tollgates+=("$target"); done
    if [ "${#tollgates[@]}" -gt 0 ]; then
        printf '\nTollgate relative to nginx (per core: requests per CPU-second = 1 / CPU per request):\n\n'
        printf '| | rps GET | rps POST | CPU per request GET | CPU per request POST | requests per CPU-second GET | requests per CPU-second POST |\n'
        printf '|---|---|---|---|---|---|---|\n'
        for target in "${tollgates[@]}"; do
            printf '| %s / nginx | %s | %s | %s | %s | %s | %s |\n' "${TARGET_LABEL[$target]}" \
                "$(ratio "$(med RPS "$target|GET")" "$(med RPS "nginx|GET")")" \
                "$(ratio "$(med RPS "$target|POST")" "$(med RPS "nginx|POST")")" \
                "$(ratio "$(med CPU10K "$target|GET")" "$(med CPU10K "nginx|GET")")" \
                "$(ratio "$(med CPU10K "$target|POST")" "$(med CPU10K "nginx|POST")")" \
                "$(ratio "$(med CPU10K "nginx|GET")" "$(med CPU10K "$target|GET")")" \
                "$(ratio "$(med CPU10K "nginx|POST")" "$(med CPU10K "$target|POST")")"
        done
    fi

    printf '\nPer round (rps; CPU busy %% of its core, median):\n\n'
    for target in "${TARGETS[@]}"; do
        for kind in GET POST; do
            printf -- '- %s %s: %s; busy %s%%\n' "${TARGET_LABEL[$target]}" "$kind" \
                "$(tr ' ' '\n' <<<"${RPS[$target|$kind]}" | grep -v '^$' | awk '{ printf "%s%.0f", (NR > 1 ? ", " : ""), $1 }')" \
                "$(med BUSY "$target|$kind")"
        done
    done
    printf '\nReading it: "direct" is the ceiling of the load side (wrk and upstream share CPU %s in every\n' "$LOAD_CPU"
    printf 'row); a proxy near that row is limited by the load side, not by itself. A proxy near 100%% busy\n'
    printf 'is the bottleneck, and its requests per CPU-second is the per-core comparison.\n'
    printf '%s\n' "${LOGIN_REPORT:-}"
}

# ---------------------------------------------------------------------------------------------

main() {
    check_settings
    ensure_tools
    resolve_tollgate
    apply_nice
    CLK_TCK=$(getconf CLK_TCK)
    STAMP=$(date +%Y-%m-%d-%H%M)
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    mkdir -p "$RESULTS_DIR"
    BENCH_TMP=$(mktemp -d /tmp/tollgate-load.XXXXXX)
    write_body "$BENCH_TMP/body.json" "$LOCATIONS"
    write_wrk_scripts

    start_upstream
    start_nginx_proxy
    local mode
    if [ -n "$TOLLGATE_BIN" ]; then
        for mode in $MODES; do start_tollgate "$mode"; done
    fi
    local target auth
    for target in "${TARGETS[@]}"; do
        auth=()
        [ -z "${TARGET_AUTH[$target]}" ] || auth=(-H "${TARGET_AUTH[$target]}")
        check_answer "${TARGET_LABEL[$target]}" "${TARGET_URL[$target]}" "${auth[@]}"
    done

    log "pinning: proxy under test on CPU $PROXY_CPU; upstream nginx and wrk on CPU $LOAD_CPU; load average $LOAD_START"
    awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 0.5) }' &&
        log "WARNING: the machine is busy (load $LOAD_START): other work shares the pinned CPUs; as root, NICE=-20 lets the bench win over it"
    local runs=$((${#TARGETS[@]} * 2 * ROUNDS))
    log "${#TARGETS[@]} targets x GET/POST x $ROUNDS rounds x ${DURATION}s: about $(((runs * (DURATION + SETTLE_SECONDS) + ${#TARGETS[@]} * 2 * WARMUP) / 60 + 1)) min"

    local kind round
    if [ "$WARMUP" -gt 0 ]; then
        for target in "${TARGETS[@]}"; do
            for kind in GET POST; do wrk_run "$target" "$kind" "$WARMUP" "$BENCH_TMP/warmup-$target-$kind.txt"; done
        done
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        for target in "${TARGETS[@]}"; do
            for kind in GET POST; do measure "$target" "$kind" "$round"; done
        done
    done
    [ "$LOGIN_BURST" != 1 ] || login_burst_compare
    [ "$PERF" != 1 ] || perf_profiles

    local results="$RESULTS_DIR/results-$STAMP.md"
    report | tee "$results"
    log "written: $results"
}

main "$@"
