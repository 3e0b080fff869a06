"""kopf handlers, thin by design: validate the spec into its model, call the domain code
(`k2.topics`, `k2.schemas`, `k2.tables`) and the pure `render` functions, apply, write status.

Importing this package registers everything with kopf's default registry; `kopf run -m
k2_operator.handlers` (what `k2 operator` and the tests' KopfRunner do) needs nothing else.
"""

from k2_operator.handlers import children, drift, pipeline, query, startup, table

__all__ = ["children", "drift", "pipeline", "query", "startup", "table"]
