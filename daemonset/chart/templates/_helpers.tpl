{{/* The name of every object of the release. */}}
{{- define "ambit.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The labels that select the agent's pods; they never change after install. */}}
{{- define "ambit.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The labels of every object. */}}
{{- define "ambit.labels" -}}
{{ include "ambit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/part-of: ambit
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "ambit.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/*
drainTimeout in seconds. The schema allows only a whole number with `s`, `m` or `h`, the forms the
agent's --drain-timeout reads as well.
*/}}
{{- define "ambit.drainSeconds" -}}
{{- $timeout := toString .Values.drainTimeout -}}
{{- $number := regexFind "^[0-9]+" $timeout | atoi -}}
{{- $unit := regexFind "[smh]$" $timeout -}}
{{- if eq $unit "h" -}}
{{- mul $number 3600 -}}
{{- else if eq $unit "m" -}}
{{- mul $number 60 -}}
{{- else -}}
{{- $number -}}
{{- end -}}
{{- end -}}
