"""Rolling update of the stream consumers on kind: how long a table goes without a commit.

Needs the cluster of `make kind-up` (it applies the live feed, manifests/kind-data/live-feed.yaml).
The pipeline `live` is scaled to --replicas consumers through its scale subresource and the venue
restarted, so ticks flow for its whole replayed day; once both tables commit (the day opens with
quotes only), a baseline window of --baseline seconds,
then `kubectl rollout restart` of the consumer Deployment, measured from the restart until
--settle seconds after the rollout completed. The commit times come from each table's snapshot
log (GET /v1/snapshots on the QueryService live-api, port-forwarded); a pause is the longest time
between consecutive commits of a table (window edges included), reported beside the baseline's.

    make kind-up   # prints the API key: export K2_API_KEY=…
    .venv/bin/python benchmarks/bench_rollout.py [--context kind-k2] > report.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import os
import statistics
import subprocess
import time

import httpx

from k2.stack import kube

NAMESPACE = "k2"
TABLES = ("trades", "quotes")


class Cluster:
    def __init__(self, context: str) -> None:
        self.context = context

    def kubectl(self, *args: str, timeout: float = 600) -> str:
        cmd = [str(kube.kube_bin_dir() / "kubectl"), "--context", self.context, "-n", NAMESPACE, *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout

    @staticmethod
    def api_key() -> str:
        """The key `make kind-up` printed: the cluster stores only its digest."""
        key = os.environ.get("K2_API_KEY")
        if not key:
            raise SystemExit("export K2_API_KEY=<the key `make kind-up` printed> (`make kind-api-key` makes a new one)")
        return key

    def port_forward(self, target: str, remote_port: int) -> contextlib.AbstractContextManager[str]:
        return kube.port_forward(target, remote_port, namespace=NAMESPACE, kubectl_args=["--context", self.context])


def commit_times(client: httpx.Client, table: str) -> list[float]:
    response = client.get("/v1/snapshots", params={"table": table})
    response.raise_for_status()
    return sorted(dt.datetime.fromisoformat(s["committed_at"]).timestamp() for s in response.json()["data"])


def gaps(times: list[float], start: float, end: float) -> list[float]:
    """Times between consecutive commits in [start, end], counting from start and up to end."""
    inside = [start, *(t for t in times if start <= t <= end), end]
    return [b - a for a, b in itertools.pairwise(inside)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", default="kind-k2")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--baseline", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=20.0)
    args = parser.parse_args()
    cluster = Cluster(args.context)

    cluster.kubectl("scale", "ingestionpipeline/live", f"--replicas={args.replicas}")
    cluster.kubectl("wait", "--for=condition=Ready", "ingestionpipeline/live", "--timeout=10m")
    cluster.kubectl("rollout", "status", "deployment/live-consumer", "--timeout=10m")
    cluster.kubectl("rollout", "restart", "deployment/feed-simulator")
    cluster.kubectl("rollout", "status", "deployment/feed-simulator", "--timeout=5m")

    with cluster.port_forward("svc/live-api", 80) as url, httpx.Client(
            base_url=url, timeout=60, headers={"X-API-Key": cluster.api_key()}) as client:
        # The replayed day opens with quotes only (pre-open), and the old venue's day may still have
        # been flowing at the restart: measure once both tables have committed steadily for 20 s.
        time.sleep(30)
        deadline = time.time() + 900
        while not all(len([c for c in commit_times(client, t) if c > time.time() - 20]) >= 10 for t in TABLES):
            if time.time() > deadline:
                raise SystemExit("the live tables are not both committing: is the venue replaying?")
            time.sleep(2)
        baseline_start = time.time()
        time.sleep(args.baseline)
        restart = time.time()
        cluster.kubectl("rollout", "restart", "deployment/live-consumer")
        cluster.kubectl("rollout", "status", "deployment/live-consumer", "--timeout=10m")
        rolled = time.time()
        time.sleep(args.settle)
        end = time.time()
        times = {table: commit_times(client, table) for table in TABLES}

    print(f"Rolling restart of {args.replicas} stream consumers (cooperative-sticky assignment) while the "
          f"venue replays; the rollout took {rolled - restart:.1f} s.\n")
    print("| table | window | seconds | commits | median gap s | longest gap s | longest ÷ baseline longest |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for table in TABLES:
        base = gaps(times[table], baseline_start, restart)
        roll = gaps(times[table], restart, end)
        for name, found, seconds in (("baseline", base, restart - baseline_start), ("rollout", roll, end - restart)):
            print(f"| {table} | {name} | {seconds:.0f} | {len(found) - 1} | {statistics.median(found):.2f} | "
                  f"{max(found):.2f} | {max(found) / max(base):.1f}× |")


if __name__ == "__main__":
    main()
