#!/usr/bin/env bash
# `make test`: start the whole real stack (Kafka, registry, Postgres, S3, etcd, kube-apiserver,
# controller-manager), run every test, and stop the stack whatever happened; likewise any kind
# cluster the tests left and the Docker engine if this run started it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:/usr/local/go/bin:$PATH"
export K2_STATE_DIR="${K2_STATE_DIR:-$PWD/.k2/test-state}"
start=$(date +%s)
engine_was_up=0
python -m k2.stack.docker status | grep -q "engine answers: True" && engine_was_up=1
k2 stack up --kube || { k2 stack down; exit 1; }
eval "$(k2 stack env --kube)"
python -m pytest "$@"
rc=$?
python -m k2.stack.kindcluster cleanup-tests $( ((engine_was_up)) || echo --stop-engine )
k2 stack down
echo "make test: pytest exit $rc after $(( $(date +%s) - start ))s"
exit $rc
