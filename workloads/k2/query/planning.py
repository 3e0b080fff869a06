"""Which data files of a snapshot may hold the rows a filter asks for, reading each manifest once.

A streaming table gains a manifest with every commit (several a second with sub-second commits),
and pyiceberg plans a scan by reading every manifest of the snapshot again: each new snapshot
cost a read of all the manifests before it, so planning grew with the day and was most of the
API's time under a live feed. A manifest never changes once written, so its live entries are
kept here (least recently used first out, bounded by entries) and a new snapshot's planning reads
only the manifests it added. Pruning is pyiceberg's own: its manifest, partition and metrics
evaluators, and its assembly of scan tasks with their delete files.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import cast

import cachetools
from pyiceberg.conversions import from_bytes
from pyiceberg.expressions import BooleanExpression
from pyiceberg.io import FileIO
from pyiceberg.manifest import DataFile, ManifestEntry, ManifestFile
from pyiceberg.table import FileScanTask, ManifestGroupPlanner, Table, _min_sequence_number
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.typedef import KeyDefaultDict
from pyiceberg.types import PrimitiveType
from pyiceberg.utils.concurrent import ExecutorFactory

MANIFEST_CACHE_ENTRIES = 200_000  # manifest entries kept: a few hundred bytes to a few KB each


class ManifestCache:
    """Live entries per manifest file, shared by every plan of the process."""

    def __init__(self, max_entries: int = MANIFEST_CACHE_ENTRIES) -> None:
        self._entries: cachetools.LRUCache[tuple, list[ManifestEntry]] = cachetools.LRUCache(
            max_entries, getsizeof=lambda entries: len(entries) + 1)
        self._lock = threading.Lock()
        self.reads = 0  # manifests read from storage

    @property
    def held(self) -> int:
        """Entries held (plus one per manifest)."""
        return int(self._entries.currsize)

    def entries(self, io: FileIO, manifest: ManifestFile) -> list[ManifestEntry]:
        # The entries inherit the manifest's sequence number and snapshot id, fixed at its commit.
        key = (manifest.manifest_path, manifest.sequence_number, manifest.added_snapshot_id)
        with self._lock:
            found = self._entries.get(key)
        if found is None:
            found = manifest.fetch_manifest_entry(io, discard_deleted=True)
            with self._lock:
                self.reads += 1
                if len(found) < self._entries.maxsize:
                    self._entries[key] = found
        return found


class _Planner(ManifestGroupPlanner):
    def __init__(self, table: Table, row_filter: BooleanExpression, cache: ManifestCache) -> None:
        super().__init__(table.metadata, table.io, row_filter)
        self._cache = cache

    def plan_manifest_entries(self, manifests: Iterable[ManifestFile]) -> Iterator[list[ManifestEntry]]:
        manifest_evaluators = KeyDefaultDict(self._build_manifest_evaluator)
        kept = [m for m in manifests if manifest_evaluators[m.partition_spec_id](m)]
        partition_evaluators = KeyDefaultDict(self._build_partition_evaluator)
        metrics_evaluator = self._build_metrics_evaluator()
        oldest_data = _min_sequence_number(kept)

        def matching(manifest: ManifestFile) -> list[ManifestEntry]:
            in_partition = partition_evaluators[manifest.partition_spec_id]
            return [entry for entry in self._cache.entries(self.io, manifest)
                    if in_partition(entry.data_file) and metrics_evaluator(entry.data_file)]

        # In parallel, as pyiceberg reads them: a first plan of a long day reads many manifests.
        return ExecutorFactory.get_or_create().map(
            matching, [m for m in kept if self._check_sequence_number(oldest_data, m)])


def plan_files(table: Table, snapshot: Snapshot, row_filter: BooleanExpression,
               cache: ManifestCache) -> list[FileScanTask]:
    """The scan tasks of `snapshot` for `row_filter`, as `table.scan(...).plan_files()` gives them."""
    return list(_Planner(table, row_filter, cache).plan_files(snapshot.manifests(table.io)))


def column_bounds(table: Table, files: Iterable[DataFile], column: str) -> list[tuple[int | None, int | None]]:
    """Each file's least and greatest value of an integer-like column (a timestamp's microseconds),
    from its column metrics; None where the file does not record one."""
    field = table.schema().find_field(column)
    kind = cast(PrimitiveType, field.field_type)

    def value(bounds: dict[int, bytes] | None) -> int | None:
        raw = (bounds or {}).get(field.field_id)
        return None if raw is None else int(from_bytes(kind, raw))

    return [(value(f.lower_bounds), value(f.upper_bounds)) for f in files]
