{{/*
Names, labels, images and the shared pieces every template uses. Each helper is one concept, so a
naming or labelling convention changes in one place.
*/}}

{{- define "k2.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "k2.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<component>", within the 63-character limit of DNS labels. */}}
{{- define "k2.componentName" -}}
{{- printf "%s-%s" (include "k2.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "k2.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: stable across upgrades (never add to them). */}}
{{- define "k2.selectorLabels" -}}
app.kubernetes.io/name: {{ include "k2.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. Call with (dict "root" $ "component" "operator"). */}}
{{- define "k2.labels" -}}
helm.sh/chart: {{ include "k2.chart" .root }}
{{ include "k2.selectorLabels" . }}
app.kubernetes.io/part-of: k2
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The K2 image reference (digest wins over tag). */}}
{{- define "k2.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* A third-party image reference from an {repository, tag} block. */}}
{{- define "k2.thirdPartyImage" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{- define "k2.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "k2.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces the operator watches; in namespace scope an empty list means the release namespace. */}}
{{- define "k2.watchNamespaces" -}}
{{- if .Values.operator.watchNamespaces }}
{{- toJson .Values.operator.watchNamespaces }}
{{- else if eq .Values.rbac.scope "namespace" }}
{{- toJson (list .Release.Namespace) }}
{{- else }}
{{- toJson list }}
{{- end }}
{{- end }}

{{/*
Pod and container security contexts: restricted Pod Security for everything the chart runs.
Third-party images pass `readOnlyRootFilesystem` explicitly (their entrypoints write config files).
*/}}
{{- define "k2.podSecurityContext" -}}
{{- $ctx := deepCopy .root.Values.podSecurityContext }}
{{- with .uid }}
{{- $_ := set $ctx "runAsUser" . }}
{{- $_ := set $ctx "runAsGroup" . }}
{{- $_ := set $ctx "fsGroup" . }}
{{- end }}
{{- toYaml $ctx }}
{{- end }}

{{- define "k2.containerSecurityContext" -}}
{{- $ctx := deepCopy .root.Values.containerSecurityContext }}
{{- if hasKey . "readOnlyRootFilesystem" }}
{{- $_ := set $ctx "readOnlyRootFilesystem" .readOnlyRootFilesystem }}
{{- end }}
{{- toYaml $ctx }}
{{- end }}

{{/* Common pod-spec fields for pods the chart owns. */}}
{{- define "k2.podDefaults" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
# Service links would put <SERVICE>_PORT=tcp://… into every container's env, which images that
# read their settings from env (K2, Kafka, Apicurio) could take for their own.
enableServiceLinks: false
{{- end }}

{{/* ------------------------------------------------------------------------------------------
Endpoints K2 uses, deployed or external. Each fails with the value to set when neither is given.
*/}}
{{- define "k2.kafka.bootstrap" -}}
{{- if .Values.kafka.deploy }}
{{- printf "%s.%s.svc:9092" (include "k2.componentName" (dict "root" . "component" "kafka")) .Release.Namespace }}
{{- else }}
{{- required "kafka.deploy=false needs kafka.external.bootstrap (host:port of the existing cluster)" .Values.kafka.external.bootstrap }}
{{- end }}
{{- end }}

{{- define "k2.kafka.clusterId" -}}
{{- if .Values.kafka.clusterId }}
{{- .Values.kafka.clusterId }}
{{- else }}
{{- /* 16 bytes, base64url without padding: what `kafka-storage format --cluster-id` expects. */}}
{{- printf "%.16s" (sha256sum (printf "%s/%s" .Release.Namespace .Release.Name)) | b64enc | trimSuffix "==" | replace "+" "-" | replace "/" "_" }}
{{- end }}
{{- end }}

{{- define "k2.registry.url" -}}
{{- if .Values.schemaRegistry.deploy }}
{{- printf "http://%s.%s.svc:8080/apis/ccompat/v7" (include "k2.componentName" (dict "root" . "component" "schema-registry")) .Release.Namespace }}
{{- else }}
{{- required "schemaRegistry.deploy=false needs schemaRegistry.external.url (a Confluent-compatible registry URL)" .Values.schemaRegistry.external.url }}
{{- end }}
{{- end }}

{{- define "k2.postgresql.host" -}}
{{- printf "%s.%s.svc" (include "k2.componentName" (dict "root" . "component" "postgresql")) .Release.Namespace }}
{{- end }}

{{/* Secret of the deployed PostgreSQL (keys: password), generated by the chart. */}}
{{- define "k2.postgresql.secretName" -}}
{{- include "k2.componentName" (dict "root" . "component" "postgresql") }}
{{- end }}

{{- define "k2.s3.endpoint" -}}
{{- printf "http://%s.%s.svc:9000" (include "k2.componentName" (dict "root" . "component" "s3")) .Release.Namespace }}
{{- end }}

{{/* Secret with the deployed S3 gateway's root account (keys: access-key, secret-key). */}}
{{- define "k2.s3.secretName" -}}
{{- default (include "k2.componentName" (dict "root" . "component" "s3")) .Values.s3.auth.existingSecret }}
{{- end }}

{{/*
A generated credential that survives upgrades: the value given in values (`value`, for renders
without a cluster such as Tilt or GitOps), else the one in the live Secret (`lookup` is empty
under `helm template`), else a new random one. Memoised per render, so the
Secret of a service and the catalog Secret built from it always agree.
*/}}
{{- define "k2.persistentSecretValue" -}}
{{- if not (hasKey .root.Values "__k2Generated") }}
{{- $_ := set .root.Values "__k2Generated" dict }}
{{- end }}
{{- $cache := get .root.Values "__k2Generated" }}
{{- $id := printf "%s/%s" .secret .key }}
{{- if .value }}
{{- $_ := set $cache $id .value }}
{{- else if not (hasKey $cache $id) }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $existing (hasKey $existing "data") (hasKey $existing.data .key) }}
{{- $_ := set $cache $id (index $existing.data .key | b64dec) }}
{{- else }}
{{- $_ := set $cache $id (randAlphaNum (int (default 32 .length))) }}
{{- end }}
{{- end }}
{{- get $cache $id }}
{{- end }}

{{/* ------------------------------------------------------------------------------------------
The operator's environment: `k2.settings.Settings` fields as K2_<NAME> (the defaults it hands to
workloads) and `k2_operator.config.OperatorConfig` fields as K2_OPERATOR_<NAME>. Nothing else is
K2_-prefixed; tests/unit/test_chart_settings.py keeps it that way.
*/}}
{{- define "k2.operatorEnv" -}}
{{- range $name, $value := .Values.settings }}
- name: K2_{{ upper $name }}
  value: {{ include "k2.envValue" $value | quote }}
{{- end }}
- name: K2_KAFKA_BOOTSTRAP
  value: {{ include "k2.kafka.bootstrap" . | quote }}
{{- if and (not .Values.schemaRegistry.deploy) .Values.schemaRegistry.external.existingSecret }}
- name: K2_REGISTRY_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.schemaRegistry.external.existingSecret }}
      key: {{ .Values.schemaRegistry.external.key }}
{{- /* Workloads read it from a Secret of this name in their namespace, never from a ConfigMap. */}}
- name: K2_OPERATOR_REGISTRY_SECRET_NAME
  value: {{ .Values.schemaRegistry.external.existingSecret | quote }}
- name: K2_OPERATOR_REGISTRY_SECRET_KEY
  value: {{ .Values.schemaRegistry.external.key | quote }}
{{- else }}
- name: K2_REGISTRY_URL
  value: {{ include "k2.registry.url" . | quote }}
{{- end }}
- name: K2_OPERATOR_IMAGE
  value: {{ include "k2.image" . | quote }}
- name: K2_OPERATOR_IMAGE_PULL_POLICY
  value: {{ .Values.image.pullPolicy | quote }}
- name: K2_OPERATOR_METRICS_PORT
  value: {{ .Values.operator.metricsPort | quote }}
- name: K2_OPERATOR_LIVENESS
  value: {{ printf "http://0.0.0.0:%d/healthz" (int .Values.operator.healthPort) | quote }}
{{- range $name, $value := .Values.operator.config }}
- name: K2_OPERATOR_{{ upper $name }}
  value: {{ include "k2.envValue" $value | quote }}
{{- end }}
{{- end }}

{{/* A value as env text: YAML numbers reach templates as float64, and 134217728 must not become 1.34217728e+08. */}}
{{- define "k2.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/* NetworkPolicy peers allowed to use K2's infrastructure: the release namespace + clientNamespaces. */}}
{{- define "k2.clientPeers" -}}
- podSelector: {}
{{- range .Values.networkPolicy.clientNamespaces }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . }}
{{- end }}
{{- end }}

{{/* Egress every K2 pod needs: cluster DNS. */}}
{{- define "k2.dnsEgress" -}}
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end }}
