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
