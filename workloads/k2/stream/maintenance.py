"""`k2 maintain`: compact small files per partition, expire old snapshots, remove orphan files.

Compaction rewrites one partition at a time as a single overwrite snapshot (delete that
partition's files, add the sorted rewrite) that carries the table's recorded Kafka offsets and
newest tick forward. Writers may commit meanwhile: the overwrite (or the expiry) then fails Iceberg's optimistic
check and is redone from a fresh read, so no row a writer added is ever dropped.

Orphans are files under the table's location that no kept snapshot and no logged metadata file
references: what a writer killed between writing its files and the catalog commit leaves, and the
files of expired snapshots. Queries never read them (a scan only follows the metadata). Only files
older than a safety age are removed, so a live writer's files, written but not yet committed, stay.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import pyarrow.compute as pc
import structlog
from pyarrow.fs import FileSelector, FileType
from pyiceberg.expressions import AlwaysTrue, BooleanExpression, EqualTo
from pyiceberg.io.pyarrow import ArrowScan, PyArrowFileIO, _dataframe_to_data_files
from pyiceberg.manifest import DataFile, DataFileContent, ManifestContent
from pyiceberg.table import FileScanTask, Table
from pyiceberg.table.snapshots import Operation, Summary
from pyiceberg.table.update.snapshot import _OverwriteFiles
from pyiceberg.typedef import EMPTY_DICT
from pyiceberg.utils.concurrent import ExecutorFactory

from k2 import tables
from k2.observability import SNAPSHOTS
from k2.settings import Settings, TableKind

log = structlog.get_logger("k2.maintain")


@dataclass
class FileStats:
    files: int
    bytes: int
    rows: int


@dataclass
class MaintenanceReport:
    table: str
    before: FileStats
    after: FileStats
    partitions_compacted: int
    snapshots_expired: int
    orphans_removed: int

    def describe(self) -> str:
        return (f"{self.table}: files {self.before.files} → {self.after.files}, "
                f"bytes {self.before.bytes:,} → {self.after.bytes:,}, rows {self.before.rows:,} → "
                f"{self.after.rows:,}; {self.partitions_compacted} partitions compacted, "
                f"{self.snapshots_expired} snapshots expired, {self.orphans_removed} orphan files removed")


def file_stats(table: Table) -> FileStats:
    if table.current_snapshot() is None:
        return FileStats(0, 0, 0)
    files = table.inspect.files()
    return FileStats(files.num_rows, int(pc.sum(files["file_size_in_bytes"]).as_py() or 0),
                     int(pc.sum(files["record_count"]).as_py() or 0))


def files_per_partition(table: Table) -> dict[object, int]:
    """Partition value (the exchange_date, or None when unpartitioned) → live data files."""
    if table.current_snapshot() is None:
        return {}
    files = table.inspect.files()
    counts: dict[object, int] = {}
    partition_fields = [f.name for f in table.spec().fields]
    for partition in files["partition"].to_pylist():
        key = partition.get(partition_fields[0]) if partition_fields and partition else None
        counts[key] = counts.get(key, 0) + 1
    return counts


def _sort(data, table: Table):
    keys = [table.schema().find_column_name(f.source_id) for f in table.sort_order().fields]
    return data.take(pc.sort_indices(data, sort_keys=[(k, "ascending") for k in keys])) if keys else data


def compact_partition(table: Table, partition_filter: BooleanExpression) -> Table:
    def rewrite(current: Table) -> None:
        data = _sort(current.scan(row_filter=partition_filter).to_arrow(), current)
        current.overwrite(data, overwrite_filter=partition_filter,
                          snapshot_properties=tables.carried_properties(current))

    return tables.commit_retrying_conflicts(table, "compaction", rewrite)


def compact(table: Table, min_files: int) -> tuple[Table, int]:
    spec_fields = table.spec().fields
    compacted = 0
    for value, count in sorted(files_per_partition(table).items(), key=lambda kv: str(kv[0])):
        if count < min_files:
            continue
        if spec_fields:
            column = table.schema().find_column_name(spec_fields[0].source_id)
            literal = value.isoformat() if isinstance(value, dt.date) else value
            partition_filter: BooleanExpression = EqualTo(column, literal)
        else:
            partition_filter = AlwaysTrue()
        table = compact_partition(table, partition_filter)
        compacted += 1
        log.info("maintain.compacted", table=".".join(table.name()), partition=str(value), files_before=count)
    return table, compacted


TIER_BASE_BYTES = 64 * 1024  # files below this size are the first tier


class _ReplaceFiles(_OverwriteFiles):
    """Files swapped for files holding the same rows: Iceberg's `replace` operation (what Java's
    RewriteFiles commits). Readers of what was appended since a snapshot (catch-up) skip it.
    pyiceberg writes only append/overwrite/delete summaries, so the totals are computed as for an
    overwrite and the operation is named after."""

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        computed = super()._summary(snapshot_properties)
        return Summary(Operation.REPLACE, **computed.additional_properties)



def size_tier(size_bytes: int, fan_in: int) -> int:
    """Files within a factor of `fan_in` of each other in size share a tier (0: the smallest)."""
    return max(0, math.floor(math.log(max(size_bytes, 1) / TIER_BASE_BYTES, fan_in)) + 1)


def live_data_files(table: Table) -> list[DataFile] | None:
    """The current snapshot's data files; None when it has delete files (rows would move out from
    under them: `compact` rewrites such partitions whole)."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return []
    files: list[DataFile] = []
    for manifest in snapshot.manifests(table.io):
        if manifest.content != ManifestContent.DATA:
            return None
        files.extend(entry.data_file for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
                     if entry.data_file.content == DataFileContent.DATA)
    return files


def tiers_due(files: list[DataFile], fan_in: int, target_bytes: int, max_bytes: int) -> list[list[DataFile]]:
    """Groups of `files` to merge: per partition and size tier, the smallest files under half the
    target size (larger ones are well sized, and left alone), as many as fit in `max_bytes`, when
    at least `fan_in` of them do."""
    tiers: dict[tuple, list[DataFile]] = defaultdict(list)
    for f in files:
        if f.file_size_in_bytes < target_bytes // 2:
            tiers[(f.spec_id, f.partition, size_tier(f.file_size_in_bytes, fan_in))].append(f)
    groups = []
    for _, tier in sorted(tiers.items(), key=lambda kv: str(kv[0])):
        group, total = [], 0
        for f in sorted(tier, key=lambda f: f.file_size_in_bytes):
            if total + f.file_size_in_bytes > max_bytes:
                break
            group.append(f)
            total += f.file_size_in_bytes
        if len(group) >= fan_in:
            groups.append(group)
    return groups


def compact_tiers(table: Table, fan_in: int, max_bytes: int) -> tuple[Table, int]:
    """Size-tiered compaction, what the stream runs as it writes. Files of like size in a
    partition are merged, sorted, into one once `fan_in` of them gather, as one `replace` snapshot
    that carries the recorded offsets forward. Each row is rewritten about log_fan_in(merged size ÷
    commit size) times, and a pass reads only the files it merges, at most `max_bytes` of Parquet a
    group, so its pause and memory are bounded by configuration, not by the size of the day
    (`compact` rewrites a partition whole; `k2 maintain` merges what grows past `max_bytes`).
    Returns the table and the groups merged."""
    merged = 0
    has_deletes = False

    def merge(current: Table) -> None:
        nonlocal merged, has_deletes
        files = live_data_files(current)
        has_deletes = files is None
        groups = tiers_due(files or [], fan_in, tables.target_file_size(current), max_bytes)
        merged = len(groups)
        if not groups:
            return
        with tables.transaction(current) as tx:
            replace = _ReplaceFiles(operation=Operation.OVERWRITE, transaction=tx, io=current.io,
                                    snapshot_properties=tables.carried_properties(current))
            for group in groups:
                data = ArrowScan(current.metadata, current.io, current.schema(), AlwaysTrue()).to_table(
                    [FileScanTask(f) for f in group])
                for written in _dataframe_to_data_files(current.metadata, _sort(data, current), current.io):
                    replace.append_data_file(written)
                for f in group:
                    replace.delete_data_file(f)
            replace.commit()

    table = tables.commit_retrying_conflicts(table, "compaction", merge)
    return compact(table, fan_in) if has_deletes else (table, merged)


def expire(table: Table, retention: dt.timedelta) -> tuple[Table, int]:
    cutoff = dt.datetime.now(dt.UTC) - retention
    before = {snapshot.snapshot_id for snapshot in table.snapshots()}
    table = tables.commit_retrying_conflicts(
        table, "snapshot expiry", lambda current: current.maintenance.expire_snapshots().older_than(cutoff).commit())
    SNAPSHOTS.labels(".".join(table.name())).set(len(table.snapshots()))
    return table, len(before - {snapshot.snapshot_id for snapshot in table.snapshots()})


def thin_history(table: Table, *, detail: dt.timedelta, interval: dt.timedelta,
                 now: dt.datetime | None = None) -> tuple[Table, int]:
    """Keep every snapshot of the last `detail`, and of the older ones the last of each `interval`
    (by commit time, intervals aligned to the epoch); expire the rest. A stream committing every
    fraction of a second otherwise keeps hundreds of thousands of snapshots within `k2 maintain`'s
    retention, and each commit and each metadata load reads and rewrites them all. Time travel
    into a thinned stretch reads the last kept snapshot before it; `k2 maintain` still expires
    by age whatever this keeps."""
    cutoff_ms = int(((now or dt.datetime.now(dt.UTC)) - detail).timestamp() * 1000)
    step_ms = max(1, int(interval.total_seconds() * 1000))
    expired: list[int] = []

    def commit(current: Table) -> None:
        older = [s for s in current.snapshots() if s.timestamp_ms < cutoff_ms]
        # snapshots are listed in commit order: the last one listed per interval is kept
        last_per_interval = {s.timestamp_ms // step_ms: s.snapshot_id for s in older}
        keep = set(last_per_interval.values()) | _protected(current)
        expired[:] = [s.snapshot_id for s in older if s.snapshot_id not in keep]
        if expired:
            current.maintenance.expire_snapshots().by_ids(expired).commit()

    table = tables.commit_retrying_conflicts(table, "history thinning", commit)
    SNAPSHOTS.labels(".".join(table.name())).set(len(table.snapshots()))
    return table, len(expired)


def _protected(table: Table) -> set[int]:
    """Snapshots a branch or tag points at (the current one among them): never expired."""
    return {ref.snapshot_id for ref in table.metadata.refs.values()}


def _storage_path(table: Table, location: str) -> str:
    """A file's location as its file system names it ("/abs/path", "bucket/key")."""
    return PyArrowFileIO.parse_location(location, table.io.properties)[2]


def referenced_files(table: Table) -> set[str]:
    """Every file the table's metadata reaches: the current and logged metadata files, statistics,
    and per kept snapshot its manifest list, manifests and live data and delete files."""
    metadata = table.metadata
    found = {table.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    found |= {s.statistics_path for s in metadata.statistics}
    found |= {s.statistics_path for s in metadata.partition_statistics}
    snapshots = table.snapshots()
    found |= {snapshot.manifest_list for snapshot in snapshots}
    # one manifest list per snapshot (a commit every few seconds): read them, and the manifests, in parallel
    executor = ExecutorFactory.get_or_create()
    manifests = {m.manifest_path: m for listed in executor.map(lambda s: s.manifests(table.io), snapshots)
                 for m in listed}
    found |= manifests.keys()
    for entries in executor.map(lambda m: m.fetch_manifest_entry(table.io, discard_deleted=True), manifests.values()):
        found |= {entry.data_file.file_path for entry in entries}
    return {_storage_path(table, location) for location in found}


def remove_orphans(table: Table, min_age: dt.timedelta) -> tuple[Table, int]:
    """Delete the files under the table's location that nothing references and that are older than
    `min_age`. Listed before the metadata is read again: a file committed meanwhile is referenced."""
    if not isinstance(table.io, PyArrowFileIO):
        raise TypeError(f"orphan removal lists files through pyarrow; the table uses {type(table.io).__name__}")
    scheme, netloc, root = PyArrowFileIO.parse_location(table.location(), table.io.properties)
    fs = table.io.fs_by_scheme(scheme, netloc)
    listed = [info for info in fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
              if info.type == FileType.File]
    table = table.refresh()
    referenced = referenced_files(table)
    cutoff_ns = time.time_ns() - int(min_age.total_seconds() * 1e9)
    orphans = [info.path for info in listed
               if info.path not in referenced and info.mtime_ns is not None and info.mtime_ns < cutoff_ns]
    for path in orphans:
        fs.delete_file(path)
    if orphans:
        log.info("maintain.orphans_removed", table=".".join(table.name()), files=len(orphans),
                 min_age_hours=min_age.total_seconds() / 3600)
    return table, len(orphans)


def maintain(settings: Settings, kinds: tuple[TableKind, ...], *, retention_hours: float,
             min_files: int, orphan_age_hours: float = 72) -> list[MaintenanceReport]:
    cat = tables.catalog(settings)
    reports = []
    for kind in kinds:
        table = tables.load_table(cat, settings.table_identifier(kind))
        if table is None:
            continue
        before = file_stats(table)
        table, compacted = compact(table, min_files)
        table, expired = expire(table, dt.timedelta(hours=retention_hours))
        table, orphans = remove_orphans(table, dt.timedelta(hours=orphan_age_hours))
        reports.append(MaintenanceReport(settings.table_identifier(kind), before, file_stats(table), compacted,
                                         expired, orphans))
        log.info("maintain.done", **{k: str(v) for k, v in vars(reports[-1]).items()})
    return reports
