#!/usr/bin/env bash
# Time every build `make test` and `make kind-up` do, from nothing: each cache K2 and its tools use
# (K2's, the Docker engine's data-root under it, Go's module and build caches, pip's, Maven's)
# points into SCRATCH, which must be empty or absent and needs about 35 GB. Run as root, with no
# K2 Docker engine running (the engine is started on SCRATCH's data-root and stopped at the end).
# It recreates the checkout's .venv.
#   bash scripts/cold-build.sh /var/tmp/k2-cold            → SCRATCH/times.txt, each build alone
#   bash scripts/cold-build.sh /var/tmp/k2-cold make-test  → the whole `make test` from nothing
set -uo pipefail
cd "$(dirname "$0")/.."
scratch=${1:?usage: cold-build.sh SCRATCH}
mkdir -p "$scratch"
export K2_CACHE_DIR=$scratch/k2 GOMODCACHE=$scratch/gomod GOCACHE=$scratch/gobuild \
  PIP_CACHE_DIR=$scratch/pip MAVEN_OPTS="-Dmaven.repo.local=$scratch/m2" \
  K2_STATE_DIR=$scratch/state PATH="$PWD/.venv/bin:/usr/local/go/bin:$PATH"
times=$scratch/times.txt
: > "$times"
step() {
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  "$@"
  rc=$?
  echo "$name $(( $(date +%s) - t0 ))s exit $rc" | tee -a "$times"
}
rm -rf .venv
if [ "${2:-}" = make-test ]; then
  step make-test make test
  du -sh "$scratch"/* | tee -a "$times"
  exit 0
fi
step venv make install
step local-stack k2 stack up --kube
k2 stack down
step helm python -m k2.stack.helm
step questdb python -c "from k2.stack.questdb import QuestDB; QuestDB().install()"
step prometheus-and-promtool python -c "from k2.stack.images import PROMETHEUS; PROMETHEUS.install()"
step kind-node-and-cluster python -m k2.stack.kindcluster up --name k2-cold
step images python -m k2.stack.images build
python -m k2.stack.kindcluster down --name k2-cold
python -c "from k2.stack import docker; docker.stop_engine()"
du -sh "$scratch"/* | tee -a "$times"
