#!/usr/bin/env bash
# The test suite: every crate's tests with nextest (PostgreSQL at DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432/postgres), then the doctests, which nextest does not run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo nextest run --workspace --no-fail-fast "$@"
cargo test --workspace --doc
