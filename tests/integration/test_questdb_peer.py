"""The peer benchmark's equality check: QuestDB, loaded over ILP with the same ticks, answers K2's
four questions (daily summary with VWAP, 1-minute OHLCV, a page of trades, trades ASOF JOINed to
quotes) with exactly K2's figures, over both its PG wire and its HTTP /exec; and the check fails
when one engine holds one trade more. Starts QuestDB (k2.stack.questdb; its jar is downloaded from
Maven Central once, then cached)."""

from __future__ import annotations

import datetime as dt

import psycopg2
import pytest

from k2.stack import questdb_peer as peer
from k2.stack.questdb import QuestDB

pytestmark = [pytest.mark.integration, pytest.mark.asx, pytest.mark.peers]
SYMBOL, DAY = "BHP", dt.date(2014, 3, 12)


@pytest.fixture(scope="module")
def questdb(stack) -> QuestDB:
    return stack.ensure(QuestDB())


@pytest.fixture
def loaded(questdb: QuestDB, asx_lakehouse, unique: str) -> tuple[str, str]:
    names = f"trades_{unique.replace('-', '_')}", f"quotes_{unique.replace('-', '_')}"
    for name, kind in zip(names, ("trades", "quotes"), strict=True):
        rows = peer.read_ticks(asx_lakehouse.settings, kind, SYMBOL, DAY)
        assert peer.load(questdb, name, kind, rows).rows == len(rows) > 1000
    return names


def test_questdb_gives_k2s_figures_for_one_symbol_day(questdb: QuestDB, asx_lakehouse, loaded) -> None:
    with psycopg2.connect(questdb.pg_dsn) as conn, conn.cursor() as cursor:
        for question in peer.questions(SYMBOL, DAY, *loaded):
            k2 = peer.k2_rows(peer.k2_answer(asx_lakehouse.engine, question, SYMBOL, DAY), question.figures)
            cursor.execute(question.questdb_sql)
            peer.assert_same(question.name, k2, peer.pg_rows(cursor.fetchall()), "QuestDB PG")
            peer.assert_same(question.name, k2, peer.http_rows(questdb.exec(question.questdb_sql)), "QuestDB HTTP")
            assert k2 and all(v is not None for v in k2[0][:4]), question.name
    _, bars, _, asof = peer.questions(SYMBOL, DAY, *loaded)
    assert len(peer.http_rows(questdb.exec(bars.questdb_sql))) > 300  # a whole trading day of minutes
    quoted = peer.http_rows(questdb.exec(asof.questdb_sql))
    assert any(row[4] is not None for row in quoted), "no trade met a quote: the join compared only nulls"


def test_one_extra_trade_is_a_mismatch(questdb: QuestDB, asx_lakehouse, loaded) -> None:
    trades, _ = loaded
    extra = peer.read_ticks(asx_lakehouse.settings, "trades", SYMBOL, DAY)[-1]
    extra = {**extra, "sequence_number": extra["sequence_number"] + 1}
    peer.load(questdb, trades, "trades", [extra])
    summary = peer.questions(SYMBOL, DAY, *loaded)[0]
    k2 = peer.k2_rows(peer.k2_answer(asx_lakehouse.engine, summary, SYMBOL, DAY), summary.figures)
    with pytest.raises(peer.Mismatch, match="differs"):
        peer.assert_same(summary.name, k2, peer.http_rows(questdb.exec(summary.questdb_sql)), "QuestDB HTTP")
