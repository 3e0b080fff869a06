"""The columnar parse and Avro encode of a folder's files, ahead of the producer, in worker processes.

A thread overlaps them with the producing loop only in part (their numpy and Arrow kernels
release the GIL, their Python does not): the ASX sample took 0.78 s with two threads, 0.67 s with
two processes, 0.90 s in one thread (medians of 7 runs on 2 cores).

Each file goes to the worker with the fewest bytes so far, which prepares its files in order,
chunk after chunk, with the same `ChunkParser` numbering the in-process path uses, and sends each
chunk at most `ahead` chunks ahead of what the main process took (the main process hands back a
credit per chunk it takes): per worker, at most `ahead` chunks sent and one being prepared,
whatever the folder holds. The main process takes the files in order and produces each chunk as
the in-process path does: the same messages, numbers, dead letters and checkpoints.

A chunk the columnar parser does not take (`NotColumnar`) ends the worker's part of its file: the
worker says which chunk and the numbering reached, and the main process goes on from there in
process, row path included.

Workers are forked when the ingest starts, before its producer exists: nothing to import again.
A worker ignores SIGTERM/SIGINT (the main process decides when to stop) and exits when the main
process closes its pipe or dies.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import count
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from k2.ingest import columnar
from k2.schemas import columnar as columnar_avro
from k2.sources.base import TickFile

_OBSERVED = ["symbol", "exchange_date", "sequence_number"]  # what the gap detector reads of a chunk
_JOIN_SECONDS = 5.0


class WorkerDied(RuntimeError):
    """An ingest worker process ended before handing over all of its files' chunks."""


@dataclass
class PreparedChunk:
    """A parsed chunk (its table reduced to what the gap detector reads) and its messages."""

    chunk: columnar.ParsedChunk
    blob: bytes | memoryview | pickle.PickleBuffer  # the messages, concatenated
    bounds: np.ndarray

    def payloads(self) -> list[bytes]:
        return columnar_avro.split(bytes(self.blob), self.bounds)  # the producer takes bytes, not views


@dataclass(frozen=True)
class Fallback:
    """The worker stopped at a chunk the columnar parser does not take: the main process goes on
    from chunk `index` (0-based), line `first_line`, with the numbering `sequences`."""

    index: int
    first_line: int
    sequences: dict[int, int]


@dataclass(frozen=True)
class FileJob:
    tick_file: TickFile
    avro_schema: dict[str, Any]
    header: bytes


class Ahead:
    """Worker processes preparing `jobs` (in order); a context manager that stops them on exit."""

    def __init__(self, jobs: list[FileJob], ingest_us: int, workers: int, ahead: int = 2) -> None:
        self.jobs = jobs
        self._next = 0
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self._owner = _assign([job.tick_file.path.stat().st_size for job in jobs], workers)
        context = multiprocessing.get_context("fork")
        try:
            for w in range(min(workers, len(jobs))):
                mine, theirs = context.Pipe()
                inherited = [conn for _, conn in self._workers] + [mine]
                mine_jobs = [job for job, owner in zip(jobs, self._owner, strict=True) if owner == w]
                process = context.Process(target=_work, name=f"k2-ingest-worker-{w}", daemon=True,
                                          args=(theirs, inherited, mine_jobs, ingest_us, ahead))
                process.start()
                theirs.close()
                self._workers.append((process, mine))
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._workers)

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chunks(self, tick_file: TickFile) -> Iterator[PreparedChunk | Fallback]:
        """The next file's chunks as its worker prepared them; ends after a `Fallback`."""
        index = self._next
        if index >= len(self.jobs) or self.jobs[index].tick_file != tick_file:
            raise AssertionError(f"{tick_file.path}: not the next file of the ingest workers")
        self._next += 1
        process, conn = self._workers[self._owner[index]]
        while True:
            of, message = self._receive(process, conn, tick_file)
            if of != tick_file:  # each file's chunks follow the previous file's end (or fallback)
                raise AssertionError(f"ingest worker sent a chunk of {of.path} for {tick_file.path}")
            if message is None:
                return
            yield message
            if isinstance(message, Fallback):
                return

    def _receive(self, process: multiprocessing.process.BaseProcess, conn: Connection,
                 tick_file: TickFile) -> tuple[TickFile, PreparedChunk | Fallback | None]:
        wait([conn, process.sentinel])
        try:
            tag, value = _load(conn)
        except (EOFError, OSError):
            process.join(_JOIN_SECONDS)
            raise WorkerDied(f"ingest worker {process.name} (pid {process.pid}) ended with exit code "
                             f"{process.exitcode} while preparing {tick_file.path}") from None
        if tag == "error":
            raise value
        if isinstance(value[1], PreparedChunk):
            try:
                conn.send(None)  # a credit: the worker may send one more chunk
            except (BrokenPipeError, ConnectionResetError):
                pass  # it has prepared all of its files and ended (if not, the next receive says so)
        return value

    def close(self) -> None:
        """Stops the workers wherever they are: closing its pipe ends a worker's loop; a worker
        that does not end soon is killed."""
        for _, conn in self._workers:
            conn.close()
        for process, _ in self._workers:
            process.join(_JOIN_SECONDS)
            if process.exitcode is None:
                process.kill()
                process.join()
        self._workers = []


def _assign(sizes: list[int], workers: int) -> list[int]:
    """Per file, its worker: the one with the fewest bytes so far, i.e. about the first one free
    (round robin could give one worker every large file)."""
    load = [0] * max(min(workers, len(sizes)), 1)
    owners = []
    for size in sizes:
        owner = load.index(min(load))
        owners.append(owner)
        load[owner] += size
    return owners


def _work(conn: Connection, inherited: list[Connection], jobs: list[FileJob], ingest_us: int, ahead: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for other in inherited:  # the main process's ends: a dead main process must close them all
        other.close()
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    credits = ahead

    def send(tag: str, value: Any) -> None:
        nonlocal credits
        chunk = tag == "chunk" and isinstance(value[1], PreparedChunk)  # the rest is small: no credit
        while chunk and not credits:
            ready = wait([conn] if sentinel is None else [conn, sentinel])
            if conn not in ready:
                raise SystemExit(0)  # the main process died
            conn.recv()  # EOFError once the main process closed the pipe
            credits += 1
        _dump(conn, (tag, value))
        credits -= chunk

    try:
        for job in jobs:
            message = None
            for message in _prepare(job, ingest_us):
                send("chunk", (job.tick_file, message))
            # the file's end; a fallback is its last message, the main process reads the rest
            if not isinstance(message, Fallback):
                send("chunk", (job.tick_file, None))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the main process stopped taking chunks
    except Exception as exc:  # noqa: BLE001 - handed to the main process, which raises it
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - one that does not travel: its traceback's text then
            exc = RuntimeError(f"ingest worker failed:\n{traceback.format_exc()}")
        try:
            send("error", exc)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return


def _prepare(job: FileJob, ingest_us: int) -> Iterator[PreparedChunk | Fallback]:
    """What `k2.ingest.pipeline` does in process for one file, up to the producer."""
    parser = columnar.ChunkParser(job.tick_file, ingest_us)
    first_line = 1
    for index, data in zip(count(), columnar.read_chunks(job.tick_file.path)):
        try:
            chunk = parser.parse(first_line, data)
        except columnar.NotColumnar:
            yield Fallback(index, first_line, parser.sequences)
            return
        blob, bounds = columnar_avro.encode_joined(chunk.table, job.avro_schema, job.header)
        yield PreparedChunk(replace(chunk, table=chunk.table.select(_OBSERVED)), pickle.PickleBuffer(blob), bounds)
        first_line += chunk.lines


# A chunk's arrays and messages (tens of MB) would cost the main process more to read from the
# pipe than to prepare: they travel out of band (pickle protocol 5) in a memfd passed along the
# pipe, which the main process maps and reads in place. The memory goes with the last view of it.

def _dump(conn: Connection, message: tuple[str, Any]) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    sizes = [buffer.raw().nbytes for buffer in buffers]
    conn.send_bytes(pickle.dumps((head, sizes)))
    if not sum(sizes):
        return
    fd = os.memfd_create("k2-ingest-chunk", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as fh:
            for buffer in buffers:
                fh.write(buffer.raw())
        reduction.send_handle(conn, fd, 0)
    finally:
        os.close(fd)


def _load(conn: Connection) -> tuple[str, Any]:
    head, sizes = pickle.loads(conn.recv_bytes())
    views = []
    if sum(sizes):
        fd = reduction.recv_handle(conn)
        try:
            whole = memoryview(mmap.mmap(fd, sum(sizes), access=mmap.ACCESS_READ))
        finally:
            os.close(fd)
        at = 0
        for size in sizes:
            views.append(whole[at:at + size])
            at += size
    return pickle.loads(head, buffers=views)
