"""Point queries answered on the event loop from what the process holds (`engine.memory_only`,
`api.offload.memory_first`), and handed to a route thread the moment they would wait on anything."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from k2.api import offload
from k2.api.app import create_app
from k2.query import bars
from k2.query.engine import Engine, WouldBlock, memory_only
from k2.query.filters import TickFilter
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY, Settings
from k2_synthetic import generate

pytestmark = pytest.mark.unit
DAY = dt.date(2014, 3, 10)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("memory-first")
    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{root}/catalog.db", warehouse=str(root / "wh"),
                        api_keys=None, api_keys_file=None, s3_endpoint=None, query_cache_mb=0)
    load_asx(settings, generate(root / "ticks", symbols=2, days=1, seed=3))
    return settings


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    # Metadata stays fresh for the test's length: what is asked of it here is what is held, not when.
    engine = Engine(settings, metadata_ttl=600, metadata_max_age=600)
    yield engine
    engine.close()


def test_each_wait_raises_under_memory_only_and_what_is_held_answers(engine: Engine) -> None:
    with memory_only(), pytest.raises(WouldBlock):
        engine.pin("trades")  # metadata never loaded: the catalog would be asked
    pin = engine.pin("trades")
    day = TickFilter(("BHP",))
    with memory_only():
        assert engine.pin("trades").snapshot_id == pin.snapshot_id
        with pytest.raises(WouldBlock):
            engine.plan(pin, day)  # manifests would be read
    scan = engine.plan(pin, day)
    with memory_only():
        assert engine.plan(pin, day).files == scan.files
        with pytest.raises(WouldBlock):
            engine.run("count", "SELECT count(*) AS n FROM {t}", {}, {"t": scan})  # DuckDB would run
        with pytest.raises(WouldBlock):
            bars.summary(engine, "BHP", DAY)  # the file's partials would be computed
    computed = bars.summary(engine, "BHP", DAY)
    with memory_only():
        assert bars.summary(engine, "BHP", DAY) == computed is not None


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2, thread_name_prefix="k2-route")
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def test_a_route_goes_to_a_thread_only_when_the_answer_is_not_held(settings, monkeypatch) -> None:
    threads = CountingExecutor()
    monkeypatch.setattr(offload, "ROUTE_THREADS", threads)
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://k2", headers={"X-API-Key": DEV_API_KEY}) as client:
        first = await client.get("/v1/summary/BHP/2014-03-10")
        assert first.status_code == 200 and threads.submitted == 1, "computing the partials waits: on a thread"
        again = await client.get("/v1/summary/BHP/2014-03-10")
        assert again.status_code == 200 and threads.submitted == 1, "held: answered on the event loop"
        assert again.json() == first.json()
        missing = await client.get("/v1/summary/BHP/2014-03-15")  # no trades that day: 404 from memory too
        assert missing.status_code == 404
    threads.shutdown()
