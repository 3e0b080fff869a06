"""`k2-query`: every command answers the same through the API and with --local, and `chart`
draws a candlestick PNG."""

from __future__ import annotations

import datetime as dt
import json
import os

import matplotlib.image
import pytest
from typer.testing import CliRunner

from k2.query import cli
from k2.query.bars import BarQuery
from k2.query.client import ApiSource, ClientError, LocalSource

pytestmark = [pytest.mark.integration, pytest.mark.asx]
AEDT = dt.timezone(dt.timedelta(hours=11))


@pytest.fixture
def local_env(asx_lakehouse, monkeypatch) -> None:
    """`--local` reads Settings() from the environment: exactly the shared lakehouse's settings
    (and none of the K2_* variables a stack run may have exported)."""
    for name in [n for n in os.environ if n.startswith("K2_")]:
        monkeypatch.delenv(name)
    for name, value in asx_lakehouse.settings.to_env().items():
        monkeypatch.setenv(name, value)


def test_api_and_local_sources_agree(asx_api, asx_lakehouse) -> None:
    api = ApiSource(asx_api)
    local = LocalSource(asx_lakehouse.settings, engine=asx_lakehouse.engine)
    day = dt.date(2014, 3, 11)
    query = BarQuery(("RIO",), "15m", dt.datetime(2014, 3, 11, 10, tzinfo=AEDT),
                     dt.datetime(2014, 3, 11, 12, tzinfo=AEDT))
    for call in (lambda s: s.ticks("trades", symbol="BHP", start=None, end=None, limit=10),
                 lambda s: s.ticks("quotes", symbol=None, start=query.start, end=query.end, limit=50),
                 lambda s: s.summary("DVN", day),
                 lambda s: s.bars(query),
                 lambda s: s.symbols(),
                 lambda s: s.snapshots("trades"),
                 lambda s: s.stats()):
        assert call(api) == call(local)
    for source in (api, local):
        with pytest.raises(ClientError, match="no DVN trades"):
            source.summary("DVN", dt.date(2014, 3, 15))


def test_commands_print_json_and_csv(local_env, asx_oracle) -> None:
    runner = CliRunner()
    trades = runner.invoke(cli.app, ["trades", "--symbol", "BHP", "--limit", "10", "--local", "--format", "json"])
    assert trades.exit_code == 0, trades.output
    rows = json.loads(trades.stdout)
    assert [r["sequence_number"] for r in rows] == list(range(1, 11))

    summary = runner.invoke(cli.app, ["summary", "DVN", "2014-03-10", "--local", "-f", "json"])
    assert json.loads(summary.stdout) == [asx_oracle.summary("DVN", dt.date(2014, 3, 10))]

    bars = runner.invoke(cli.app, ["bars", "BHP", "--interval", "5m", "--start", "2014-03-10T10:00",
                                   "--end", "2014-03-10T10:30", "--local", "-f", "csv"])
    lines = bars.stdout.strip().splitlines()
    assert lines[0] == "symbol,bucket_start,bucket_end,open,high,low,close,volume,trade_count,vwap"
    assert len(lines) == 7 and lines[1].startswith("BHP,2014-03-09T23:00:00Z,")

    for command in (["symbols"], ["snapshots", "--table", "quotes"], ["stats"], ["quotes", "--symbol", "RIO"]):
        result = runner.invoke(cli.app, [*command, "--local"])
        assert result.exit_code == 0, (command, result.output)


def test_errors_exit_non_zero(local_env) -> None:
    result = CliRunner().invoke(cli.app, ["summary", "BHP", "2014-03-16", "--local"])
    assert result.exit_code == 1
    assert "no BHP trades" in result.output


def test_chart_draws_candles_and_volume(local_env, tmp_path) -> None:
    out = tmp_path / "bhp.png"
    result = CliRunner().invoke(cli.app, ["chart", "BHP", "2014-03-10", "--interval", "5m", "-o", str(out), "--local"])
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width > 1000 and height > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas
