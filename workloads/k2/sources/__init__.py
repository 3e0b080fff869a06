"""Where ticks come from: one module per source, one registration here.

A source module turns its input into canonical K2 records (`k2.schemas`): `asx` reads ASX-format
CSV folders (the synthetic generator writes that format too), `feed` speaks the K2 feed protocol
and holds the adapter seam for vendor feeds. `SOURCES` tells the CLI and the operator how each
is run: to completion (a Job) or until stopped (a Deployment).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceType:
    name: str  # IngestionPipeline `source.type`
    command: tuple[str, ...]  # the `k2` sub-command that runs it
    continuous: bool  # runs until stopped: a Deployment, not a Job
    description: str


SOURCES: dict[str, SourceType] = {s.name: s for s in (
    SourceType("asx-csv", ("ingest", "asx"), False, "ASX-format CSV folders (trades/, quotes/, reference-data/)"),
    SourceType("synthetic", ("ingest", "synthetic"), False, "K2's deterministic synthetic tick generator"),
    SourceType("feed", ("ingest", "feed"), True, "a live WebSocket feed (the K2 feed protocol or a vendor adapter)"),
)}
