{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "conveyor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "conveyor.fullname" -}}
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

{{- define "conveyor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "conveyor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "conveyor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conveyor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conveyor.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "conveyor.secretName" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecret }}{{ else }}{{ include "conveyor.fullname" . }}{{ end }}
{{- end }}

{{- define "conveyor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "conveyor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Environment shared by APP and WORKER pods: servers, secrets, execution. */}}
{{- define "conveyor.commonEnv" -}}
- name: AP_POSTGRES_HOST
  value: {{ .Values.postgres.host | quote }}
- name: AP_POSTGRES_PORT
  value: {{ .Values.postgres.port | quote }}
- name: AP_POSTGRES_DATABASE
  value: {{ .Values.postgres.database | quote }}
- name: AP_POSTGRES_USERNAME
  value: {{ .Values.postgres.username | quote }}
- name: AP_POSTGRES_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "conveyor.secretName" . }}, key: AP_POSTGRES_PASSWORD}}
- name: AP_POSTGRES_POOL_SIZE
  value: {{ .Values.postgres.poolSize | quote }}
- name: AP_POSTGRES_USE_PGBOUNCER
  value: {{ .Values.postgres.usePgBouncer | quote }}
{{- if .Values.postgres.readReplicaUrl }}
- name: AP_POSTGRES_READ_REPLICA_URL
  value: {{ .Values.postgres.readReplicaUrl | quote }}
{{- end }}
{{- if .Values.redis.url }}
- name: AP_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- if .Values.redis.type }}
- name: AP_REDIS_TYPE
  value: {{ .Values.redis.type | quote }}
{{- end }}
{{- if .Values.redis.sentinelHosts }}
- name: AP_REDIS_SENTINEL_HOSTS
  value: {{ .Values.redis.sentinelHosts | quote }}
- name: AP_REDIS_SENTINEL_NAME
  value: {{ .Values.redis.sentinelName | quote }}
{{- end }}
- name: AP_QUEUE_SHARDS
  value: {{ .Values.redis.queueShards | quote }}
- name: AP_API_KEY
  valueFrom: {secretKeyRef: {name: {{ include "conveyor.secretName" . }}, key: AP_API_KEY}}
- name: AP_ENCRYPTION_KEY
  valueFrom: {secretKeyRef: {name: {{ include "conveyor.secretName" . }}, key: AP_ENCRYPTION_KEY}}
- name: AP_QUEUE_UI_USERNAME
  value: {{ .Values.queueUi.username | quote }}
- name: AP_QUEUE_UI_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "conveyor.secretName" . }}, key: AP_QUEUE_UI_PASSWORD}}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* Writable scratch for a read-only root filesystem: /tmp and AP_CONFIG_PATH. */}}
{{- define "conveyor.volumeMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: data, mountPath: /var/lib/conveyor}
{{- end }}

{{- define "conveyor.volumes" -}}
- {name: tmp, emptyDir: {}}
- {name: data, emptyDir: {}}
{{- end }}

{{/* Prometheus scrape annotations for a pod serving /metrics on `port`. */}}
{{- define "conveyor.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
