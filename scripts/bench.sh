#!/usr/bin/env bash
# `make bench`: benchmarks on the ASX sample, each printing ratios to a baseline run in the same
# process. Results are recorded by hand in docs/benchmarks.md with this command.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:/usr/local/go/bin:$PATH"
DATA="${K2_ASX_DATA:-../shared/data/asx-2014-03}"
[ -f "$DATA/reference-data/company_info.csv" ] || { echo "bench: ASX sample not found at $DATA (set K2_ASX_DATA)"; exit 1; }
k2 stack up --kube
trap 'k2 stack down' EXIT
eval "$(k2 stack env --kube)"
python benchmarks/bench_pipeline.py --data "$DATA"
python benchmarks/bench_consume.py --data "$DATA"  # the stream's consumer on a backlog: K2's fetch pacing vs librdkafka's
python benchmarks/bench_stream_scale.py --data "$DATA" --streams 1,2,per-table  # stream rows/s: 1 and 2 processes of one group, one per table; already joined
python benchmarks/bench_scale.py --scales 1,10  # synthetic data; `make bench-scale` adds 100x
python benchmarks/bench_row_groups.py  # why point queries stay flat as days grow (synthetic files)
python benchmarks/bench_snapshots.py  # why the stream thins its history: cost per kept snapshot
python benchmarks/bench_query.py --data "$DATA" --rate 200 --seconds 30
python benchmarks/bench_peers.py --data "$DATA"  # starts and stops QuestDB (K2_QUESTDB_* ports)
# The sink stores what K2 stores from the same topics (minutes, so out of `make test`), then its figures.
K2_CONNECT_TESTS=1 python -m pytest -q tests/integration/test_iceberg_connect_peer.py
python benchmarks/bench_connect.py --data "$DATA"  # starts and stops Iceberg's Kafka Connect sink (K2_CONNECT_PORT)
python benchmarks/bench_operator.py
# The whole live path's processes: k2 feed serve → k2 ingest feed → Kafka → stream / API (each one's memory)
python benchmarks/bench_live.py --rate 20000 --seconds 60
python benchmarks/bench_live.py --rate 5000 --seconds 60  # what the feed processes sustain beside the rest on 2 cores
# From Kafka on: the benchmark produces exactly --rate (no feed processes on the 2 cores)
python benchmarks/bench_live.py --source producer --rate 20000 --seconds 60
python benchmarks/bench_live.py --source producer --rate 20000 --seconds 60 --batch-seconds 0.2  # sub-second commits: more, smaller files
python benchmarks/bench_live.py --source producer --rate 2000 --seconds 60  # a tenth: where the 2 cores are not the bound
python benchmarks/bench_live.py --source producer --rate 2000 --seconds 60 --batch-seconds 0.2 --live-tail-rows 0  # no live tail: REST waits for commits
python benchmarks/bench_live.py --source producer --rate 2000 --seconds 60 --batch-seconds 0.2 --compact-interval-seconds 0  # no compaction: a query opens every small file
# On the cluster of `make kind-up` only (building and creating one takes long): a rolling update
# of the stream consumers while the live feed flows.
if [ -z "${K2_API_KEY:-}" ]; then
  echo "bench_rollout: skipped, K2_API_KEY is not set (the key \`make kind-up\` printed; the cluster keeps only its digest)"
elif python -c "import sys; from k2.stack import docker, kindcluster; sys.exit(not (docker.engine_answers() and 'k2' in kindcluster.clusters()))"; then
  python benchmarks/bench_rollout.py --context kind-k2
else
  echo "bench_rollout: skipped, no kind cluster k2 is running (make kind-up first)"
fi
