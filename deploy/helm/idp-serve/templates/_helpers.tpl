{{/*
Names and labels. Resources are named after the release ("<release>-idp-serve", or the release name alone
when it already contains the chart name), cut to the 63 characters Kubernetes allows in a label value.
*/}}
{{- define "idp-serve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "idp-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "idp-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idp-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: serving-engine
{{- end }}

{{- define "idp-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "idp-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "idp-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "idp-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The server image: image.tag, else "<appVersion>-gpu" ("-cpu" when the pod gets no GPU), the tags the
Dockerfile's targets are built with. */}}
{{- define "idp-serve.image" -}}
{{- $flavour := ternary "gpu" "cpu" (gt (int .Values.gpu.count) 0) }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavour)) }}
{{- end }}

{{/* The init container's image. Default: the server image's repository with the lab target's tag
("<appVersion>-cpu-lab"): the serving images hold the server alone, and `idp-serve prepare` needs the lab and the
package archives only the lab targets carry. With modelInit.image.repository set, its tag (none: the registry's
default). */}}
{{- define "idp-serve.modelInitImage" -}}
{{- with .Values.modelInit.image }}
{{- if .repository }}
{{- if .tag }}{{ printf "%s:%s" .repository .tag }}{{ else }}{{ .repository }}{{ end }}
{{- else }}
{{- printf "%s:%s" $.Values.image.repository (.tag | default (printf "%s-cpu-lab" $.Chart.AppVersion)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Whether the cluster serves a CRD's API ("group/version/Kind"). `helm template` knows only built-in APIs
unless given --api-versions; then the object is left out and NOTES.txt says so. */}}
{{- define "idp-serve.hasAPI" -}}
{{- if .root.Capabilities.APIVersions.Has .api }}true{{ end }}
{{- end }}

{{/* Values the chart refuses: combinations that render valid objects which then hang or never work. */}}
{{- define "idp-serve.validate" -}}
{{- $pvc := .Values.modelStorage.persistentVolumeClaim }}
{{- $chartMadeRWO := and $pvc.enabled (not $pvc.existingClaim) (has "ReadWriteOnce" $pvc.accessModes) (not (has "ReadWriteMany" $pvc.accessModes)) }}
{{- $maxReplicas := int .Values.replicaCount }}
{{- if .Values.autoscaling.enabled }}{{ $maxReplicas = int .Values.autoscaling.maxReplicas }}{{ end }}
{{- if .Values.keda.enabled }}{{ $maxReplicas = int .Values.keda.maxReplicaCount }}{{ end }}
{{- if and $chartMadeRWO (gt $maxReplicas 1) }}
{{- fail (printf "up to %d replicas cannot share the ReadWriteOnce models claim the chart creates (pods on other nodes never start): use modelStorage.persistentVolumeClaim.existingClaim with a ReadWriteMany/ReadOnlyMany claim, or one replica" $maxReplicas) }}
{{- end }}
{{- if and $chartMadeRWO (eq (default "RollingUpdate" .Values.strategy.type) "RollingUpdate") }}
{{- fail "strategy RollingUpdate with the ReadWriteOnce models claim the chart creates hangs an upgrade whose new pod lands on another node: use strategy {type: Recreate} (the default) or an existing ReadWriteMany claim" }}
{{- end }}
{{- if and .Values.keda.enabled (not .Values.serviceMonitor.enabled) (not .Values.keda.prometheus.query) }}
{{- fail "keda: the default query selects the `service` label only the chart's ServiceMonitor adds, so without it KEDA never scales: enable serviceMonitor or set keda.prometheus.query" }}
{{- end }}
{{- if and (gt (int .Values.preStopSleepSeconds) 0) (ge (int .Values.preStopSleepSeconds) (int .Values.terminationGracePeriodSeconds)) }}
{{- fail "preStopSleepSeconds must be shorter than terminationGracePeriodSeconds, which counts the preStop delay too" }}
{{- end }}
{{- end }}

{{/*
Paths inside the image, fixed by the Dockerfile (tests/test_deploy.py checks they agree): the non-root user's
home, which holds every cache the server writes (IDP_HOME, vLLM's, Triton's), and where mounted banks go.
*/}}
{{- define "idp-serve.homeDir" -}}/home/idp{{- end }}
{{- define "idp-serve.idpHome" -}}{{ include "idp-serve.homeDir" . }}/.cache/idp-serve{{- end }}
{{- define "idp-serve.banksMountPath" -}}/banks{{- end }}

{{- define "idp-serve.modelsClaimName" -}}
{{- $pvc := .Values.modelStorage.persistentVolumeClaim }}
{{- default (printf "%s-models" (include "idp-serve.fullname" .)) $pvc.existingClaim }}
{{- end }}

{{/* secretKeyRef to the API key: the chart's own Secret (apiKey.value) or an existing one; "" when none is set. */}}
{{- define "idp-serve.apiKeySecretRef" -}}
{{- if and .Values.apiKey.value .Values.apiKey.existingSecret }}
{{- fail "apiKey: set either value or existingSecret, not both" }}
{{- else if .Values.apiKey.value -}}
name: {{ include "idp-serve.fullname" . }}
key: api-key
{{- else if .Values.apiKey.existingSecret -}}
name: {{ .Values.apiKey.existingSecret }}
key: {{ .Values.apiKey.existingSecretKey }}
{{- end }}
{{- end }}

{{/* Resource requirements of the server container: resources.* plus gpu.count of gpu.resourceName in both requests
and limits (an extended resource must be requested and limited equally). */}}
{{- define "idp-serve.resources" -}}
{{- $resources := deepCopy .Values.resources }}
{{- if gt (int .Values.gpu.count) 0 }}
{{- $gpu := dict .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $resources "requests" (merge (default dict $resources.requests) $gpu) }}
{{- $_ := set $resources "limits" (merge (default dict $resources.limits) $gpu) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Volume mounts the server and the init container share: writable home (caches) and /tmp under a read-only root. */}}
{{- define "idp-serve.scratchMounts" -}}
- name: home
  mountPath: {{ include "idp-serve.homeDir" . }}
- name: tmp
  mountPath: /tmp
{{- end }}
