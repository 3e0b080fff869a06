"""K2's Kubernetes operator: IngestionPipeline, IcebergTable and QueryService reconciled by kopf.

`models` is the one description of the custom resources (the CRDs are generated from it),
`render` turns them into child manifests without I/O, `handlers` are the thin kopf layer and
`main.run` starts it all (`k2 operator`).
"""

from k2_operator.models import API_VERSION, GROUP, VERSION

__all__ = ["API_VERSION", "GROUP", "VERSION"]
