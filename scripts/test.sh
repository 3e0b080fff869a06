#!/usr/bin/env bash
# `make test`: start the whole real stack (Kafka, registry, Postgres, S3, etcd, kube-apiserver,
# controller-manager), run every test (building the kind suite's images meanwhile), and stop the
# stack whatever happened; likewise any kind cluster the tests left and the Docker engine if this
# run started it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:/usr/local/go/bin:$PATH"
export K2_STATE_DIR="${K2_STATE_DIR:-$PWD/.k2/test-state}"
start=$(date +%s)
engine_was_up=0
python -m k2.stack.docker status | grep -q "engine answers: True" && engine_was_up=1
k2 stack up --kube || { k2 stack down; exit 1; }
eval "$(k2 stack env --kube)"
prebuild=
if [ $# -eq 0 ] && [ "${K2_KIND_TESTS:-1}" != 0 ]; then
  # The whole suite: the image and kind tests run last (tests/conftest.py), and the Go programs of
  # their images (most of an hour of compiling on a fresh machine, nothing when cached) are built
  # meanwhile, at low priority.
  setsid nice -n 19 python -m k2.stack.kindcluster prebuild > "$K2_STATE_DIR/kind-prebuild.log" 2>&1 &
  prebuild=$!
fi
python -m pytest "$@"
rc=$?
if [ -n "$prebuild" ]; then
  kill -TERM -- "-$prebuild" 2>/dev/null  # only still running if pytest ended before the kind suite
  wait "$prebuild"
  echo "make test: kind prebuild exit $? (log: $K2_STATE_DIR/kind-prebuild.log)"
fi
python -m k2.stack.kindcluster cleanup-tests $( ((engine_was_up)) || echo --stop-engine )
k2 stack down
echo "make test: pytest exit $rc after $(( $(date +%s) - start ))s"
exit $rc
