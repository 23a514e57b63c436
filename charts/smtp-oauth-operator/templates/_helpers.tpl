{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "smtp-oauth-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, with the chart name unless the release already has it. */}}
{{- define "smtp-oauth-operator.fullname" -}}
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

{{- define "smtp-oauth-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "smtp-oauth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smtp-oauth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "smtp-oauth-operator.labels" -}}
helm.sh/chart: {{ include "smtp-oauth-operator.chart" . }}
{{ include "smtp-oauth-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: smtp-oauth-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "smtp-oauth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "smtp-oauth-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "smtp-oauth-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when replicas form a hot standby through kopf peering, else "". */}}
{{- define "smtp-oauth-operator.peering" -}}
{{- if gt (int .Values.replicas) 1 }}true{{ end }}
{{- end }}

{{- define "smtp-oauth-operator.peeringName" -}}
{{- default (include "smtp-oauth-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* The operator's rules on namespaced resources: exactly the API calls it makes (docs/security.md). */}}
{{- define "smtp-oauth-operator.namespacedRules" -}}
# Watch SmtpOAuthConfigs (the operator lists, then watches; it never gets one by name).
- apiGroups: ["smtpoauth.dev"]
  resources: ["smtpoauthconfigs"]
  verbs: ["list", "watch"]
# Write the outcome: one JSON merge patch of the status subresource (never the spec or metadata).
- apiGroups: ["smtpoauth.dev"]
  resources: ["smtpoauthconfigs/status"]
  verbs: ["patch"]
# Read the referenced client secret (get) and notice rotations (list, watch: metadata only, never data).
# Never create, update or delete.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Read referenced CA bundles (get) and notice changes (list, watch).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
# Post Events on transitions (kubectl describe / kubectl events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.rbac.serviceAccountTokens }}
# Workload identity federation: short-lived tokens of the ServiceAccounts named in
# spec.identity.workloadIdentity (TokenRequest, ≤ 1 h, audience api://AzureADTokenExchange).
- apiGroups: [""]
  resources: ["serviceaccounts/token"]
  verbs: ["create"]
{{- end }}
{{- if .Values.rbac.renewSecrets }}
# Client-secret renewal (spec.identity.clientSecret.renewal): create and patch the Secret the operator
# owns ({name}-renewed). Never delete; the Secret goes with its SmtpOAuthConfig (ownerReference).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "patch"]
{{- end }}
{{- end }}

{{/* The relay's own labels: its Pods must not match the operator's selector (Service, PDB, NetworkPolicy). */}}
{{- define "smtp-oauth-operator.relayName" -}}
{{- printf "%s-relay" (include "smtp-oauth-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "smtp-oauth-operator.relaySelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-relay" (include "smtp-oauth-operator.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "smtp-oauth-operator.relayLabels" -}}
helm.sh/chart: {{ include "smtp-oauth-operator.chart" . }}
{{ include "smtp-oauth-operator.relaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: smtp-oauth-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "smtp-oauth-operator.relayTlsSecret" -}}
{{- default (printf "%s-tls" (include "smtp-oauth-operator.relayName" .)) .Values.relay.tls.secretName }}
{{- end }}

{{/* Read-only: the relay lists and watches SmtpOAuthConfigs and Secrets, gets the Secrets and ConfigMaps
a relayed configuration references. It never writes anything. */}}
{{- define "smtp-oauth-operator.relayRules" -}}
- apiGroups: ["smtpoauth.dev"]
  resources: ["smtpoauthconfigs"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
{{- end }}
