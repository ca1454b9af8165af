{{/*
The ONE place the router config is rendered (router/config.py's format, `tokenyard router
--config`). The chart contributes listen, control and discovery; everything under
.Values.config except `storage` passes through unchanged. The store URL is not written
here: it carries the Redis password, so the router gets it as `--store $(TOKENYARD_STORE_URL)`
from a Secret (templates/router.yaml).
*/}}
{{- define "tokenyard.routerConfig" -}}
{{- $doc := dict "listen" (dict "host" "0.0.0.0" "port" (int .Values.router.port) "allow_anonymous" (.Values.router.allowAnonymous | default false)) }}
{{- if .Values.router.control.enabled }}
{{- $control := dict "host" "0.0.0.0" "port" (int .Values.router.control.port) "tokens_dir" "/etc/tokenyard/control-tokens" }}
{{- if .Values.router.control.tlsSecret }}
{{- $_ := set $control "tls" (dict "cert_file" "/etc/tokenyard/control-tls/tls.crt" "key_file" "/etc/tokenyard/control-tls/tls.key") }}
{{- else }}
{{- $_ := set $control "allow_plaintext" true }}
{{- end }}
{{- with .Values.router.control.tokenReview }}
{{- if .enabled }}
{{- $_ := set $control "token_review" (dict "roles" .roles "audiences" .audiences "cache_ttl_s" .cacheTtlS) }}
{{- end }}
{{- end }}
{{- $_ := set $doc "control" $control }}
{{- end }}
{{- $k8s := dict "namespace" (include "tokenyard.enginesNamespace" .) "label_selector" .Values.discovery.labelSelector "kind" .Values.discovery.kind "port_name" .Values.discovery.portName }}
{{- $_ := set $doc "discovery" (dict "kubernetes" $k8s) }}
{{- range $key, $value := .Values.config }}
{{- if ne $key "storage" }}
{{- $_ := set $doc $key $value }}
{{- end }}
{{- end }}
{{- toYaml $doc }}
{{- end }}

{{/*
The control-plane config (router/controlplane.py's format, `tokenyard controlplane
--config`): one entry per worker pool (gpu, tp and the Deployment from pools[], price and
capacities from controlPlane.pools), the Kubernetes actuator in this namespace, metrics on
the pod's port; controlPlane.config passes through. The store URL comes from the
environment (TOKENYARD_STORE_URL, templates/controlplane.yaml): it carries the password.
*/}}
{{- define "tokenyard.controlPlaneConfig" -}}
{{- $cp := .Values.controlPlane }}
{{- $pools := list }}
{{- range .Values.pools }}
{{- $p := index $cp.pools .name | default dict }}
{{- if not $p.capacity_rps }}
{{- fail (printf "controlPlane.pools.%s: expected usd_per_hour and capacity_rps (req/s per length bucket) for pool %s; the control plane plans from them" .name .name) }}
{{- end }}
{{- $entry := dict "name" .name "gpu" .gpu "tp" (int (default $.Values.poolDefaults.tp .tp)) "deployment" (include "tokenyard.poolName" (dict "root" $ "pool" .)) }}
{{- range $k, $v := $p }}
{{- $_ := set $entry $k $v }}
{{- end }}
{{- $pools = append $pools $entry }}
{{- end }}
{{- $doc := dict "actuator" "kubernetes" "pools" $pools "leader_election" $cp.leaderElection.enabled "kubernetes" (dict "namespace" .Release.Namespace) "metrics" (dict "host" "0.0.0.0" "port" (int $cp.metricsPort)) }}
{{- range $key, $value := $cp.config }}
{{- $_ := set $doc $key $value }}
{{- end }}
{{- toYaml $doc }}
{{- end }}
