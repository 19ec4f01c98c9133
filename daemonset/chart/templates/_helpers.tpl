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
A duration in seconds: drainTimeout and the certificate lifetimes. The schema allows only a whole
number with `s`, `m` or `h`, the forms the agent's and the CA's flags read as well.
*/}}
{{- define "ambit.seconds" -}}
{{- $duration := toString . -}}
{{- $number := regexFind "^[0-9]+" $duration | atoi -}}
{{- $unit := regexFind "[smh]$" $duration -}}
{{- if eq $unit "h" -}}
{{- mul $number 3600 -}}
{{- else if eq $unit "m" -}}
{{- mul $number 60 -}}
{{- else -}}
{{- $number -}}
{{- end -}}
{{- end -}}

{{/* The agent's ServiceAccount, as the CA names it in --trusted-node-accounts. */}}
{{- define "ambit.nodeAccount" -}}
{{ .Release.Namespace }}/{{ include "ambit.fullname" . }}
{{- end -}}

{{/* The name of the CA's objects: Deployment, Service, ServiceAccount, ClusterRole. */}}
{{- define "ambit.ca.fullname" -}}
{{- include "ambit.fullname" . | trunc 60 | trimSuffix "-" -}}-ca
{{- end -}}

{{/*
The labels that select the CA's pods. Their own name, so that the agents' selector
(app.kubernetes.io/name=ambit) never matches a CA pod.
*/}}
{{- define "ambit.ca.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-ca
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The labels of the CA's objects. */}}
{{- define "ambit.ca.labels" -}}
{{ include "ambit.ca.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: ca
app.kubernetes.io/part-of: ambit
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/*
The labels of a waypoint's objects (its pods are selected by gateway.networking.k8s.io/gateway-name,
as istiod's are). Not the agents' app.kubernetes.io/name, so that their selector never matches.
*/}}
{{- define "ambit.waypoint.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-waypoint
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: waypoint
app.kubernetes.io/part-of: ambit
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Where the agents reach the CA: ambit's own (ca.enabled) or ca.external.address. */}}
{{- define "ambit.ca.address" -}}
{{- if .Values.ca.enabled -}}
https://{{ include "ambit.ca.fullname" . }}.{{ .Release.Namespace }}.svc:15012
{{- else -}}
{{ .Values.ca.external.address }}
{{- end -}}
{{- end -}}

{{/*
The ConfigMap, in the release's namespace, whose `root-cert.pem` the agents authenticate the CA with
and add to their trust bundle: the one ambit's CA publishes (--root-configmap), or the one istiod
publishes in every namespace for ca.external.
*/}}
{{- define "ambit.ca.rootConfigMap" -}}
{{- if .Values.ca.enabled -}}
{{ include "ambit.ca.fullname" . }}-root-cert
{{- else -}}
{{ .Values.ca.external.rootConfigMap }}
{{- end -}}
{{- end -}}

{{/*
The combinations of CA values the schema cannot express; renders nothing, fails the render with a
message naming the values otherwise.
*/}}
{{- define "ambit.ca.check" -}}
{{- $ca := .Values.ca -}}
{{- if and $ca.enabled $ca.external.address -}}
{{- fail "ca.external.address points the agents at another CA: set ca.enabled=false as well, so that the chart does not also run ambit's CA" -}}
{{- end -}}
{{- if and (not $ca.enabled) (not $ca.external.address) -}}
{{- fail "ca.enabled=false leaves the agents without a CA: set ca.external.address (and ca.external.rootConfigMap), e.g. https://istiod.istio-system.svc:15012" -}}
{{- end -}}
{{- if $ca.rootCert -}}
{{- fail (printf "ca.rootCert is no longer read: ambit's CA publishes its roots in ConfigMap %s itself; remove the value" (include "ambit.ca.rootConfigMap" .)) -}}
{{- end -}}
{{- if and (not $ca.enabled) $ca.createRoot -}}
{{- fail "ca.createRoot is a setting of ambit's CA (ca.enabled=true); with ca.external the agents read ca.external.rootConfigMap" -}}
{{- end -}}
{{- if $ca.enabled -}}
{{- $max := include "ambit.seconds" $ca.maxTTL | atoi -}}
{{- if gt (include "ambit.seconds" $ca.defaultTTL | atoi) $max -}}
{{- fail (printf "ca.defaultTTL %s is longer than ca.maxTTL %s" $ca.defaultTTL $ca.maxTTL) -}}
{{- end -}}
{{- if gt (include "ambit.seconds" $ca.certificateTTL | atoi) $max -}}
{{- fail (printf "ca.certificateTTL %s, what the agents ask for, is longer than ca.maxTTL %s, the most the CA grants" $ca.certificateTTL $ca.maxTTL) -}}
{{- end -}}
{{- end -}}
{{- end -}}
