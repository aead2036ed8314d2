{{/* Chart name, shortened to the 63 characters a label value allows. */}}
{{- define "lethe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: RELEASE-CHART unless the release name already contains the chart name. */}}
{{- define "lethe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lethe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lethe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lethe
{{- end }}

{{- define "lethe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lethe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lethe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lethe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name an existing ServiceAccount" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lethe.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "lethe.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{/* Release labels for the generated CRD templates; scripts/sync-chart-crds.py lists the same keys. */}}
{{- define "lethe.crdLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Command-line arguments of lethe-operator; its other settings come from the environment. */}}
{{- define "lethe.operatorArgs" -}}
{{- if not .Values.rbac.clusterWide }}
- --namespace={{ .Release.Namespace }}
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.operator.livenessPort }}/healthz
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- end }}

{{/*
Trainer and store defaults as the LETHE_* variables that lethe_operator.settings
reads. The LETHE_TRAINER_* variables after the first block carry values that
operator 0.1.0 does not read yet; NOTES.txt warns when they are set.
*/}}
{{- define "lethe.operatorEnv" -}}
- name: LETHE_TRAINER_IMAGE
  value: {{ include "lethe.trainerImage" . | quote }}
- name: LETHE_INIT_GPUS
  value: {{ .Values.trainer.gpu.count | quote }}
- name: LETHE_STORE_URI
  value: {{ .Values.store.uri | quote }}
- name: LETHE_S3_ENDPOINT_URL
  value: {{ .Values.store.s3.endpoint | quote }}
- name: LETHE_CREDENTIALS_SECRET
  value: {{ .Values.store.s3.credentialsSecret | quote }}
- name: LETHE_METRICS_PORT
  value: {{ .Values.operator.metricsPort | quote }}
- name: LETHE_TRAINER_IMAGE_PULL_POLICY
  value: {{ .Values.trainer.image.pullPolicy | quote }}
- name: LETHE_TRAINER_GPU_RESOURCE
  value: {{ .Values.trainer.gpu.resourceName | quote }}
- name: LETHE_TRAINER_NODE_SELECTOR
  value: {{ .Values.trainer.nodeSelector | toJson | quote }}
- name: LETHE_TRAINER_TOLERATIONS
  value: {{ .Values.trainer.tolerations | toJson | quote }}
- name: LETHE_TRAINER_IMAGE_PULL_SECRETS
  value: {{ .Values.trainer.imagePullSecrets | toJson | quote }}
- name: LETHE_TRAINER_SERVICE_ACCOUNT
  value: {{ .Values.trainer.serviceAccountName | quote }}
- name: LETHE_PUSHGATEWAY_URL
  value: {{ .Values.trainer.pushgatewayUrl | quote }}
{{- end }}

{{/*
RBAC rules of the operator: exactly the calls of lethe_operator (kube.py) and
kopf. docs/install.md gives the operator action behind each rule.
*/}}
{{- define "lethe.rbacRules" -}}
- apiGroups: ["lethe.dev"]
  resources: ["modellineages", "unlearnrequests"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["lethe.dev"]
  resources: ["modellineages/status", "unlearnrequests/status"]
  verbs: ["patch"]
- apiGroups: ["lethe.dev"]
  resources: ["modellineages/finalizers", "unlearnrequests/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
