{{/* The release's object name: "resil" for a release called resil. */}}
{{- define "resil.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "resil.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "resil.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "resil.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "resil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "resil.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "resil.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The container's security context: uid 0 with the three capabilities the daemon needs
(nothing more: the pod's supplementalGroups put it in the socket group, so giving the socket
to that group needs no CAP_CHOWN).
*/}}
{{- define "resil.securityContext" -}}
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
  add:
    - BPF
    - NET_ADMIN
    - PERFMON
seccompProfile:
  {{- toYaml .Values.seccompProfile | nindent 2 }}
{{- with .Values.appArmorProfile }}
appArmorProfile:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.seLinuxOptions }}
seLinuxOptions:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The daemon's --metrics address, host:port with IPv6 hosts in brackets. The kubelet probes
/healthz and /readyz on the node's address, so a loopback address cannot work.
*/}}
{{- define "resil.metricsListen" -}}
{{- $host := toString .Values.metricsAddress | trimPrefix "[" | trimSuffix "]" -}}
{{- if or (hasPrefix "127." $host) (eq $host "::1") (eq $host "localhost") -}}
{{- fail (printf "metricsAddress %s is loopback: the kubelet probes /healthz and /readyz on the node's address (use 0.0.0.0, :: or the node's IP)" $host) -}}
{{- end -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int .Values.metricsPort) -}}
{{- else -}}
{{- printf "%s:%d" $host (int .Values.metricsPort) -}}
{{- end -}}
{{- end -}}

{{/*
--socket-group's value: a group id. The image has no /etc/group to look a name up in.
*/}}
{{- define "resil.socketGroup" -}}
{{- $group := .Values.socketGroup -}}
{{- if kindIs "float64" $group -}}
{{- $group = int64 $group -}}
{{- end -}}
{{- $group = toString $group -}}
{{- if not (regexMatch "^[0-9]+$" $group) -}}
{{- fail (printf "socketGroup %q must be a group id (a number): the image has no /etc/group to look a name up in" $group) -}}
{{- end -}}
{{- $group -}}
{{- end -}}

{{/*
A value that must be one of a few words, as the daemon's flag takes them. Called with
(list "name" value (list "word" …)).
*/}}
{{- define "resil.oneOf" -}}
{{- $name := index . 0 -}}
{{- $value := index . 1 -}}
{{- $words := index . 2 -}}
{{- if not (has $value $words) -}}
{{- fail (printf "%s %q must be one of: %s" $name $value (join ", " $words)) -}}
{{- end -}}
{{- $value -}}
{{- end -}}

{{/*
Which nodes a DaemonSet's pods run on (the agent's and the cleanup's alike): nodeSelector,
affinity, tolerations.
*/}}
{{- define "resil.placement" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
