{{/*
Names and labels.
*/}}
{{- define "leasehold.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{ else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "leasehold.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "leasehold.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "leasehold.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ default (include "leasehold.fullname" .) .Values.serviceAccount.name }}{{ else }}{{ default "default" .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{- define "leasehold.configMapName" -}}
{{ include "leasehold.fullname" . }}-agent
{{- end }}

{{/*
The agent's configuration (leasehold.yaml). Relative file paths go under
credentialsPath.
*/}}
{{- define "leasehold.config" -}}
{{- $secrets := list }}
{{- range .Values.secrets }}
{{- $secret := deepCopy . }}
{{- $files := list }}
{{- range .files }}
{{- $file := deepCopy . }}
{{- if not (hasPrefix "/" (toString $file.path)) }}
{{- $_ := set $file "path" (printf "%s/%s" (trimSuffix "/" $.Values.credentialsPath) $file.path) }}
{{- end }}
{{- $files = append $files $file }}
{{- end }}
{{- $_ := set $secret "files" $files }}
{{- $secrets = append $secrets $secret }}
{{- end -}}
vault:
  address: {{ required "vault.address is required" .Values.vault.address | quote }}
  {{- if .Values.vault.caSecret }}
  ca_cert: /vault/tls/{{ .Values.vault.caKey }}
  {{- end }}
  {{- with .Values.vault.namespace }}
  namespace: {{ . | quote }}
  {{- end }}
  request_timeout: {{ .Values.vault.requestTimeout | quote }}
auth:
  {{ .Values.auth.method }}:
    role: {{ required "auth.role is required" .Values.auth.role | quote }}
    mount: {{ .Values.auth.mount | default .Values.auth.method | quote }}
    token_path: /var/run/secrets/leasehold/token
secrets:
{{ toYaml $secrets | indent 2 }}
state_dir: /vault/state
startup_timeout: {{ .Values.startupTimeout | quote }}
shutdown:
  revoke: {{ .Values.shutdown.revoke }}
  timeout: {{ printf "%ds" (int .Values.shutdown.timeoutSeconds) | quote }}
telemetry:
  listen: {{ printf "0.0.0.0:%d" (int .Values.telemetry.port) | quote }}
log:
  format: {{ .Values.log.format }}
  level: {{ .Values.log.level | quote }}
{{- end }}

{{- define "leasehold.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "leasehold.agentMounts" -}}
- name: leasehold-config
  mountPath: /etc/leasehold
  readOnly: true
- name: leasehold-credentials
  mountPath: {{ .Values.credentialsPath }}
- name: leasehold-state
  mountPath: /vault/state
- name: leasehold-token
  mountPath: /var/run/secrets/leasehold
  readOnly: true
{{- if .Values.vault.caSecret }}
- name: leasehold-vault-ca
  mountPath: /vault/tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
leasehold.sidecar: the agent container. In native mode (the default) it is
meant for initContainers (restartPolicy: Always); with legacySidecar it is a
regular container. Other charts can include it, with leasehold.volumes and
leasehold.credentialsMount, to add the sidecar to their own Deployment:

  initContainers:
    {{- include "leasehold.sidecar" (dict "Values" .Values.leasehold "Release" .Release) | nindent 4 }}
*/}}
{{- define "leasehold.sidecar" -}}
- name: leasehold
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if not .Values.legacySidecar }}
  restartPolicy: Always
  {{- end }}
  args: ["agent", "-c", "/etc/leasehold/leasehold.yaml"]
  env:
    # The proxy names the pod in application_name (proxy.attribution).
    - name: POD_NAME
      valueFrom: { fieldRef: { fieldPath: metadata.name } }
    - name: POD_NAMESPACE
      valueFrom: { fieldRef: { fieldPath: metadata.namespace } }
  ports:
    - name: telemetry
      containerPort: {{ .Values.telemetry.port }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: telemetry
    periodSeconds: 1
    failureThreshold: 300
  livenessProbe:
    httpGet:
      path: /healthz
      port: telemetry
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- include "leasehold.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    {{- include "leasehold.agentMounts" . | nindent 4 }}
{{- end }}

{{/*
leasehold.initOnce: the `agent --once` init container of legacy mode.
*/}}
{{- define "leasehold.initOnce" -}}
- name: leasehold-init
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["agent", "-c", "/etc/leasehold/leasehold.yaml", "--once"]
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- include "leasehold.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    {{- include "leasehold.agentMounts" . | nindent 4 }}
{{- end }}

{{/*
leasehold.credentialsMount: the app container's read-only mount of the
credentials directory (never subPath: updates are renames).
*/}}
{{- define "leasehold.credentialsMount" -}}
- name: leasehold-credentials
  mountPath: {{ .Values.credentialsPath }}
  readOnly: true
{{- end }}

{{/*
leasehold.volumes: the pod volumes the sidecar needs. Pass "configMap" in the
context to name the agent ConfigMap when including from another chart.
*/}}
{{- define "leasehold.volumes" -}}
- name: leasehold-config
  configMap:
    name: {{ .configMap | default (include "leasehold.configMapName" .) }}
- name: leasehold-credentials
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.credentialsSizeLimit }}
- name: leasehold-state
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: leasehold-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ .Values.auth.audience | quote }}
          expirationSeconds: {{ .Values.auth.tokenExpirationSeconds }}
{{- if .Values.vault.caSecret }}
- name: leasehold-vault-ca
  secret:
    secretName: {{ .Values.vault.caSecret }}
{{- end }}
{{- end }}
