{{- define "balance-exporter.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "balance-exporter.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "balance-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "balance-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "balance-exporter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "balance-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "balance-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "balance-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "balance-exporter.secretName" -}}
{{- default (include "balance-exporter.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* The exporter config: the values' config with each key's secret file filled in. */}}
{{- define "balance-exporter.config" -}}
{{- $keys := list }}
{{- range .Values.config.keys }}
{{- $key := deepCopy . }}
{{- if not (or (hasKey $key "api_secret_file") (hasKey $key "api_secret_env") (hasKey $key "api_secret")) }}
{{- $_ := set $key "api_secret_file" (printf "/etc/balance-exporter/secrets/%s" $key.name) }}
{{- end }}
{{- $keys = append $keys $key }}
{{- end }}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "keys" $keys }}
{{- toYaml $config }}
{{- end }}
