{{/*
The ONE place the router config is rendered (router/config.py's format, `tokenyard router
--config`). The chart contributes listen, control and discovery; everything under
.Values.config except `storage` passes through unchanged. The store URL is not written
here: it carries the Redis password, so the router gets it as `--store $(TOKENYARD_STORE_URL)`
from a Secret (templates/router.yaml).
*/}}
{{- define "tokenyard.routerConfig" -}}
{{- $doc := dict "listen" (dict "host" "0.0.0.0" "port" (int .Values.router.port)) }}
{{- if .Values.router.control.enabled }}
{{- $control := dict "host" "0.0.0.0" "port" (int .Values.router.control.port) "tokens_dir" "/etc/tokenyard/control-tokens" }}
{{- if .Values.router.control.tlsSecret }}
{{- $_ := set $control "tls" (dict "cert_file" "/etc/tokenyard/control-tls/tls.crt" "key_file" "/etc/tokenyard/control-tls/tls.key") }}
{{- else }}
{{- $_ := set $control "allow_plaintext" true }}
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
