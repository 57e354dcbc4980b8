#!/usr/bin/env bash
# The test suite: the doctests (which nextest does not run), then every crate's tests with
# nextest (PostgreSQL at DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --doc
cargo nextest run --workspace --no-fail-fast "$@"
