"""Where ticks come from: one module per source, one registration here.

Each source implements `k2.sources.base.Source` (how it is run: its `k2` sub-command, to completion
as a Job or until stopped as a Deployment); a source read from a folder of files implements
`FolderSource` too (its files, line by line, into canonical K2 records, `k2.schemas`). `asx` reads
ASX-format CSV folders, `synthetic` generates one (data/k2_synthetic) and reads it the same way,
`feed` speaks the K2 feed protocol and holds the adapter seam for vendor feeds (`ADAPTERS`).

`SOURCES` is what the CLI, `k2 ingest` (`k2.ingest.pipeline`), the sample loader
(`k2.query.sample`) and the operator (the IngestionPipeline `source.type` enum) read: a new source
is its module and one `register` call, nothing else.
"""

from __future__ import annotations

from k2.sources.asx import AsxFolder
from k2.sources.base import FolderSource, Source
from k2.sources.feed import FeedSource
from k2.sources.synthetic import SyntheticSource

SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    if source.name in SOURCES:
        raise ValueError(f"source {source.name!r} is already registered")
    if isinstance(source, FolderSource) and source.continuous:
        # `k2 ingest folder` reads the files `discover` finds once and exits: as a Deployment it
        # would read the same folder again on every restart, never a live source.
        raise ValueError(f"source {source.name!r}: a folder source is read to completion (`k2 ingest folder` "
                         "exits once its files are read), so it cannot be continuous; a live source is a feed "
                         "adapter (k2.sources.feed.ADAPTERS)")
    SOURCES[source.name] = source
    return source


def folder_source(name: str) -> FolderSource:
    """The registered source `name`, which must read folders of files."""
    source = SOURCES.get(name)
    if source is None:
        raise KeyError(f"unknown source {name!r}; registered: {', '.join(SOURCES)}")
    if not isinstance(source, FolderSource):
        raise TypeError(f"source {name!r} does not read folders of files")
    return source


for _source in (AsxFolder(), SyntheticSource(), FeedSource()):
    register(_source)
