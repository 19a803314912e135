# Config writers shared by the load bench (run.sh) and the instruction count
# (instructions.sh), so both measure the same Tollgate and the same upstream. Sourced; needs
# BENCH_USERNAME and BENCH_PASSWORD set.

# write_body FILE [LOCATIONS]: the load bench's POST body, {"locations":[...]} of LOCATIONS
# (default 100) objects of ~100 bytes each, ~10 KB, compact as clients send it.
write_body() {
    awk -v n="${2:-100}" 'BEGIN {
        printf "{\"locations\":["
        for (i = 1; i <= n; i++) {
            printf "%s{\"id\":\"loc-%04d\",\"point\":{\"latitude\":55.751244,\"longitude\":37.618423},\"duration\":\"PT5M\",\"demand\":12}", (i > 1 ? "," : ""), i
        }
        printf "]}"
    }' >"$1"
}

# tollgate_config MODE LISTEN_PORT METRICS_PORT UPSTREAM_PORT DIR: prints the config file
# (the format of src/config/toml.rs; config/example.toml documents every key).
tollgate_config() {
    local mode=$1 listen_port=$2 metrics_port=$3 upstream_port=$4 dir=$5
    local auth capture points
    case "$mode" in
        passthrough)
            auth=false
            capture=false
            points=""
            ;;
        full | metered)
            auth=true
            capture=true
            # metered: the full path without capture, to tell capture's cost from the rest.
            [ "$mode" = metered ] && capture=false
            # Every element of the body's "locations" is a point; unique points by its "id".
            points='points = ["/locations"]
unique_key = "/id"'
            ;;
        *) die "tollgate_config: unknown mode '$mode'" ;;
    esac
    cat <<EOF
# Written by benches/load/run.sh (mode: $mode); see tollgate_config() there.
[server]
listen = "127.0.0.1:$listen_port"
name = "bench"
threads = 1
log_format = "text"
grace_period_seconds = 0
shutdown_timeout_seconds = 1

[metrics]
listen = "127.0.0.1:$metrics_port"

[store]
path = "$dir/store"

[auth]
# A fresh random secret per run, so the run needs no key file.
secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
# LOGIN_BURST logs in over and over from one address: measure logins, not the throttle.
login_failures_per_account_per_minute = 100000
login_failures_per_address_per_minute = 100000

# The bench account: its token drives the 'full' mode and LOGIN_BURST logs in as it.
[[users]]
username = "$BENCH_USERNAME"
password = "$BENCH_PASSWORD"
company_key = "bench_company"
roles = ["USER"]

# Quotas far above what a bench run can spend, so admission is measured, not rejection.
[[quotas]]
service = "UNIVERSAL"
method_group = "PLAN"
points_per_request = 1000000
points_per_day = 100000000
points_per_date_window = 100000000
date_window_days = 7
max_concurrent_execution = 1000

[[upstreams]]
name = "nginx"
address = "127.0.0.1:$upstream_port"
keepalive = 128

[[routes]]
method = "GET"
path = "/bench/get"
upstream = "nginx"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "bench_get"
auth = $auth
capture = $capture

[[routes]]
method = "POST"
path = "/bench/post"
upstream = "nginx"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "bench_post"
auth = $auth
capture = $capture
$points
EOF
}

# write_nginx_conf DIR COMMENT: an nginx config in DIR/nginx.conf, one worker in the
# foreground, its pid, logs and temp files under DIR; the lines particular to it (the end of
# its http block) come on stdin.
write_nginx_conf() {
    local dir=$1 comment=$2
    mkdir -p "$dir"
    {
        cat <<EOF
# $comment
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    # Keeps the 10 KB POST body in memory, as Tollgate does, instead of a temp file.
    client_body_buffer_size 64k;
    client_max_body_size 1m;
EOF
        cat
        echo "}"
    } >"$dir/nginx.conf"
}

# write_nginx_upstream_conf DIR PORT: the upstream, answering "ok" at once (POST bodies read
# and discarded).
write_nginx_upstream_conf() {
    local dir=$1 port=$2
    write_nginx_conf "$dir" 'Upstream for the load bench: answers "ok" at once; POST bodies are read and discarded.' <<EOF
    default_type text/plain;
    server {
        listen 127.0.0.1:$port;
        location / { return 200 "ok"; }
    }
EOF
}
