{{/* -- Names and labels ------------------------------------------------------------- */}}

{{- define "mlflow-model-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
<release>-<chart>, or <release> when it already contains the chart's name; 63 characters
at most (a DNS label). The headless Service appends "-headless", so keep 9 spare.
*/}}
{{- define "mlflow-model-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mlflow-model-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The pods' labels that Services, the Deployment, the PDB and policies select on. */}}
{{- define "mlflow-model-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlflow-model-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Every object's labels. app.kubernetes.io/component is added by each template: "gateway",
except the headless Service ("peers"), so that a selector can tell the two Services apart.
*/}}
{{- define "mlflow-model-gateway.labels" -}}
helm.sh/chart: {{ include "mlflow-model-gateway.chart" . }}
{{ include "mlflow-model-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: model-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An object's annotations: .extra over commonAnnotations; empty when there are none. */}}
{{- define "mlflow-model-gateway.annotations" -}}
{{- with merge (dict) (.extra | default dict) (.ctx.Values.commonAnnotations | default dict) }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{- define "mlflow-model-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlflow-model-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mlflow-model-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/* -- Secrets -------------------------------------------------------------------- */}}

{{/* "true" when the chart creates the Secret itself (some value set, no existingSecret). */}}
{{- define "mlflow-model-gateway.createSecret" -}}
{{- $s := .Values.secrets }}
{{- $values := or $s.trackingToken $s.adminToken $s.webhookSecret }}
{{- if and $s.existingSecret $values }}
{{- fail "secrets.existingSecret is set: leave secrets.trackingToken, secrets.adminToken and secrets.webhookSecret empty (put them in that Secret)" }}
{{- end }}
{{- if $values }}true{{ end }}
{{- end }}

{{/* The Secret the container reads its tokens from; empty when there is none. */}}
{{- define "mlflow-model-gateway.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if include "mlflow-model-gateway.createSecret" . }}
{{- include "mlflow-model-gateway.fullname" . }}
{{- end }}
{{- end }}

{{/* -- Sizes and durations ---------------------------------------------------------- */}}

{{/*
A size in bytes (a float, printed without decimals); empty when it is not a size.
Takes the gateway's sizes (4GiB, 512MiB, 2G, 1500000; units in any case) and Kubernetes
quantities (512Mi, 1Gi, 500M).
*/}}
{{- define "mlflow-model-gateway.bytes" -}}
{{- $text := kindIs "string" . | ternary . (printf "%f" (float64 .)) | lower | replace " " "" }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $unit := trimPrefix $number $text }}
{{- $units := dict "" 1 "b" 1 "k" 1e3 "kb" 1e3 "ki" 1024 "kib" 1024 "m" 1e6 "mb" 1e6 "mi" 1048576 "mib" 1048576 "g" 1e9 "gb" 1e9 "gi" 1073741824 "gib" 1073741824 "t" 1e12 "tb" 1e12 "ti" 1099511627776 "tib" 1099511627776 }}
{{- if and $number (hasKey $units $unit) }}
{{- printf "%.0f" (mulf (float64 $number) (get $units $unit)) }}
{{- end }}
{{- end }}

{{/* A duration in seconds (90, 90s, 5m, 1h, 250ms); empty when it is not a duration. */}}
{{- define "mlflow-model-gateway.seconds" -}}
{{- $text := kindIs "string" . | ternary . (printf "%f" (float64 .)) | trim }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $unit := trimPrefix $number $text | trim }}
{{- $units := dict "" 1 "s" 1 "ms" 0.001 "m" 60 "h" 3600 }}
{{- if and $number (hasKey $units $unit) }}
{{- mulf (float64 $number) (get $units $unit) }}
{{- end }}
{{- end }}

{{/*
The container's resources: .Values.resources, with the memory limit derived when unset:
config.pool.memory_limit + memoryHeadroom, in whole MiB, also as the request unless that
is set (request = limit: the pod is not the first evicted under memory pressure).
*/}}
{{- define "mlflow-model-gateway.resources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) }}
{{- $limits := $resources.limits | default dict }}
{{- $requests := $resources.requests | default dict }}
{{- $pool := .Values.config.pool | default dict }}
{{- if and (not $limits.memory) $pool.memory_limit }}
{{- $pool_bytes := include "mlflow-model-gateway.bytes" $pool.memory_limit }}
{{- if not $pool_bytes }}
{{- fail (printf "config.pool.memory_limit: cannot derive the container's memory limit from %q; set resources.limits.memory" (toString $pool.memory_limit)) }}
{{- end }}
{{- $headroom := include "mlflow-model-gateway.bytes" .Values.memoryHeadroom }}
{{- if not $headroom }}
{{- fail (printf "memoryHeadroom: %q is not a memory quantity such as 512Mi" (toString .Values.memoryHeadroom)) }}
{{- end }}
{{- if gt (float64 $pool_bytes) 0.0 }}
{{- $memory := printf "%.0fMi" (ceil (divf (addf $pool_bytes $headroom) 1048576)) }}
{{- $_ := set $limits "memory" $memory }}
{{- if not $requests.memory }}
{{- $_ := set $requests "memory" $memory }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set $resources "limits" $limits }}
{{- $_ := set $resources "requests" $requests }}
{{- toYaml $resources }}
{{- end }}

{{/*
Fails unless terminationGracePeriodSeconds exceeds the longest drain_timeout (defaults'
and every endpoint's) plus the preStop pause: else the kubelet kills draining requests.
Durations written as ${VAR} cannot be checked here and are skipped.
*/}}
{{- define "mlflow-model-gateway.checkGracePeriod" -}}
{{- $defaults := .Values.config.defaults | default dict }}
{{- $longest := 30.0 }}
{{- $where := "the default drain_timeout (30s)" }}
{{- if hasKey $defaults "drain_timeout" }}
{{- $longest = 0.0 }}
{{- $seconds := include "mlflow-model-gateway.seconds" $defaults.drain_timeout }}
{{- if $seconds }}
{{- $longest = float64 $seconds }}
{{- $where = printf "config.defaults.drain_timeout (%v)" $defaults.drain_timeout }}
{{- end }}
{{- end }}
{{- range $i, $endpoint := .Values.config.endpoints | default list }}
{{- if and (kindIs "map" $endpoint) (hasKey $endpoint "drain_timeout") }}
{{- $seconds := include "mlflow-model-gateway.seconds" $endpoint.drain_timeout }}
{{- if and $seconds (gt (float64 $seconds) $longest) }}
{{- $longest = float64 $seconds }}
{{- $where = printf "config.endpoints[%d].drain_timeout (%v)" $i $endpoint.drain_timeout }}
{{- end }}
{{- end }}
{{- end }}
{{- $pause := .Values.lifecycle.preStopSleepSeconds | default 0 | float64 }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (addf $longest $pause) }}
{{- fail (printf "terminationGracePeriodSeconds: %v must be longer than %s plus lifecycle.preStopSleepSeconds (%vs)" .Values.terminationGracePeriodSeconds $where $pause) }}
{{- end }}
{{- end }}
