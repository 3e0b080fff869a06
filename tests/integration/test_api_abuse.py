"""The API under abuse, against a real `k2 api` process (uvicorn, as deployed) over a real lakehouse.

Oversized bodies are refused before they are read; slow and stalled clients are cut off; one key's
flood leaves other keys served; an export of the whole ASX sample streams in bounded memory.
Clients here are raw sockets where an HTTP library would behave too well to show the abuse.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest
from pydantic import SecretStr
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from k2.api.auth import Entitlement, document
from k2.query import metadata
from k2.settings import Settings
from k2.stack.base import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
KEY_A, KEY_B = "key-a-flooding", "key-b-patient"
KEYS = SecretStr(document([Entitlement.of("a", KEY_A, stream=True), Entitlement.of("b", KEY_B, stream=True)]))
PATIENCE = 60.0  # how long a test waits for what must happen; never how long it should take
TRADES_QUERY = "/v1/trades/query"


class Api:
    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"

    def connect(self, *, receive_buffer: int | None = None) -> socket.socket:
        sock = socket.socket()
        if receive_buffer is not None:  # before connect, so the TCP window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(PATIENCE)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def cut(self, reason: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=PATIENCE).text
        line = f'k2_http_connections_cut_total{{reason="{reason}"}} '
        return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)

    def peak_rss(self) -> int:
        """Peak resident memory of the server since the last `reset_peak`, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")


@contextmanager
def serve(settings: Settings, **overrides: object) -> Iterator[Api]:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")},
           **settings.model_copy(update={"api_keys": KEYS, "log_level": "WARNING", **overrides}).to_env()}
    # The log goes to a file, not a pipe: a pipe nobody drains would block the server.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([str(BIN / "k2"), "api", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            yield _healthy(Api(process, port), log)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.seek(0)
            print(log.read()[-4000:])  # shown by pytest when a test fails


def _healthy(api: Api, log: IO[str]) -> Api:
    deadline = time.monotonic() + PATIENCE
    while True:
        if api.process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"k2 api exited: {log.read()[-4000:]}")
        try:
            if httpx.get(f"{api.url}/health", timeout=5).status_code == 200:
                return api
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "k2 api did not become healthy"
        time.sleep(0.2)


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def request_head(method: str, path: str, key: str | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: k2"]
    if key is not None:
        lines.append(f"X-API-Key: {key}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def export_request(symbols: list[str], key: str) -> bytes:
    body = json.dumps({"symbols": symbols}).encode()
    return request_head("POST", TRADES_QUERY, key, Content_Type="application/json",
                        Content_Length=str(len(body))) + body


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def drain(sock: socket.socket) -> bytes:
    """Everything until the connection ends, whether closed or reset."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_status_line(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, "connection closed before a status line"
        data += chunk
    return int(data.split()[1])


def assert_error(body: bytes, status: int, code: str) -> dict:
    error = json.loads(body)["error"]
    assert (error["status"], error["code"]) == (status, code), error
    assert error["message"]
    return error


def all_symbols(lakehouse) -> list[str]:
    return sorted(metadata.symbols(lakehouse.engine).column("symbol").to_pylist())


@pytest.fixture(scope="module")
def symbols(synthetic_lakehouse) -> list[str]:
    return all_symbols(synthetic_lakehouse)


@pytest.fixture(scope="module")
def api(synthetic_lakehouse) -> Iterator[Api]:
    with serve(synthetic_lakehouse.settings, max_body_bytes=4096, request_timeout_seconds=1.5,
               write_timeout_seconds=1.5, key_concurrency=2) as running:
        yield running


# bodies -------------------------------------------------------------------------------------------
def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(api: Api) -> None:
    with api.connect() as sock:
        # 10 GiB declared, not a byte of it sent: only a server that refuses on the header answers.
        sock.sendall(request_head("POST", TRADES_QUERY, KEY_A, Content_Type="application/json",
                                  Content_Length=str(10 * 2**30)))
        status, body = read_response(sock)
    assert status == 413
    assert "4096 bytes" in assert_error(body, 413, "body_too_large")["message"]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(api: Api) -> None:
    chunk = b'{"symbols": ["BHP"' + b" " * 1000  # valid JSON so far: only its size is wrong
    with api.connect() as sock:
        sock.sendall(request_head("POST", TRADES_QUERY, KEY_A, Content_Type="application/json",
                                  Transfer_Encoding="chunked"))
        # Just past the limit, and the body never ends: only a server counting as it reads answers 413.
        for _ in range(5):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, body = read_response(sock)
    assert status == 413
    assert_error(body, 413, "body_too_large")


def test_a_body_within_the_limit_is_served(api: Api) -> None:
    response = httpx.post(f"{api.url}{TRADES_QUERY}", headers={"X-API-Key": KEY_B},
                          json={"symbols": ["BHP"], "limit": 5}, timeout=PATIENCE)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 5


# slow clients -------------------------------------------------------------------------------------
def _trickle(sock: socket.socket, pieces: Iterator[bytes]) -> tuple[int, bytes]:
    """Send a piece every 0.2 s until the server answers (or closes); then its answer."""
    for piece in pieces:
        if select.select([sock], [], [], 0.2)[0]:
            break
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
    return read_response(sock)


def _forever(piece: bytes) -> Iterator[bytes]:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        yield piece


def test_headers_sent_slowly_are_cut_off(api: Api) -> None:
    before = api.cut("request_timeout")
    with api.connect() as sock:
        sock.sendall(b"GET /v1/symbols HTTP/1.1\r\nHost: k2\r\n")
        status, body = _trickle(sock, _forever(b"X-Slow: 1\r\n"))  # a header line never ends the headers
    assert status == 408
    assert_error(body, 408, "request_timeout")
    assert api.cut("request_timeout") == before + 1


def test_a_body_sent_slowly_is_cut_off(api: Api) -> None:
    with api.connect() as sock:
        sock.sendall(request_head("POST", TRADES_QUERY, KEY_A, Content_Type="application/json",
                                  Content_Length="4000"))
        status, body = _trickle(sock, _forever(b" "))
    assert status == 408
    assert_error(body, 408, "request_timeout")


def test_a_connection_that_sends_nothing_is_closed(api: Api) -> None:
    with api.connect() as sock:
        status, _ = read_response(sock)  # the test's socket timeout is far longer than the server's
    assert status == 408


def test_a_client_that_stops_reading_is_disconnected_and_frees_its_slots(api: Api, symbols: list[str]) -> None:
    before = api.cut("write_timeout")
    # Two stalled exports take both of key A's slots; each must be cut for A to be served again.
    stalled = [api.connect(receive_buffer=4096) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(export_request(symbols, KEY_A))
        wait_for(lambda: api.cut("write_timeout") >= before + 2, "the server to cut both stalled clients")
        for sock in stalled:
            # What was buffered before the cut arrives, then the end; never the final (empty) chunk.
            assert not drain(sock).endswith(b"\r\n0\r\n\r\n"), "the whole response arrived: nothing was cut"
    finally:
        for sock in stalled:
            sock.close()
    # The server frees a slot once it sees the client gone: soon after the cut, not at once.
    wait_for(lambda: httpx.post(f"{api.url}{TRADES_QUERY}", headers={"X-API-Key": KEY_A},
                                json={"symbols": symbols[:1], "limit": 1}, timeout=PATIENCE).status_code == 200,
             "key A to be served again")


def test_a_websocket_outlives_the_request_deadline(api: Api) -> None:
    # Quiet for twice the deadline while the server waits for the key as the first message: a
    # WebSocket is past its request, so only its own protocol may end it (here: the wrong key, 1008).
    with ws_connect(api.url.replace("http", "ws") + "/v1/stream/trades", open_timeout=PATIENCE) as ws:
        time.sleep(3)
        ws.send(json.dumps({"api_key": "not-a-key"}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=PATIENCE)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, closed.value
    assert "unauthorized" in closed.value.rcvd.reason


# one key's flood ----------------------------------------------------------------------------------
def test_one_keys_flood_does_not_starve_another_key(synthetic_lakehouse, symbols: list[str]) -> None:
    # Stalled clients are never cut here: key A's slots stay taken for the whole test.
    with serve(synthetic_lakehouse.settings, key_concurrency=2, write_timeout_seconds=3600) as api:
        held = [api.connect(receive_buffer=4096) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(export_request(symbols, KEY_A))
                assert read_status_line(sock) == 200  # the export runs, holding a slot, unread

            def ask(key: str) -> httpx.Response:
                return httpx.get(f"{api.url}/v1/trades", params={"symbol": symbols[0], "limit": 10},
                                 headers={"X-API-Key": key}, timeout=PATIENCE)

            with ThreadPoolExecutor(9) as pool:  # A floods from 8 threads while B asks, one at a time
                asking = pool.submit(lambda: [ask(KEY_B) for _ in range(10)])
                flood = list(pool.map(ask, [KEY_A] * 40))
                patient = asking.result()
            assert {r.status_code for r in flood} == {429}
            assert_error(flood[0].content, 429, "too_many_concurrent_requests")
            assert flood[0].headers["Retry-After"] == "1"
            assert [r.status_code for r in patient] == [200] * 10
            assert all(len(r.json()["data"]) == 10 for r in patient)
        finally:
            for sock in held:
                sock.close()
        # A client gone frees its slot: key A is served again.
        wait_for(lambda: ask(KEY_A).status_code == 200, "key A's slots to be released")


# huge ranges --------------------------------------------------------------------------------------
@pytest.mark.asx
def test_an_export_of_the_whole_sample_streams_in_bounded_memory(asx_lakehouse) -> None:
    with serve(asx_lakehouse.settings, query_cache_mb=0, query_threads=1) as api:
        symbols = all_symbols(asx_lakehouse)
        headers = {"X-API-Key": KEY_A}
        warm = httpx.post(f"{api.url}{TRADES_QUERY}", headers=headers, json={"symbols": symbols, "limit": 70_000},
                          timeout=PATIENCE)
        assert warm.status_code == 200
        api.reset_peak()
        baseline = api.peak_rss()
        received = rows = 0
        needle, tail = b'{"symbol":', b""  # one per row, in the default (JSON) format
        with httpx.stream("POST", f"{api.url}{TRADES_QUERY}", headers=headers,
                          json={"symbols": symbols}, timeout=PATIENCE) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += len(chunk)
                window = tail + chunk
                rows += window.count(needle)
                tail = window[-(len(needle) - 1):]
        growth = api.peak_rss() - baseline
    assert rows == metadata.table_stats(asx_lakehouse.engine, "trades").rows
    print(f"streamed {received / 2**20:.0f} MiB, {rows} rows; server peak RSS grew {growth / 2**20:.0f} MiB")
    # Held whole, an export costs at least its size (its JSON text alone); with 65,536-row chunks it cost
    # 1.75 times it. Streamed in bounded chunks, a small part (DuckDB's sort, a chunk or two): 0.3 times.
    # One DuckDB thread: sort buffers per thread would make the figure vary with the core count.
    assert growth < 0.75 * received, f"peak RSS grew {growth / 2**20:.0f} MiB for a {received / 2**20:.0f} MiB export"
