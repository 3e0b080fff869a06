"""`make bench`'s operator benchmark applies resources the CRDs accept: it runs only there, so a
spec the CRDs grew stricter about (an exchange from the registry, not any name) would otherwise be
found by a failed `make bench`, not by `make test`. Checked against the models the CRDs' schemas
are generated from (`k2_operator.models`)."""

from __future__ import annotations

import pytest

from k2_operator.models import KINDS


@pytest.mark.parametrize("kind", [k.kind for k in KINDS])
def test_every_resource_the_operator_benchmark_applies_is_valid(kind: str, load_benchmark):
    bench = load_benchmark("bench_operator")
    bodies = {"IcebergTable": [bench.table("lat-0", "bench")],
              "IngestionPipeline": [bench.pipeline(f"p{i}xabc123", f"babc123p{i}") for i in range(2)],
              "QueryService": [bench.query("q-0", "warmup")]}[kind]
    model = next(k.spec for k in KINDS if k.kind == kind)
    for body in bodies:
        assert body["kind"] == kind
        model.model_validate(body["spec"])
    if kind == "IngestionPipeline":
        topics = [model.model_validate(b["spec"]).model_dump()["asset_class"] for b in bodies]
        assert len(set(topics)) == len(bodies), "each pipeline of the benchmark has topics of its own"
