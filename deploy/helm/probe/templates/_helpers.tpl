{{/* Name of every object: the release name, so two releases do not collide. */}}
{{- define "probe.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "probe.selectorLabels" -}}
app.kubernetes.io/name: probe
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "probe.labels" -}}
{{ include "probe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The port number of metrics.address ("HOST:PORT"). */}}
{{- define "probe.metricsPort" -}}
{{- splitList ":" .Values.metrics.address | last -}}
{{- end -}}

{{/* OTEL_RESOURCE_ATTRIBUTES: the node name, then resourceAttributes. */}}
{{- define "probe.resourceAttributes" -}}
{{- $pairs := list "k8s.node.name=$(K8S_NODE_NAME)" -}}
{{- range $key, $value := .Values.resourceAttributes -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
