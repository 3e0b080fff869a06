"""The interface every source implements, and the types a folder source hands the ingest path.

A source is one module and one registration in `k2.sources.SOURCES`. Every source says how it is
run (`Source`: its `k2` sub-command, and whether it runs until stopped); a source read to
completion from a folder of files (`FolderSource`) also says how its files become canonical K2
records, and `k2 ingest` (`k2.ingest.pipeline`) and the sample loader (`k2.query.sample`) read
any registered one through it. The live feed's own seam for vendor protocols is `ADAPTERS` in
`k2.sources.feed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from k2.settings import TableKind


class RowError(ValueError):
    """A malformed row; `reason` is the short code that lands in the DLQ."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # pickled with both arguments: a dead letter prepared in an ingest worker process
        return type(self), (self.reason, str(self))


@dataclass(frozen=True, slots=True)
class TickFile:
    """One source file of one kind for one listing."""

    kind: TableKind
    path: Path
    symbol: str

    @property
    def source_id(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


class RecordReader(Protocol):
    """Turns the lines of one file into records, numbering them per (symbol, exchange date)."""

    sequences: dict[int, int]  # epoch day → last sequence number given (a columnar parser continues it)

    def build(self, line: str) -> dict[str, Any]:
        """One line → its record (the kind's physical Avro record); RowError names why it cannot be one."""
        ...


@runtime_checkable
class Source(Protocol):
    name: str  # IngestionPipeline `source.type`
    command: tuple[str, ...]  # the `k2` sub-command that runs it
    continuous: bool  # runs until stopped: a Deployment, not a Job (never a FolderSource: `register` refuses)
    description: str


@runtime_checkable
class FolderSource(Source, Protocol):
    """A source read to completion from a folder: its tick files, line by line, and its reference data."""

    columnar: bool  # its files are ASX-format CSV, which the ingest's columnar parser reads in bulk

    def discover(self, root: Path, symbols: set[str] | None = None,
                 kinds: tuple[TableKind, ...] = ("trades", "quotes")) -> list[TickFile]:
        ...

    def reference_records(self, root: Path, ingest_us: int, symbols: set[str] | None = None) -> Iterator[dict]:
        ...

    def reader(self, tick_file: TickFile, ingest_us: int) -> RecordReader:
        ...
