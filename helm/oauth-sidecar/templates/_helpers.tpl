{{/*
Named templates. The ones meant for your own workloads:

  oauth-sidecar.inject          a pod spec with the sidecar added (as a container, or as a native
                                sidecar init container), its volumes, and fsGroup when unset.
  oauth-sidecar.podLabels       labels the PodMonitor selects; add them to your pod template.
  oauth-sidecar.podAnnotations  a config checksum, so a config change rolls the pods.

In this chart (templates/example-deployment.yaml):
    spec:
      {{- include "oauth-sidecar.inject" (dict "root" . "podSpec" $podSpec) | nindent 6 }}
From a chart that has this one as a dependency, pass the subchart's context as "root":
    {{- $sidecar := index .Subcharts "oauth-sidecar" }}
    spec:
      {{- include "oauth-sidecar.inject" (dict "root" $sidecar "podSpec" $podSpec) | nindent 6 }}
$podSpec is a dict, for example `include "myapp.podSpec" . | fromYaml`.
*/}}

{{- define "oauth-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oauth-sidecar.fullname" -}}
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

{{- define "oauth-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oauth-sidecar.labels" -}}
helm.sh/chart: {{ include "oauth-sidecar.chart" . }}
{{ include "oauth-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "oauth-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oauth-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "oauth-sidecar.configMapName" -}}
{{- include "oauth-sidecar.fullname" . }}-config
{{- end }}

{{- define "oauth-sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where things live inside the sidecar container. The image's CMD uses the same config path. */}}
{{- define "oauth-sidecar.configDir" -}}/etc/sidecar{{- end }}
{{- define "oauth-sidecar.stateDir" -}}/var/lib/sidecar{{- end }}
{{- define "oauth-sidecar.secretsDir" -}}/etc/sidecar-secrets{{- end }}

{{/*
The Secret-backed files the sidecar reads, as a list of
{volume, secret, key, dir, file, tomlKey}; the config, the volumes and the mounts all derive
from this one list, so they cannot disagree.
*/}}
{{- define "oauth-sidecar.secretFiles" -}}
{{- $dir := include "oauth-sidecar.secretsDir" . }}
{{- $files := list }}
{{- with .Values.store.keysSecretRef }}
{{- $files = append $files (dict "volume" "oauth-sidecar-store-keys" "secret" .name "key" .key "dir" (printf "%s/store-keys" $dir) "file" "keys") }}
{{- end }}
{{- if eq .Values.store.backend "postgres" }}
{{- with .Values.store.postgres.urlSecretRef }}
{{- $files = append $files (dict "volume" "oauth-sidecar-store-url" "secret" .name "key" .key "dir" (printf "%s/store-url" $dir) "file" "url") }}
{{- end }}
{{- end }}
{{- if .Values.admin.tokenSecretRef.name }}
{{- with .Values.admin.tokenSecretRef }}
{{- $files = append $files (dict "volume" "oauth-sidecar-admin-token" "secret" .name "key" .key "dir" (printf "%s/admin-token" $dir) "file" "token") }}
{{- end }}
{{- end }}
{{- range $i, $p := .Values.config.providers }}
{{- with $p.clientSecretRef }}
{{- $files = append $files (dict "volume" (printf "oauth-sidecar-client-%d" $i) "secret" .name "key" .key "dir" (printf "%s/client-%d" $dir $i) "file" "client-secret") }}
{{- end }}
{{- with $p.privateKeySecretRef }}
{{- $files = append $files (dict "volume" (printf "oauth-sidecar-signing-%d" $i) "secret" .name "key" .key "dir" (printf "%s/signing-%d" $dir $i) "file" "private-key.pem") }}
{{- end }}
{{- end }}
{{- toYaml (dict "files" $files) }}
{{- end }}

{{/*
A values table as TOML `key = value` lines: the sidecar's keys pass through verbatim, so the
chart needs no change when the sidecar learns a setting. Keys in camelCase (the chart's own,
such as clientSecretRef) and null values are left out; nested tables become inline tables.
*/}}
{{- define "oauth-sidecar.tomlTable" -}}
{{- range $key, $value := . }}
{{- if and (not (kindIs "invalid" $value)) (regexMatch "^[a-z0-9_]+$" $key) }}
{{ $key }} = {{ include "oauth-sidecar.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}

{{- define "oauth-sidecar.tomlValue" -}}
{{- if kindIs "map" . }}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- if not (kindIs "invalid" $v) }}
{{- $pairs = append $pairs (printf "%s = %s" (include "oauth-sidecar.tomlKey" $k) (include "oauth-sidecar.tomlValue" $v)) }}
{{- end }}
{{- end }}
{{- if $pairs }}{ {{ join ", " $pairs }} }{{ else }}{}{{ end }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "oauth-sidecar.tomlValue" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- /* Strings, numbers and booleans: JSON's spelling is TOML's (an integral number has no
       decimal point, so integer settings stay integers). */}}
{{- toJson . }}
{{- end }}
{{- end }}

{{- define "oauth-sidecar.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* Fail early on mistakes a JSON schema cannot express; the sidecar would reject them too. */}}
{{- define "oauth-sidecar.validate" -}}
{{- $providers := list }}
{{- range .Values.config.providers }}
{{- if has .name $providers }}
{{- fail (printf "config.providers: duplicate provider name %q" .name) }}
{{- end }}
{{- $providers = append $providers .name }}
{{- end }}
{{- $ports := list (int .Values.admin.port) }}
{{- $names := list }}
{{- range $i, $u := .Values.config.upstreams }}
{{- if not (has $u.provider $providers) }}
{{- fail (printf "config.upstreams[%d].provider: no provider named %q" $i $u.provider) }}
{{- end }}
{{- if has (int $u.port) $ports }}
{{- fail (printf "config.upstreams[%d].port: %d is already used (admin.port or another upstream)" $i (int $u.port)) }}
{{- end }}
{{- if has $u.name $names }}
{{- fail (printf "config.upstreams[%d].name: duplicate upstream name %q" $i $u.name) }}
{{- end }}
{{- $ports = append $ports (int $u.port) }}
{{- $names = append $names $u.name }}
{{- end }}
{{- end }}

{{/* The sidecar's config.toml. */}}
{{- define "oauth-sidecar.configToml" -}}
{{- include "oauth-sidecar.validate" . }}
{{- $secrets := dict }}
{{- range (include "oauth-sidecar.secretFiles" . | fromYaml).files }}
{{- $_ := set $secrets .volume (printf "%s/%s" .dir .file) }}
{{- end -}}
# Rendered by the oauth-sidecar Helm chart from its values: change the values, not this file.

[store]
{{- if eq .Values.store.backend "postgres" }}
url_file = {{ get $secrets "oauth-sidecar-store-url" | toJson }}
{{- else }}
url = {{ printf "sqlite://%s/tokens.db" (include "oauth-sidecar.stateDir" .) | toJson }}
{{- end }}
key_file = {{ get $secrets "oauth-sidecar-store-keys" | toJson }}

[admin]
listen = {{ printf "%s:%d" (include "oauth-sidecar.hostPort" .Values.admin.host) (int .Values.admin.port) | toJson }}
# On the pod IP: the kubelet's probes and Prometheus connect from outside the pod.
allow_non_loopback = true
{{- if .Values.admin.tokenSecretRef.name }}
token_file = {{ get $secrets "oauth-sidecar-admin-token" | toJson }}
{{- end }}

[sidecar]
{{- include "oauth-sidecar.tomlTable" .Values.config.sidecar }}
{{- range $i, $p := .Values.config.providers }}

[[provider]]
{{- include "oauth-sidecar.tomlTable" (pick $p "name") }}
{{- include "oauth-sidecar.tomlTable" (omit $p "name") }}
{{- if $p.clientSecretRef }}
client_secret_file = {{ get $secrets (printf "oauth-sidecar-client-%d" $i) | toJson }}
{{- end }}
{{- if $p.privateKeySecretRef }}
private_key_file = {{ get $secrets (printf "oauth-sidecar-signing-%d" $i) | toJson }}
{{- end }}
{{- end }}
{{- range .Values.config.upstreams }}

[[upstream]]
{{- include "oauth-sidecar.tomlTable" (pick . "name") }}
listen = {{ printf "127.0.0.1:%d" (int .port) | toJson }}
{{- include "oauth-sidecar.tomlTable" (omit . "name" "port") }}
{{- end }}
{{- with .Values.config.notify }}

[notify]
{{- include "oauth-sidecar.tomlTable" . }}
{{- end }}
{{ end }}

{{/* An IPv6 address needs brackets in host:port. */}}
{{- define "oauth-sidecar.hostPort" -}}
{{- if contains ":" . }}{{ printf "[%s]" . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{- define "oauth-sidecar.podLabels" -}}
oauth-sidecar/release: {{ include "oauth-sidecar.fullname" . }}
{{- end }}

{{- define "oauth-sidecar.podAnnotations" -}}
checksum/oauth-sidecar-config: {{ include "oauth-sidecar.configToml" . | sha256sum }}
{{- end }}

{{/* The sidecar container (a mapping). */}}
{{- define "oauth-sidecar.container" -}}
name: oauth-sidecar
image: {{ include "oauth-sidecar.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["run", "--config", "{{ include "oauth-sidecar.configDir" . }}/config.toml"]
{{- if .Values.nativeSidecar.enabled }}
# A restartable init container: a Kubernetes 1.29+ native sidecar.
restartPolicy: Always
{{- end }}
ports:
  - name: sidecar-admin
    containerPort: {{ int .Values.admin.port }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /healthz
    port: sidecar-admin
  {{- toYaml .Values.probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: sidecar-admin
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: sidecar-admin
  {{- toYaml .Values.probes.readiness | nindent 2 }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: oauth-sidecar-config
    mountPath: {{ include "oauth-sidecar.configDir" . }}
    readOnly: true
  - name: oauth-sidecar-state
    mountPath: {{ include "oauth-sidecar.stateDir" . }}
  {{- range (include "oauth-sidecar.secretFiles" . | fromYaml).files }}
  - name: {{ .volume }}
    mountPath: {{ .dir }}
    readOnly: true
  {{- end }}
{{- end }}

{{/* The volumes the sidecar container mounts (a list). */}}
{{- define "oauth-sidecar.volumes" -}}
- name: oauth-sidecar-config
  configMap:
    name: {{ include "oauth-sidecar.configMapName" . }}
- name: oauth-sidecar-state
  {{- $sqlite := .Values.store.sqlite }}
  {{- if and (eq .Values.store.backend "sqlite") $sqlite.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-state" (include "oauth-sidecar.fullname" .)) $sqlite.persistence.existingClaim }}
  {{- else }}
  emptyDir:
    {{- toYaml $sqlite.emptyDir | nindent 4 }}
  {{- end }}
{{- range (include "oauth-sidecar.secretFiles" . | fromYaml).files }}
- name: {{ .volume }}
  secret:
    secretName: {{ .secret }}
    # 0440: the sidecar refuses secret files readable by every user.
    defaultMode: 288
    items:
      - key: {{ .key }}
        path: {{ .file }}
{{- end }}
{{- end }}

{{/*
A pod spec with the sidecar added. Call with (dict "root" $ "podSpec" $spec), $spec a dict (for
example `include "my-pod-spec" . | fromYaml`). Native mode puts the sidecar first among the init
containers, so it serves the later ones too; otherwise it is the first container. Keys of
podSecurityContext the pod does not set are added.
*/}}
{{- define "oauth-sidecar.inject" -}}
{{- $root := .root }}
{{- $spec := deepCopy .podSpec }}
{{- $sidecar := include "oauth-sidecar.container" $root | fromYaml }}
{{- if $root.Values.nativeSidecar.enabled }}
{{- if not (semverCompare ">=1.29.0-0" $root.Capabilities.KubeVersion.Version) }}
{{- fail (printf "nativeSidecar.enabled needs Kubernetes 1.29 or later; this cluster runs %s" $root.Capabilities.KubeVersion.Version) }}
{{- end }}
{{- $_ := set $spec "initContainers" (prepend (default (list) $spec.initContainers) $sidecar) }}
{{- else }}
{{- $_ := set $spec "containers" (prepend (default (list) $spec.containers) $sidecar) }}
{{- end }}
{{- $volumes := include "oauth-sidecar.volumes" $root | fromYamlArray }}
{{- $_ := set $spec "volumes" (concat (default (list) $spec.volumes) $volumes) }}
{{- $podSecurity := merge (default (dict) $spec.securityContext) (deepCopy $root.Values.podSecurityContext) }}
{{- if $podSecurity }}
{{- $_ := set $spec "securityContext" $podSecurity }}
{{- end }}
{{- toYaml $spec }}
{{- end }}
