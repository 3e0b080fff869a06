"""`k2`: the one command behind every K2 workload (ingest, stream, maintain, api, stack, demo, operator).

Containers on Kubernetes run these same sub-commands, configured by the same `K2_*` variables.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table as RichTable

from k2.observability import configure_logging, serve_metrics
from k2.settings import TABLE_KINDS, Settings, TableKind

app = typer.Typer(help="K2 market-data lakehouse", no_args_is_help=True, pretty_exceptions_show_locals=False)
stack_app = typer.Typer(help="The local stack of real services (Kafka, registry, Postgres, S3, kube-apiserver)",
                        no_args_is_help=True)
ingest_app = typer.Typer(help="Feed ticks into Kafka", no_args_is_help=True)
stream_app = typer.Typer(help="Kafka → Iceberg writers", no_args_is_help=True)
feed_app = typer.Typer(help="Live market feeds (the K2 feed protocol, docs/feed-protocol.md)", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(feed_app, name="feed")
app.add_typer(ingest_app, name="ingest")
app.add_typer(stream_app, name="stream")
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:  # a K2_* variable is wrong: say which and why, not a traceback
        console.print(f"invalid K2_* settings: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    serve_metrics(settings.metrics_port)
    return settings


def _kinds(value: str | None, default: tuple[TableKind, ...]) -> tuple[TableKind, ...]:
    if not value:
        return default
    kinds = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [k for k in kinds if k not in TABLE_KINDS]
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}; choose from {', '.join(TABLE_KINDS)}")
    return tuple(TABLE_KINDS[TABLE_KINDS.index(k)] for k in kinds)  # as TableKinds


# stack ------------------------------------------------------------------------------------------
def _stack() -> ModuleType:
    """`k2.stack`, the local development services: not part of the runtime image."""
    try:
        from k2 import stack
    except ImportError as exc:
        console.print(f"[red]the local stack is not installed here ({exc}).[/] It is for development: from a K2 "
                      "checkout run `make install` (or `pip install -e '.[stack]'`).")
        raise typer.Exit(2) from exc
    return stack


@stack_app.command("up")
def stack_up(kube: Annotated[bool, typer.Option(help="also start etcd + kube-apiserver (+controller-manager)")] = False,
             embedded: Annotated[bool, typer.Option(help="only Kafka + registry (SQLite/local files for Iceberg)")]
             = False,
             only: Annotated[str | None, typer.Option(help="comma-separated services of that set, e.g. postgres,s3")]
             = None) -> None:
    """Install (cached) and start the services; idempotent (a running service is not started twice)."""
    stack = _stack()
    configure_logging()
    chosen = stack.services(kube=kube, embedded=embedded)
    if only:
        names = {n.strip() for n in only.split(",") if n.strip()}
        if unknown := names - {s.name for s in chosen}:
            raise typer.BadParameter(f"unknown {sorted(unknown)}; choose from {', '.join(s.name for s in chosen)}")
        chosen = [s for s in chosen if s.name in names]
    for service in chosen:
        console.print(f"[bold]{service.name}[/] … ", end="")
        service.start()
        console.print(f"[green]ready[/] on 127.0.0.1:{service.port}")
    console.print(stack.connection_summary(kube=kube, embedded=embedded))


@stack_app.command("down")
def stack_down() -> None:
    """Stop every service this checkout started (by recorded PID, each whole process group)."""
    stack = _stack()
    configure_logging()
    failed = []
    for service in [*stack.peers(), *reversed(stack.services(kube=True, embedded=False))]:
        try:
            service.stop()
        except stack.StackError as exc:  # the others are still stopped
            console.print(f"[red]{exc}[/]")
            failed.append(service.name)
    if failed:
        console.print(f"[red]could not stop {', '.join(failed)}[/]")
        raise typer.Exit(1)
    console.print("stack stopped")


@stack_app.command("status")
def stack_status(json_output: Annotated[bool, typer.Option("--json", help="one JSON object per service")]
                 = False) -> None:
    """Each service as it really runs: its process group, and who listens on its ports."""
    stack = _stack()
    services = [*stack.services(kube=True, embedded=False), *stack.peers()]
    rows = [{"service": s.name, "port": s.port, "pid": s.pid(), "status": s.status(), "log": str(s.log_path)}
            for s in services]
    if json_output:
        print(json.dumps(rows, indent=1))
        return
    table = RichTable("service", "port", "pid", "status", "log")
    for row in rows:
        table.add_row(row["service"], str(row["port"]), str(row["pid"] or ""), row["status"], row["log"])
    Console().print(table)


@stack_app.command("env")
def stack_env(kube: bool = False, embedded: bool = False) -> None:
    """Print `export K2_…` lines that point K2 at the local stack."""
    stack = _stack()
    for key, value in stack.settings_env(kube=kube, embedded=embedded).items():
        print(f"export {key}={value}")


# ingest -----------------------------------------------------------------------------------------
def _print_ingest(summary) -> None:
    table = RichTable("rows read", "produced", "rejected", "messages/s", "balanced")
    table.add_row(f"{summary.rows_read:,}", f"{summary.produced_total:,}", f"{summary.rejected_total:,}",
                  f"{summary.messages_per_second:,.0f}", "yes" if summary.balanced else "NO")
    Console().print(table)
    for topic, count in sorted(summary.produced.items()):
        Console().print(f"  {topic}: {count:,}")
    for reason, count in sorted(summary.rejected.items()):
        Console().print(f"  rejected {reason}: {count:,}")


@ingest_app.command("asx")
def ingest_asx(
    path: Annotated[Path, typer.Argument(help="ASX-format folder: trades/, quotes/, reference-data/")],
    symbols: Annotated[str | None, typer.Option(help="comma-separated symbols (default: all)")] = None,
    topics: Annotated[str | None, typer.Option(help="kinds to ingest: trades,quotes")] = None,
    dlq_file: Annotated[Path | None, typer.Option(help="local mode: rejected rows to this JSONL file")] = None,
    progress: bool = True,
) -> None:
    """Ingest ASX CSV ticks into Kafka (Avro, Confluent wire format)."""
    _ingest_folder("asx-csv", path, symbols, topics, dlq_file, progress)


@ingest_app.command("folder")
def ingest_folder_cmd(
    path: Annotated[Path, typer.Argument(help="a folder the source reads")],
    source: Annotated[str, typer.Option(help="a registered folder source (k2.sources.SOURCES)")] = "asx-csv",
    symbols: Annotated[str | None, typer.Option(help="comma-separated symbols (default: all)")] = None,
    topics: Annotated[str | None, typer.Option(help="kinds to ingest: trades,quotes")] = None,
    dlq_file: Annotated[Path | None, typer.Option(help="local mode: rejected rows to this JSONL file")] = None,
    progress: bool = True,
) -> None:
    """Ingest a folder of any registered folder source into Kafka (asx-csv: as `k2 ingest asx`)."""
    from k2.sources import folder_source

    try:
        folder_source(source)
    except (KeyError, TypeError) as exc:
        raise typer.BadParameter(str(exc).strip("'\""), param_hint="--source") from None
    _ingest_folder(source, path, symbols, topics, dlq_file, progress)


def _ingest_folder(source: str, path: Path, symbols: str | None, topics: str | None, dlq_file: Path | None,
                   progress: bool) -> None:
    from k2.ingest.pipeline import ingest_files

    settings = _settings()
    summary = ingest_files(path, settings, symbols=set(symbols.split(",")) if symbols else None,
                           kinds=_kinds(topics, ("trades", "quotes")), dlq_file=dlq_file, show_progress=progress,
                           source=source)
    _print_ingest(summary)
    if summary.interrupted:
        raise typer.Exit(130)


@ingest_app.command("synthetic")
def ingest_synthetic(
    symbols: Annotated[int, typer.Option(min=1, max=12)] = 4,
    days: Annotated[int, typer.Option(min=1, max=60)] = 2,
    seed: int = 42,
    out: Annotated[Path | None, typer.Option(help="keep the generated CSV folder here")] = None,
    dlq_file: Path | None = None,
    progress: bool = True,
) -> None:
    """Generate deterministic realistic ticks (data/k2_synthetic) and ingest them."""
    from k2.ingest.pipeline import ingest_files
    from k2.sources import SOURCES
    from k2.sources.synthetic import SyntheticSource

    settings = _settings()
    source = SOURCES["synthetic"]
    assert isinstance(source, SyntheticSource)
    with tempfile.TemporaryDirectory(prefix="k2-synthetic-") as tmp:
        folder = source.generate(out or Path(tmp), symbols=symbols, days=days, seed=seed)
        summary = ingest_files(folder, settings, dlq_file=dlq_file, show_progress=progress, source=source.name)
    _print_ingest(summary)


@ingest_app.command("feed")
def ingest_feed_cmd(
    url: Annotated[str, typer.Argument(help="ws://HOST:PORT of a feed speaking --protocol")],
    channels: Annotated[str, typer.Option(help="comma-separated: trades,quotes")] = "trades,quotes",
    symbols: Annotated[str, typer.Option(help="comma-separated symbols, * for all")] = "*",
    protocol: Annotated[str, typer.Option(help="feed adapter (k2: the K2 feed protocol)")] = "k2",
    until_end: Annotated[bool, typer.Option(help="exit once the feed says it has no more ticks")] = False,
    dlq_file: Annotated[Path | None, typer.Option(help="local mode: rejected messages to this JSONL file")] = None,
) -> None:
    """Ingest a live feed into Kafka until SIGTERM: reconnects, resubscribes, checks sequences."""
    from k2.ingest.feed import ingest_feed
    from k2.sources.feed import ADAPTERS, CHANNELS

    chosen = [c.strip() for c in channels.split(",") if c.strip()]
    if not chosen or set(chosen) - set(CHANNELS):
        raise typer.BadParameter(f"channels must be among {', '.join(CHANNELS)}")
    if protocol not in ADAPTERS:
        raise typer.BadParameter(f"unknown protocol {protocol!r}; choose from {', '.join(ADAPTERS)}")
    settings = _settings()
    summary = ingest_feed(url, settings, channels=chosen, symbols=[s.strip() for s in symbols.split(",")],
                          protocol=protocol, until_end=until_end, dlq_file=dlq_file)
    _print_ingest(summary)


@app.command("generate")
def generate_cmd(out: Path, symbols: int = 4, days: int = 2, seed: int = 42) -> None:
    """Write deterministic synthetic ticks in the ASX CSV format."""
    from k2_synthetic import generate

    generate(out, symbols=symbols, days=days, seed=seed)
    console.print(f"wrote {out}")


# stream -----------------------------------------------------------------------------------------
@stream_app.command("run")
def stream_run(
    tables: Annotated[str | None, typer.Option(help="comma-separated: trades,quotes,reference")] = None,
    until_idle: Annotated[float | None, typer.Option(help="exit 0 once caught up and idle this many seconds")]
    = None,
    dlq_file: Path | None = None,
    group_id: Annotated[str | None, typer.Option(help="consumer group prefix")] = None,
    process_per_table: Annotated[bool | None, typer.Option(
        "--process-per-table/--one-process",
        help="each table written by a process of its own (a process uses at most one core), or every table "
             "by this one (always so with --dlq-file) [default: K2_STREAM_PROCESS_PER_TABLE, true]")] = None,
) -> None:
    """Consume the Avro topics into Iceberg tables, exactly once."""
    from k2.stream import processes, runner

    settings = _settings()
    kinds = _kinds(tables, TABLE_KINDS)
    per_table = settings.stream_process_per_table if process_per_table is None else process_per_table
    if per_table and len(kinds) > 1 and dlq_file is None:
        result = processes.run(settings, kinds, until_idle=until_idle, group_id=group_id)
    else:
        result = runner.run(settings, kinds, until_idle=until_idle, dlq_file=dlq_file, group_id=group_id)
    for table, rows in result.rows_written.items():
        console.print(f"{table}: {rows:,} rows committed")


@app.command("maintain")
def maintain_cmd(
    tables: Annotated[str | None, typer.Option("--table", help="comma-separated table kinds")] = None,
    retention_hours: Annotated[float, typer.Option(help="expire snapshots older than this")] = 24 * 7,
    min_files: Annotated[int, typer.Option(help="compact partitions with at least this many files")] = 4,
    orphan_age_hours: Annotated[float, typer.Option(min=0, help="remove unreferenced files only once they are this "
                                                    "old (a live writer's uncommitted files must be younger)")] = 72,
) -> None:
    """Compact small files per partition, expire old snapshots, remove orphan files."""
    from k2.stream.maintenance import maintain

    settings = _settings()
    for report in maintain(settings, _kinds(tables, TABLE_KINDS), retention_hours=retention_hours,
                           min_files=min_files, orphan_age_hours=orphan_age_hours):
        console.print(report.describe())


# feed -------------------------------------------------------------------------------------------
@feed_app.command("serve")
def feed_serve(
    data_dir: Annotated[Path | None, typer.Argument(help="ASX-format folder to replay (default: synthetic ticks)")]
    = None,
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0: any free port (printed)")] = 8765,
    speed: Annotated[float, typer.Option(min=0, help="exchange seconds per wall second; 0: as fast as read")] = 1.0,
    max_idle: Annotated[float, typer.Option(min=0, help="longest wait between ticks, wall seconds")] = 1.0,
    heartbeat: Annotated[float, typer.Option(min=0.05, help="seconds between heartbeats")] = 1.0,
    buffer: Annotated[int, typer.Option(min=1, help="messages buffered per subscriber")] = 10_000,
    symbols: Annotated[int, typer.Option(min=1, max=12, help="synthetic: number of symbols")] = 4,
    days: Annotated[int, typer.Option(min=1, max=60, help="synthetic: trading days")] = 1,
    seed: int = 42,
    malformed_every: Annotated[int, typer.Option(min=0, help="fault injection: a corrupted copy before every "
                                                 "Nth tick (0: never)")] = 0,
) -> None:
    """Serve ticks over WebSocket in accelerated real time: the market simulator."""
    import asyncio

    from k2.feed.server import market_for, serve_market
    from k2_synthetic import generate

    configure_logging(Settings().log_level)
    options = {"speed": speed, "max_idle": max_idle, "heartbeat": heartbeat, "buffer": buffer,
               "malformed_every": malformed_every}
    with tempfile.TemporaryDirectory(prefix="k2-feed-") as tmp:
        root = data_dir or generate(Path(tmp), symbols=symbols, days=days, seed=seed)
        try:
            asyncio.run(serve_market(market_for(root, **options), host, port))
        except KeyboardInterrupt:
            pass


# api --------------------------------------------------------------------------------------------
@app.command("api")
def api_cmd(host: str = "127.0.0.1", port: Annotated[int, typer.Option(envvar="K2_API_PORT")] = 8000,
            workers: int = 1) -> None:
    """Serve the REST API (FastAPI + uvicorn)."""
    import uvicorn

    settings = _settings()
    # The protocol adds the request and write deadlines (K2_REQUEST_TIMEOUT_SECONDS, K2_WRITE_TIMEOUT_SECONDS).
    uvicorn.run("k2.api.app:create_app", factory=True, host=host, port=port, workers=workers,
                http="k2.api.protocol:GuardedHttpProtocol", log_config=None, access_log=False,
                log_level=settings.log_level.lower())


@app.command("api-key")
def api_key_cmd(
    key_id: Annotated[str, typer.Option("--id", help="how the key appears in logs and errors")],
    symbols: Annotated[str | None, typer.Option(help="comma-separated symbols or prefixes (BH*); default all")]
    = None,
    exchanges: Annotated[str | None, typer.Option(help="comma-separated exchange codes; default all")] = None,
    tables: Annotated[str | None, typer.Option(help="comma-separated: trades,quotes,reference; default all")] = None,
    stream: Annotated[bool, typer.Option(help="may subscribe to /v1/stream/*")] = False,
) -> None:
    """A new API key: the key once on stdout, its entry (a digest, never the key) on stderr, to add
    to the QueryService's API keys Secret. No scope options: an unrestricted key (add --stream to let
    it stream)."""
    import secrets

    from k2.api.auth import Entitlement, document

    def split(value: str | None) -> list[str] | None:
        return [v.strip() for v in value.split(",") if v.strip()] if value is not None else None

    key = "k2_" + secrets.token_urlsafe(32)
    entry = Entitlement.of(key_id, key, symbols=split(symbols), exchanges=split(exchanges), tables=split(tables),
                           stream=stream)
    entry.scope()  # refuses unknown exchanges or tables now rather than at the API's start
    print(key)
    typer.echo(document([entry]), err=True, nl=False)  # exact YAML: it goes into a Secret as it is


# operator ---------------------------------------------------------------------------------------
@app.command("operator")
def operator_cmd(namespace: Annotated[list[str] | None, typer.Option(help="watch only these namespaces")] = None,
                 ) -> None:
    """Run the kopf operator (in-cluster, or with the current kubeconfig)."""
    from k2_operator.main import run as run_operator

    configure_logging(Settings().log_level)
    run_operator(namespaces=namespace or [])


@app.command("demo")
def demo_cmd(asx: Annotated[Path | None, typer.Option(help="load this ASX folder instead of synthetic ticks")]
             = None, port: int = 8000,
             keep_running: Annotated[bool | None, typer.Option(
                 help="keep the API serving until Ctrl-C (default: when run in a terminal); otherwise print "
                      "how to query the demo's tables afterwards")] = None) -> None:
    """The guided tour: stack → ingest → stream → API → queries → chart."""
    from k2.demo import run_demo

    _stack()
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    run_demo(asx=asx, port=port, keep_running=interactive if keep_running is None else keep_running)


def main() -> None:
    """`k2`: what the user can fix by configuration is one clear line, not a traceback."""
    from k2.reach import Unreachable
    from k2.topics import MissingResource

    try:
        app()
    except (Unreachable, MissingResource) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(1) from None
