#!/usr/bin/env bash
# Builds Tollgate and runs it on config/default.toml: the proxy on 127.0.0.1:8080 in front of
# the built-in demo upstream, metrics on 127.0.0.1:9090, the store under ./data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release -- serve --config config/default.toml "$@"
