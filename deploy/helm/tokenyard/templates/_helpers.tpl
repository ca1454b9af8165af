{{/* Names, labels and small shared pieces of the chart. */}}

{{- define "tokenyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenyard.fullname" -}}
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

{{- define "tokenyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenyard.labels" -}}
helm.sh/chart: {{ include "tokenyard.chart" . }}
app.kubernetes.io/name: {{ include "tokenyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tokenyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tokenyard.routerSelectorLabels" -}}
{{ include "tokenyard.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "tokenyard.controlPlaneSelectorLabels" -}}
{{ include "tokenyard.selectorLabels" . }}
app.kubernetes.io/component: controlplane
{{- end }}

{{- define "tokenyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tokenyard.routerServiceAccount" -}}
{{- if .Values.serviceAccount.router.create }}
{{- default (printf "%s-router" (include "tokenyard.fullname" .)) .Values.serviceAccount.router.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.router.name }}
{{- end }}
{{- end }}

{{- define "tokenyard.controlPlaneServiceAccount" -}}
{{- if .Values.serviceAccount.controlPlane.create }}
{{- default (printf "%s-controlplane" (include "tokenyard.fullname" .)) .Values.serviceAccount.controlPlane.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.controlPlane.name }}
{{- end }}
{{- end }}

{{- define "tokenyard.leaseName" -}}
{{- default (printf "%s-controlplane" (include "tokenyard.fullname" .)) .Values.controlPlane.leaderElection.leaseName }}
{{- end }}

{{- define "tokenyard.enginesNamespace" -}}
{{- default .Release.Namespace .Values.discovery.namespace }}
{{- end }}

{{- define "tokenyard.poolName" -}}
{{- printf "%s-pool-%s" (include "tokenyard.fullname" .root) .pool.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenyard.redisName" -}}
{{- printf "%s-redis" (include "tokenyard.fullname" .) }}
{{- end }}

{{- define "tokenyard.redisEnabled" -}}
{{- if or .Values.redis.bundled.enabled .Values.redis.external.url .Values.redis.external.existingSecret }}true{{ end }}
{{- end }}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "tokenyard.validate" -}}
{{- if and .Values.redis.bundled.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- fail "redis: set either redis.bundled.enabled or redis.external (url or existingSecret), not both" }}
{{- end }}
{{- if and (not (include "tokenyard.redisEnabled" .)) (or (gt (int .Values.router.replicas) 1) .Values.router.autoscaling.enabled) }}
{{- fail "redis: several router replicas share state through Redis; enable redis.bundled or set redis.external, or set router.replicas=1" }}
{{- end }}
{{- if and .Values.router.autoscaling.enabled (lt (int .Values.router.autoscaling.maxReplicas) (int .Values.router.autoscaling.minReplicas)) }}
{{- fail (printf "router.autoscaling: maxReplicas (%v) must be >= minReplicas (%v)" .Values.router.autoscaling.maxReplicas .Values.router.autoscaling.minReplicas) }}
{{- end }}
{{- if and (eq .Values.mode "endpointPicker") (gt (int .Values.router.workers) 1) }}
{{- fail "router.workers: the ext_proc endpoint picker (mode: endpointPicker) runs in one process per pod; set router.workers=1 and scale with router.replicas" }}
{{- end }}
{{- $names := dict }}
{{- range .Values.pools }}
{{- if hasKey $names .name }}
{{- fail (printf "pools: the pool name %q appears twice; each GPU type's pool needs its own name" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- end }}

{{/* pool name=Deployment name pairs the control plane may scale, comma-separated. */}}
{{- define "tokenyard.scalableDeployments" -}}
{{- $out := list }}
{{- range .Values.pools }}
{{- $out = append $out (printf "%s=%s" .name (include "tokenyard.poolName" (dict "root" $ "pool" .))) }}
{{- end }}
{{- join "," $out }}
{{- end }}
