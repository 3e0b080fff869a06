#!/usr/bin/env bash
# `make test`: start the real stack (Kafka, registry, Postgres, S3; etcd, kube-apiserver and
# controller-manager too, or when the first test needs them), run every test, and stop the stack
# whatever happened; likewise any kind cluster the tests left and the Docker engine if this run
# started it.
set -uo pipefail
cd "$(dirname "$0")/.."
# /usr/sbin: Debian installs dockerd and the iptables it calls there, off a non-login shell's PATH
export PATH="$PWD/.venv/bin:/usr/local/go/bin:$PATH:/usr/sbin:/sbin"
export K2_STATE_DIR="${K2_STATE_DIR:-$PWD/.k2/test-state}"
start=$(date +%s)
engine_was_up=0
python -m k2.stack.docker status | grep -q "engine answers: True" && engine_was_up=1
prebuild=
if [ $# -eq 0 ] && [ "${K2_KIND_TESTS:-1}" != 0 ]; then
  # The whole suite: the tests needing the apiserver, the image tests and the kind suite run last
  # (tests/conftest.py), and their Go programs (the apiserver's, the kind node's, the add-ons'; most
  # of an hour of compiling on a fresh machine, nothing when cached) are built meanwhile, at low
  # priority. The apiserver, etcd and controller-manager start when the first test needs them.
  k2 stack up || { k2 stack down; exit 1; }
  mkdir -p "$K2_STATE_DIR"
  setsid nice -n 19 python -m k2.stack.kindcluster prebuild > "$K2_STATE_DIR/kind-prebuild.log" 2>&1 &
  prebuild=$!
else
  k2 stack up --kube || { k2 stack down; exit 1; }
fi
eval "$(k2 stack env --kube)"
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
