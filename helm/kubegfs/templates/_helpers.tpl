{{/*
The chart name. app.kubernetes.io/name must stay "kubegfs" for the operator to find the pods, so
nameOverride changes object names only.
*/}}
{{- define "kubegfs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name (truncated to leave room for "-chunkserver-NN" suffixes and the
StatefulSet controller-revision-hash label, which needs names of at most 52 characters).
*/}}
{{- define "kubegfs.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, as used by the helm.sh/chart label. */}}
{{- define "kubegfs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "kubegfs.selectorLabels" (list . "master") */}}
{{- define "kubegfs.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: kubegfs
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Common labels of one component: include "kubegfs.labels" (list . "master") */}}
{{- define "kubegfs.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "kubegfs.chart" $root }}
{{ include "kubegfs.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: kubegfs
{{- end }}

{{/* Labels that every pod of this release carries (used by the NetworkPolicies). */}}
{{- define "kubegfs.releaseSelector" -}}
app.kubernetes.io/name: kubegfs
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Object name of one component: include "kubegfs.componentName" (list . "master") */}}
{{- define "kubegfs.componentName" -}}
{{- printf "%s-%s" (include "kubegfs.fullname" (index . 0)) (index . 1) }}
{{- end }}

{{/* Image of one component: include "kubegfs.image" (list . .Values.master.image) */}}
{{- define "kubegfs.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- $repo := $img.repository -}}
{{- if $root.Values.image.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" $root.Values.image.registry) $repo }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the shared token, and its key. */}}
{{- define "kubegfs.secretName" -}}
{{- default (printf "%s-token" (include "kubegfs.fullname" .)) .Values.auth.existingSecret }}
{{- end }}
{{- define "kubegfs.secretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}
{{/* Keys of the internal (master <-> chunkservers) and metrics tokens; "" = the client token serves */}}
{{- define "kubegfs.internalKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretInternalKey }}{{ else }}internal-token{{ end }}
{{- end }}
{{- define "kubegfs.metricsKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretMetricsKey }}{{ else }}metrics-token{{ end }}
{{- end }}
{{/* The key Prometheus reads its bearer token from */}}
{{- define "kubegfs.scrapeKey" -}}
{{- default (include "kubegfs.secretKey" .) (include "kubegfs.metricsKey" .) }}
{{- end }}
{{/* The server flags for the role tokens mounted by kubegfs.tokenVolume */}}
{{- define "kubegfs.tokenArgs" -}}
- --token-file=/etc/kubegfs/token
{{- if include "kubegfs.internalKey" . }}
- --internal-token-file=/etc/kubegfs/internal-token
{{- end }}
{{- if include "kubegfs.metricsKey" . }}
- --metrics-token-file=/etc/kubegfs/metrics-token
{{- end }}
{{- end }}

{{/* In-cluster URL of the master Service. */}}
{{- define "kubegfs.masterURL" -}}
{{- printf "%s://%s.%s.svc:%d" (include "kubegfs.scheme" .) (include "kubegfs.componentName" (list . "master")) .Release.Namespace (int .Values.master.port) }}
{{- end }}

{{/* Pod-level security context (PSS restricted). */}}
{{- define "kubegfs.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{/* Container-level security context (PSS restricted). */}}
{{- define "kubegfs.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* imagePullSecrets, if any. */}}
{{- define "kubegfs.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The token volume mounted at /etc/kubegfs (read by --token-file, --internal-token-file,
     --metrics-token-file). */}}
{{- define "kubegfs.tokenVolume" -}}
- name: token
  secret:
    secretName: {{ include "kubegfs.secretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "kubegfs.secretKey" . }}
        path: token
      {{- with include "kubegfs.internalKey" . }}
      - key: {{ . }}
        path: internal-token
      {{- end }}
      {{- with include "kubegfs.metricsKey" . }}
      - key: {{ . }}
        path: metrics-token
      {{- end }}
{{- end }}

{{/* Pod annotations: prometheus.io/* (metrics.podAnnotations) and the component's own.
     include "kubegfs.podAnnotations" (list . port .Values.master.podAnnotations) */}}
{{- define "kubegfs.podAnnotations" -}}
{{- $root := index . 0 -}}
{{- $out := dict -}}
{{- if $root.Values.metrics.podAnnotations }}
{{- $_ := set $out "prometheus.io/scrape" "true" }}
{{- $_ := set $out "prometheus.io/port" (toString (index . 1)) }}
{{- $_ := set $out "prometheus.io/path" "/metrics" }}
{{- $_ := set $out "prometheus.io/scheme" (include "kubegfs.scheme" $root) }}
{{- end }}
{{- with index . 2 }}{{ $out = merge (deepCopy .) $out }}{{ end }}
{{- with index . 3 }}{{ $out = merge $out . }}{{ end }}
{{- with $out }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress rules: DNS and (optionally) the Kubernetes API server. */}}
{{- define "kubegfs.egressDNS" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns | nindent 4 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end }}
{{- define "kubegfs.egressAPIServer" -}}
- ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
  {{- with include "kubegfs.apiServerCIDRs" . | fromJsonArray }}
  to:
    {{- range . }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  {{- end }}
{{- end }}
{{/* The API server's addresses: networkPolicy.apiServer.cidrs, else looked up at install time
     (the default/kubernetes Service's cluster IP and its endpoints, /32 or /128 each; policies
     see the endpoint after DNAT with most CNIs, the Service IP with some); [] when there is no
     cluster to ask (helm template): then any address on the ports. */}}
{{- define "kubegfs.apiServerCIDRs" -}}
{{- $out := .Values.networkPolicy.apiServer.cidrs }}
{{- if not $out }}
{{- $ips := list }}
{{- with lookup "v1" "Service" "default" "kubernetes" }}{{ $ips = concat $ips (.spec.clusterIPs | default (list .spec.clusterIP)) }}{{ end }}
{{- with lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" }}
{{- range .endpoints }}{{ $ips = concat $ips .addresses }}{{ end }}
{{- end }}
{{- range $ips | uniq }}
{{- $out = append $out (printf "%s/%s" . (ternary "128" "32" (contains ":" .))) }}
{{- end }}
{{- end }}
{{- toJson ($out | default list) }}
{{- end }}

{{/* NetworkPolicy peer: pods of one component of this release. */}}
{{- define "kubegfs.peer" -}}
- podSelector:
    matchLabels:
      {{- include "kubegfs.selectorLabels" . | nindent 6 }}
{{- end }}

{{/* ---- TLS (tls.enabled): one certificate per release, from tls.existingSecret, a cert-manager
     Certificate (tls.certManager.enabled) or generated here with the chart's own CA. */}}
{{- /* the chunkservers' data port for written pieces: plain TCP, so none with TLS */ -}}
{{- define "kubegfs.dataPort" -}}
{{- if and .Values.chunkservers.dataPort (not .Values.tls.enabled) }}{{ .Values.chunkservers.dataPort }}{{ end }}
{{- end }}
{{- define "kubegfs.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}
{{- define "kubegfs.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "kubegfs.fullname" .)) .Values.tls.existingSecret }}
{{- end }}
{{/* The one name every kubegfs certificate of the release carries and every client verifies:
     pods are reached by IP, which no certificate made before them can name (kubegfs/tls.py). */}}
{{- define "kubegfs.tlsServerName" -}}
{{- printf "%s.%s.kubegfs" (include "kubegfs.fullname" .) .Release.Namespace }}
{{- end }}
{{- define "kubegfs.tlsDNSNames" -}}
{{- $fn := include "kubegfs.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list (include "kubegfs.tlsServerName" .) }}
{{- range list "master" "operator" "metrics" }}
{{- $svc := printf "%s-%s" $fn . }}
{{- $names = concat $names (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) }}
{{- end }}
{{- $names = concat $names (list (printf "*.%s-master-headless.%s.svc" $fn $ns) (printf "*.%s-chunkserver.%s.svc" $fn $ns)) }}
{{- toJson $names }}
{{- end }}
{{/* Environment of every kubegfs process and client: serve and verify (kubegfs/tls.py). */}}
{{- define "kubegfs.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- {name: KUBEGFS_TLS_CERT, value: /etc/kubegfs/tls/tls.crt}
- {name: KUBEGFS_TLS_KEY, value: /etc/kubegfs/tls/tls.key}
- {name: KUBEGFS_CACERT, value: /etc/kubegfs/tls/ca.crt}
- {name: KUBEGFS_TLS_SERVER_NAME, value: {{ include "kubegfs.tlsServerName" . | quote }}}
{{- end }}
{{- end }}
{{/* The client side only (the helm test pod): verify, never serve. */}}
{{- define "kubegfs.tlsClientEnv" -}}
{{- if .Values.tls.enabled }}
- {name: KUBEGFS_CACERT, value: /etc/kubegfs/tls/ca.crt}
- {name: KUBEGFS_TLS_SERVER_NAME, value: {{ include "kubegfs.tlsServerName" . | quote }}}
{{- end }}
{{- end }}
{{- define "kubegfs.tlsMount" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/kubegfs/tls, readOnly: true}
{{- end }}
{{- end }}
{{- define "kubegfs.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "kubegfs.tlsSecretName" . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}
{{/* Prometheus scraping: https verified against the release's CA and name. */}}
{{- define "kubegfs.scrapeTLS" -}}
scheme: {{ include "kubegfs.scheme" . }}
{{- if .Values.tls.enabled }}
tlsConfig:
  serverName: {{ include "kubegfs.tlsServerName" . }}
  ca:
    secret:
      name: {{ include "kubegfs.tlsSecretName" . }}
      key: ca.crt
{{- end }}
{{- end }}

{{/* Annotations of the CRD-upgrade hook's objects (templates/crds/): include "kubegfs.crdHookAnnotations" "-10" */}}
{{- define "kubegfs.crdHookAnnotations" -}}
helm.sh/hook: pre-upgrade
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
