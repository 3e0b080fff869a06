"""K2's query stage: DuckDB over the Iceberg tables.

`engine.Engine` plans and runs queries; `ticks`, `bars` and `metadata` answer the questions the
API and `k2-query` ask; `cursor` pins pages to snapshots; `cli` is the `k2-query` command.
"""
