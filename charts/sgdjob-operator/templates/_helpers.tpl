{{/* Names, labels and images shared by every template of the chart. */}}

{{- define "sgdjob-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name, suffixed with the chart name unless it has it. */}}
{{- define "sgdjob-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sgdjob-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sgdjob-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sgdjob-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sgdjob-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sgdjob
{{- end -}}

{{- define "sgdjob-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sgdjob-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sgdjob-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sgdjob-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) -}}
{{- end -}}

{{/* Namespaces that hold SGDJob pods and get NetworkPolicies, one per line. */}}
{{- define "sgdjob-operator.jobNamespaces" -}}
{{- $list := .Values.watchNamespaces -}}
{{- if not $list -}}
{{- $list = .Values.networkPolicy.namespaces | default (list .Release.Namespace) -}}
{{- end -}}
{{- range $list }}
{{ . }}
{{- end -}}
{{- end -}}
