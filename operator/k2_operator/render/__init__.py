"""Pure functions from a custom resource (plus a `RenderContext`) to the Kubernetes objects it owns.

No clients, no clock, no environment: the handlers resolve whatever needs I/O (referenced tables,
whether the ServiceMonitor CRD exists) and pass it in, then adopt and apply what comes out.
"""

from k2_operator.render.common import Owner, RenderContext, WorkloadConfig
from k2_operator.render.pipeline import TableBinding, render_pipeline
from k2_operator.render.query import render_query
from k2_operator.render.table import render_table, table_definition

__all__ = ["Owner", "RenderContext", "TableBinding", "WorkloadConfig", "render_pipeline", "render_query",
           "render_table", "table_definition"]
