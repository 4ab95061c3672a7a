{{/* Chart name, truncated to 63 characters. */}}
{{- define "credential-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: the release name when it contains the chart name. */}}
{{- define "credential-broker.fullname" -}}
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

{{- define "credential-broker.injectorName" -}}
{{- printf "%s-injector" (include "credential-broker.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "credential-broker.injectorTlsSecret" -}}
{{- default (printf "%s-tls" (include "credential-broker.injectorName" .)) .Values.injector.tls.secretName -}}
{{- end -}}

{{- define "credential-broker.brokerTlsSecret" -}}
{{- default (printf "%s-tls" (include "credential-broker.fullname" .)) .Values.broker.tls.secretName -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "credential-broker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: credential-broker
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of the injector's pods (the webhook's objectSelector excludes them). */}}
{{- define "credential-broker.injectorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "credential-broker.injectorName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of the standalone broker's pods. */}}
{{- define "credential-broker.brokerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "credential-broker.fullname" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image reference: repository:tag, or repository@digest when a digest is set. */}}
{{- define "credential-broker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security context: Pod Security "restricted", the image's uid 10001. */}}
{{- define "credential-broker.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "credential-broker.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* DNS names a Service answers to inside the cluster. Argument: list of (service name, namespace). */}}
{{- define "credential-broker.serviceDnsNames" -}}
{{- $svc := index . 0 -}}{{- $ns := index . 1 -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson -}}
{{- end -}}

{{/* Fail with a clear message when the settings cannot work together. */}}
{{- define "credential-broker.validate" -}}
{{- $source := .Values.certificates.source -}}
{{- if and .Values.injector.enabled (eq $source "existing") -}}
{{- if not .Values.injector.tls.secretName -}}
{{- fail "certificates.source=existing: set injector.tls.secretName (a kubernetes.io/tls Secret for the injector)" -}}
{{- end -}}
{{- if not .Values.injector.tls.caBundle -}}
{{- fail "certificates.source=existing: set injector.tls.caBundle (base64 PEM of the CA that signed the injector's certificate)" -}}
{{- end -}}
{{- end -}}
{{- if .Values.broker.enabled -}}
{{- if and (eq $source "existing") (not .Values.broker.tls.secretName) -}}
{{- fail "certificates.source=existing: set broker.tls.secretName (a kubernetes.io/tls Secret for the broker)" -}}
{{- end -}}
{{- if and (not .Values.broker.tls.clientCASecret) (not .Values.broker.callers) -}}
{{- fail "broker.enabled: the broker listens on the cluster network and needs caller authentication: set broker.tls.clientCASecret (mutual TLS) and/or broker.callers" -}}
{{- end -}}
{{- if and (eq .Values.broker.store.backend "sqlite") (gt (int .Values.broker.replicas) 1) -}}
{{- fail "broker.store.backend=sqlite allows only broker.replicas=1 (one writer); use the postgres store for more replicas" -}}
{{- end -}}
{{- range $key := list "listen" "health_listen" "tls" "callers" "store" "keyring" "metrics" -}}
{{- if hasKey $.Values.broker.config $key -}}
{{- fail (printf "broker.config.%s is set by the chart; use the chart's broker.* values instead" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $key := list "listen" "health_listen" "keyring" "store" -}}
{{- if hasKey $.Values.sidecarConfig.config $key -}}
{{- fail (printf "sidecarConfig.config.%s is set by the chart (the injector fixes the paths)" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The standalone broker's config.yaml: broker.config plus the keys the chart owns. */}}
{{- define "credential-broker.brokerConfig" -}}
{{- $b := .Values.broker }}
{{- $config := deepCopy $b.config }}
{{- $_ := set $config "listen" (list (printf "0.0.0.0:%d" (int $b.port))) }}
{{- $_ = set $config "health_listen" (printf "0.0.0.0:%d" (int $b.healthPort)) }}
{{- $tls := dict "cert_file" "/etc/credential-broker/tls/tls.crt" "key_file" "/etc/credential-broker/tls/tls.key" }}
{{- if $b.tls.clientCASecret }}
{{- $_ = set $tls "client_ca_file" "/etc/credential-broker/client-ca/ca.crt" }}
{{- end }}
{{- $_ = set $config "tls" $tls }}
{{- if $b.callers }}
{{- $_ = set $config "callers" $b.callers }}
{{- end }}
{{- if eq $b.store.backend "postgres" }}
{{- $_ = set $config "store" (dict "backend" "postgres" "dsn_file" "/etc/credential-broker/postgres/dsn" "pool_size" (int $b.store.postgres.poolSize)) }}
{{- else }}
{{- $_ = set $config "store" (dict "backend" "sqlite" "path" "/var/lib/credential-broker/broker.db") }}
{{- end }}
{{- $_ = set $config "keyring" (dict "file" "/etc/credential-broker/keyring/keyring.json") }}
{{- if $b.metricsPort }}
{{- $_ = set $config "metrics" (dict "listen" (printf "0.0.0.0:%d" (int $b.metricsPort))) }}
{{- end }}
{{- toYaml $config }}
{{- end -}}
