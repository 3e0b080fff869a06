#!/usr/bin/env bash
# `make bench-scale`: K2's whole path at 1x, 10x and 100x the ASX sample's rows on synthetic data
# (benchmarks/bench_scale.py; `make bench` runs 1x and 10x). Needs only Kafka + the registry;
# the data and lakehouse live in temporary folders that are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:/usr/local/go/bin:$PATH"
k2 stack up --embedded
trap 'k2 stack down' EXIT
eval "$(k2 stack env --embedded)"
uptime
python benchmarks/bench_scale.py --scales "${K2_BENCH_SCALES:-1,10,100}"
