#!/usr/bin/env bash
# Builds Tollgate once (release) and runs every test: unit and property tests, the black-box
# tests that start the real binary against real upstreams on loopback, and the conformance
# test that drives the official Python client against the running binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# One build: cargo test builds the binary the black-box tests and the conformance test run.
cargo test --release --locked -- --test-threads=2
TOLLGATE_BIN="$PWD/target/release/tollgate" tests/conformance/run.sh
