{{- define "thing-operator.labels" -}}
app.kubernetes.io/name: thing-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
{{- define "thing-operator.selector" -}}
app.kubernetes.io/name: thing-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Non-empty when the Azure backend authenticates with Entra workload identity. */}}
{{- define "thing-operator.azureWorkloadIdentity" -}}
{{- if and .Values.azure.enabled (eq (.Values.azure.auth | default "connectionString") "workloadIdentity") -}}
true
{{- end -}}
{{- end }}
