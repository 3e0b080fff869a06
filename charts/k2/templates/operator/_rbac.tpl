{{/*
The operator's permissions, as declared in operator/k2_operator/rbac.py (tests/unit/test_chart_rbac.py
compares them rule by rule). Split three ways:
  k2.rbac.clusterRules     CLUSTER_RULES: cluster-scoped reads kopf needs in every mode
  k2.rbac.namespacedRules  NAMESPACED_RULES without Secrets: the resources and their children
  k2.rbac.secretRules      NAMESPACED_RULES' `get secrets`, granted only per namespace, so even a
                           cluster-wide operator reads Secrets only where K2 resources live
*/}}
{{- define "k2.rbac.clusterRules" -}}
# kopf discovers the watched resources; the operator checks for the ServiceMonitor CRD
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
# kopf follows namespaces in cluster-wide mode
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}

{{- define "k2.rbac.namespacedRules" -}}
# watch the custom resources; kopf patches finalizers and its progress annotations
- apiGroups: [k2.io]
  resources: [ingestionpipelines, icebergtables, queryservices]
  verbs: [get, list, watch, patch]
# write status
- apiGroups: [k2.io]
  resources: [ingestionpipelines/status, icebergtables/status, queryservices/status]
  verbs: [get, patch]
# set ownerReferences with blockOwnerDeletion on children
- apiGroups: [k2.io]
  resources: [ingestionpipelines/finalizers, icebergtables/finalizers, queryservices/finalizers]
  verbs: [update]
# settings ConfigMaps and Services (server-side apply, prune)
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch, delete]
# post Events on the resources
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# consumer and query Deployments
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
# ingest Jobs (watched: IngestComplete follows them)
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# maintenance CronJobs
- apiGroups: [batch]
  resources: [cronjobs]
  verbs: [get, list, watch, create, patch, delete]
# PodDisruptionBudgets
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# the QueryService Ingress
- apiGroups: [networking.k8s.io]
  resources: [ingresses]
  verbs: [get, list, watch, create, patch, delete]
# ServiceMonitors, when the Prometheus Operator CRDs exist
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [get, list, create, patch, delete]
{{- end }}

{{- define "k2.rbac.leaseRules" -}}
# leader election: one active operator replica holds the Lease
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
{{- end }}

{{- define "k2.rbac.secretRules" -}}
# read catalog, registry and API key Secrets named by the resources
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}

{{/*
Namespaces that get a Role. Namespace scope: the watched namespaces (all namespaced rules).
Cluster scope: the release namespace, watchNamespaces and rbac.secretNamespaces (Secrets only).
*/}}
{{- define "k2.rbac.namespaces" -}}
{{- $watched := include "k2.watchNamespaces" . | fromJsonArray }}
{{- if eq .Values.rbac.scope "namespace" }}
{{- toJson $watched }}
{{- else }}
{{- toJson (concat (list .Release.Namespace) $watched .Values.rbac.secretNamespaces | uniq) }}
{{- end }}
{{- end }}
