{{/* Names and labels. */}}
{{- define "ablate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ablate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ablate.labels" -}}
app.kubernetes.io/name: {{ include "ablate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Selector labels of one component: include "ablate.selectorLabels" (dict "ctx" . "component" "scheduler") */}}
{{- define "ablate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ablate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ablate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ablate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ablate.schedulerImage" -}}
{{- printf "%s:%s" .Values.scheduler.image.repository (default .Chart.AppVersion .Values.scheduler.image.tag) -}}
{{- end -}}

{{- define "ablate.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) -}}
{{- end -}}

{{- define "ablate.schedulerAddress" -}}
{{- printf "%s-scheduler:%v" (include "ablate.fullname" .) .Values.scheduler.grpcPort -}}
{{- end -}}

{{/* The database DSN from the referenced Secret (never a value). */}}
{{- define "ablate.dbEnv" -}}
- name: ABLATE_DB
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret is required (a Secret holding the PostgreSQL DSN)" .Values.database.existingSecret }}
      key: {{ .Values.database.dsnKey }}
{{- end -}}
