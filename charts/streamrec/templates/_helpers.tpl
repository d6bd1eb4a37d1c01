{{/*
Names, labels, images and the pod/container pieces every streamrec workload shares.
*/}}

{{- define "streamrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Object name prefix: the release name (so `helm install streamrec` gives streamrec-config,
streamrec-ingest, ... which is what streamrec/settings.py's defaults expect), or fullnameOverride.
Kept to 40 characters so every suffixed name stays a valid DNS label.
*/}}
{{- define "streamrec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "streamrec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The region this release serves; every name that depends on it is derived here.
*/}}
{{- define "streamrec.region" -}}
{{- required "region is required: install with -f charts/streamrec/values/<region>.yaml" .Values.region }}
{{- end }}

{{- define "streamrec.streamName" -}}
{{- default (printf "streamrec-clicks-%s" (include "streamrec.region" .)) .Values.data.streamName }}
{{- end }}

{{- define "streamrec.lakeUri" -}}
{{- default (printf "s3://streamrec-lake-%s" (include "streamrec.region" .)) .Values.data.lakeUri }}
{{- end }}

{{- define "streamrec.tables" -}}
{{- $r := include "streamrec.region" . -}}
leases: {{ default (printf "streamrec-ingest-leases-%s" $r) .Values.data.tables.leases | quote }}
recs: {{ default (printf "streamrec-recs-%s" $r) .Values.data.tables.recs | quote }}
features: {{ default (printf "streamrec-features-%s" $r) .Values.data.tables.features | quote }}
{{- end }}

{{/*
Redis URL: the in-cluster dev Redis when it is enabled, else cache.url (ElastiCache).
*/}}
{{- define "streamrec.redisUrl" -}}
{{- if .Values.cache.inCluster.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "streamrec.fullname" .) }}
{{- else -}}
{{- required "cache.url is required (the ElastiCache endpoint, rediss://...) unless cache.inCluster.enabled" .Values.cache.url }}
{{- end }}
{{- end }}

{{/*
Labels. Call with (dict "root" $ "component" "ingest").
*/}}
{{- define "streamrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamrec.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "streamrec.labels" -}}
helm.sh/chart: {{ include "streamrec.chart" .root }}
{{ include "streamrec.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: streamrec
streamrec.io/region: {{ include "streamrec.region" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
An image reference. Call with (dict "root" $ "image" .Values.images.app).
*/}}
{{- define "streamrec.image" -}}
{{- $registry := .root.Values.images.registry -}}
{{- $ref := printf "%s:%s" .image.repository (toString .image.tag) -}}
{{- if $registry }}{{ printf "%s/%s" (trimSuffix "/" $registry) $ref }}{{ else }}{{ $ref }}{{ end }}
{{- end }}

{{/*
ServiceAccount name of a component. Call with (dict "root" $ "component" "ingest").
*/}}
{{- define "streamrec.serviceAccountName" -}}
{{- printf "%s-%s" (include "streamrec.fullname" .root) .component }}
{{- end }}

{{/*
Restricted Pod Security: the pod part and the container part.
*/}}
{{- define "streamrec.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .gid | default 10001 }}
fsGroup: {{ .gid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "streamrec.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "streamrec.imagePullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of every streamrec process: the settings file, the secrets that override it
(env wins over the file, see streamrec/settings.py) and extraEnv.
Only STREAMREC_CONFIG and real settings may be set: an unknown STREAMREC_* name stops the process.
*/}}
{{- define "streamrec.env" -}}
- name: STREAMREC_CONFIG
  value: /etc/streamrec/streamrec.yaml
- name: STREAMREC_INGEST__PII_SALT
  valueFrom:
    secretKeyRef:
      name: {{ include "streamrec.secretName" (dict "root" . "secret" .Values.secrets.piiSalt) }}
      key: {{ .Values.secrets.piiSalt.key }}
{{- if .Values.data.warehouse.existingSecret }}
- name: STREAMREC_REGIONS__{{ include "streamrec.region" . }}__WAREHOUSE_DSN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.data.warehouse.existingSecret }}
      key: {{ .Values.data.warehouse.key }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ include "streamrec.region" . }}
{{- range .Values.extraEnv }}
- name: {{ .name }}
  value: {{ .value | quote }}
{{- end }}
{{- end }}

{{/*
The Serve API keys (Ray pods only).
*/}}
{{- define "streamrec.apiKeysEnv" -}}
{{- if or .Values.secrets.apiKeys.existingSecret (and .Values.secrets.create .Values.secrets.apiKeys.value) }}
- name: STREAMREC_SERVE__API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "streamrec.secretName" (dict "root" . "secret" .Values.secrets.apiKeys) }}
      key: {{ .Values.secrets.apiKeys.key }}
{{- end }}
{{- end }}

{{/*
A secret's name: its existingSecret, or the chart-made dev Secret when secrets.create is true.
*/}}
{{- define "streamrec.secretName" -}}
{{- if .secret.existingSecret -}}
{{- .secret.existingSecret }}
{{- else if .root.Values.secrets.create -}}
{{- printf "%s-dev-secrets" (include "streamrec.fullname" .root) }}
{{- else -}}
{{- fail "secrets.piiSalt.existingSecret is required (a Secret with the PII salt); secrets.create is for dev only" }}
{{- end }}
{{- end }}

{{- define "streamrec.configVolume" -}}
- name: config
  configMap:
    name: {{ include "streamrec.fullname" . }}-config
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end }}

{{- define "streamrec.configVolumeMounts" -}}
- name: config
  mountPath: /etc/streamrec
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
Checksum of the settings file, so a changed config rolls the pods.
*/}}
{{- define "streamrec.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/*
The memory-optimised (R5) node placement shared by Ray workers and the controller's RayJobs.
*/}}
{{- define "streamrec.r5Placement" -}}
{{- with .Values.memoryOptimizedNodes.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.memoryOptimizedNodes.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Ray pods: caches go to the writable /tmp (the root filesystem is read-only).
*/}}
{{- define "streamrec.rayEnv" -}}
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TORCH_HOME
  value: /tmp/.cache/torch
{{- end }}

{{/*
Ray Serve's front end (serving.httpFront): read by Serve's processes when they start, so it is pod env.
The same variables as ray_apps/serve/front.py (tests/charts checks that they agree).
*/}}
{{- define "streamrec.serveFrontEnv" -}}
{{- if eq .Values.serving.httpFront "haproxy" }}
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- end }}
{{- end }}

{{/*
NetworkPolicy egress to Redis: the dev Redis pod, the ElastiCache CIDRs, or any address.
*/}}
{{- define "streamrec.redisPeer" -}}
{{- if .Values.cache.inCluster.enabled }}
- podSelector:
    matchLabels:
      {{- include "streamrec.selectorLabels" (dict "root" . "component" "cache") | nindent 6 }}
{{- else }}
{{- range .Values.cache.cidrs }}
- ipBlock:
    cidr: {{ . }}
{{- end }}
{{- end }}
{{- end }}
{{- define "streamrec.redisEgress" -}}
- ports:
    - {port: 6379, protocol: TCP}
  {{- $peers := include "streamrec.redisPeer" . }}
  {{- if $peers }}
  to:
    {{- $peers | nindent 4 }}
  {{- end }}
{{- end }}
