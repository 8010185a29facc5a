{{/* Names and labels --------------------------------------------------------------------------------- */}}
{{- define "epserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayService's name: KubeRay derives <name>-raycluster-xxxxx, <name>-head-svc and <name>-serve-svc
     from it, so it stays well under 63 characters. */}}
{{- define "epserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "epserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "epserve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "epserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "epserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "epserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: epserve
{{- end -}}

{{- define "epserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Fixed mount point of the model source in every Ray pod. */}}
{{- define "epserve.modelMount" -}}/models{{- end -}}

{{/* The checkpoint directory inside the pods, or "" for the built-in tiny model. */}}
{{- define "epserve.checkpoint" -}}
{{- if .Values.model.path -}}
{{- printf "%s/%s" (include "epserve.modelMount" .) (trimSuffix "/" .Values.model.path) -}}
{{- end -}}
{{- end -}}

{{/* Which model source is configured: "pvc", "hostPath" or "". */}}
{{- define "epserve.modelSource" -}}
{{- if .Values.model.source.persistentVolumeClaim.claimName -}}pvc
{{- else if .Values.model.source.hostPath.path -}}hostPath
{{- end -}}
{{- end -}}

{{/* One front-end per pod. */}}
{{- define "epserve.frontendPods" -}}
{{- int .Values.cluster.frontends -}}
{{- end -}}

{{- define "epserve.expertPods" -}}
{{- div (int .Values.cluster.shards) (int .Values.expert.shardsPerPod) -}}
{{- end -}}

{{/* Checks across values that values.schema.json cannot express; each fails the install with a message. */}}
{{- define "epserve.validate" -}}
{{- $shards := int .Values.cluster.shards -}}
{{- $experts := int .Values.model.numExperts -}}
{{- $perPod := int .Values.expert.shardsPerPod -}}
{{- range $key := list "frontends" "shards" -}}
{{- $n := int (get $.Values.cluster $key) -}}
{{- if lt $n 1 -}}
{{- fail (printf "cluster.%s must be at least 1 (got %d)" $key $n) -}}
{{- end -}}
{{- end -}}
{{- if gt $shards $experts -}}
{{- fail (printf "cluster.shards (%d) is more than the model's expert count model.numExperts (%d): every shard must own at least one expert" $shards $experts) -}}
{{- end -}}
{{- if ne (mod $shards $perPod) 0 -}}
{{- fail (printf "cluster.shards (%d) must be a multiple of expert.shardsPerPod (%d): expert pods are all the same size, and a partly used pod would hold idle GPUs" $shards $perPod) -}}
{{- end -}}
{{- $pvc := .Values.model.source.persistentVolumeClaim.claimName -}}
{{- $host := .Values.model.source.hostPath.path -}}
{{- if and $pvc $host -}}
{{- fail "model.source: set either persistentVolumeClaim.claimName or hostPath.path, not both" -}}
{{- end -}}
{{- if .Values.model.path -}}{{- /* nested, not `and`: Go templates before 1.18 evaluate every operand */ -}}
{{- if has ".." (splitList "/" (toString .Values.model.path)) -}}
{{- fail (printf "model.path %q must stay inside /models (no .. components)" .Values.model.path) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.model.path (not (or $pvc $host)) -}}
{{- fail (printf "model.path is %q but there is no model source: set model.source.persistentVolumeClaim.claimName (an existing PVC) or model.source.hostPath.path" .Values.model.path) -}}
{{- end -}}
{{- if .Values.model.fetch.enabled -}}
{{- if not .Values.model.path -}}
{{- fail "model.fetch.enabled needs model.path: the directory under /models to download the checkpoint into" -}}
{{- end -}}
{{- if not .Values.model.fetch.tokenSecret.name -}}
{{- fail "model.fetch.enabled needs model.fetch.tokenSecret.name: the name of an existing Secret holding a Hugging Face token (never the token itself)" -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.cluster.placement "STRICT_PACK" -}}
{{- fail "cluster.placement STRICT_PACK puts every actor on one node, but the front-ends and the expert shards run on pods of their own (role resources): use PACK" -}}
{{- end -}}
{{- if and (eq .Values.cluster.device "cuda") (not .Values.gpu.enabled) -}}
{{- fail "cluster.device is cuda but gpu.enabled is false: the pods would have no GPUs" -}}
{{- end -}}
{{- if and .Values.serve.metricsPort (eq (int .Values.serve.metricsPort) (int .Values.serve.grpcPort)) -}}
{{- fail "serve.metricsPort and serve.grpcPort must differ" -}}
{{- end -}}
{{- if and .Values.tls.secretName .Values.monitoring.serviceMonitor.enabled (not .Values.serve.metricsPort) -}}
{{- fail "with tls.secretName the HTTP port serves HTTPS: set serve.metricsPort (a plaintext metrics port) for the ServiceMonitor" -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap of one dashboard file (files/dashboards/<base>.json); ctx: root, path. */}}
{{- define "epserve.dashboardConfigMap" -}}
{{- $base := base .path | trimSuffix ".json" -}}
{{- printf "%s-%s" (include "epserve.fullname" .root) ($base | trimPrefix "epserve-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "epserve.dashboardNamespace" -}}
{{- default .Release.Namespace .Values.monitoring.grafanaDashboards.namespace -}}
{{- end -}}

{{/* Where the TLS Secret and the API token are mounted in every Ray pod. */}}
{{- define "epserve.tlsMount" -}}/etc/epserve/tls{{- end -}}
{{- define "epserve.authMount" -}}/etc/epserve/auth{{- end -}}

{{/* The Serve config (deploy/serve.yaml's content, generated from values), as YAML. */}}
{{- define "epserve.serveConfig" -}}
{{- $checkpoint := include "epserve.checkpoint" . -}}
{{- $cluster := deepCopy .Values.cluster.extra -}}
{{- $_ := set $cluster "checkpoint" (ternary $checkpoint nil (ne $checkpoint "")) -}}
{{- $_ := set $cluster "frontends" .Values.cluster.frontends -}}
{{- $_ := set $cluster "shards" .Values.cluster.shards -}}
{{- $_ := set $cluster "placement" .Values.cluster.placement -}}
{{- $_ := set $cluster "device" .Values.cluster.device -}}
{{- $_ := set $cluster "dtype" .Values.cluster.dtype -}}
{{- $_ := set $cluster "frontend_resources" (dict (include "epserve.roleResource.frontend" .) 1) -}}
{{- $_ := set $cluster "shard_resources" (dict (include "epserve.roleResource.expert" .) 1) -}}
{{- $args := dict "grpc_host" "0.0.0.0" "grpc_port" .Values.serve.grpcPort "drain_s" .Values.serve.drainSeconds "cluster" $cluster -}}
{{- $http := dict "host" "0.0.0.0" "port" 8000 -}}
{{- if .Values.tls.secretName -}}
{{- $cert := printf "%s/tls.crt" (include "epserve.tlsMount" .) -}}
{{- $key := printf "%s/tls.key" (include "epserve.tlsMount" .) -}}
{{- $_ := set $args "tls_cert_file" $cert -}}
{{- $_ := set $args "tls_key_file" $key -}}
{{- $_ := set $http "ssl_certfile" $cert -}}
{{- $_ := set $http "ssl_keyfile" $key -}}
{{- end -}}
{{- if .Values.auth.tokenSecret.name -}}
{{- $_ := set $args "auth_token_file" (printf "%s/token" (include "epserve.authMount" .)) -}}
{{- end -}}
{{- if .Values.serve.modelName -}}
{{- $_ := set $args "model_name" .Values.serve.modelName -}}
{{- end -}}
{{- if .Values.serve.metricsPort -}}
{{- $_ := set $args "metrics_host" "0.0.0.0" -}}
{{- $_ := set $args "metrics_port" .Values.serve.metricsPort -}}
{{- end -}}
{{- $app := dict "name" .Values.serve.appName "route_prefix" .Values.serve.routePrefix "import_path" .Values.serve.importPath "args" $args -}}
{{- if .Values.serve.ingress.pinToHead -}}
{{- $actor := dict "num_cpus" .Values.serve.ingress.numCpus "resources" (dict "node:__internal_head__" 0.001) -}}
{{- $_ := set $app "deployments" (list (dict "name" "Ingress" "ray_actor_options" $actor)) -}}
{{- end -}}
{{- $config := dict "proxy_location" .Values.serve.proxyLocation "http_options" $http "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The custom Ray resource of each worker role, the one source of the names: the worker groups advertise
     it (rayStartParams, one per actor slot) and the Serve config's ClusterConfig asks for it in each actor's
     placement bundle (frontend_resources, shard_resources), so actors land on the pods of their role. */}}
{{- define "epserve.roleResource.frontend" -}}frontend{{- end -}}
{{- define "epserve.roleResource.expert" -}}expert{{- end -}}

{{/* A custom Ray resource, written shell-quoted as KubeRay passes it to `ray start --resources`. */}}
{{- define "epserve.rayResources" -}}
{{- $pairs := list -}}
{{- range $k := keys . | sortAlpha -}}
{{- $pairs = append $pairs (printf "\\\"%s\\\": %v" $k (get $ $k)) -}}
{{- end -}}
{{- printf "\"{%s}\"" (join ", " $pairs) | squote -}}
{{- end -}}

{{/* rayStartParams: the chart's, then the user's extra flags (all strings). */}}
{{- define "epserve.rayStartParams" -}}
{{- $params := dict -}}
{{- range $k, $v := .extra }}{{ $_ := set $params $k (toString $v | quote) }}{{ end -}}
{{- range $k, $v := .fixed }}{{ $_ := set $params $k $v }}{{ end -}}
{{- $lines := list -}}
{{- range $k := keys $params | sortAlpha -}}
{{- $lines = append $lines (printf "%s: %s" $k (get $params $k)) -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end -}}

{{/* Container resources: the role's values plus its GPUs as a limit. ctx: root, role values, gpus. */}}
{{- define "epserve.containerResources" -}}
{{- $res := deepCopy .role.resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := default (dict) $res.limits -}}
{{- $_ := set $limits .root.Values.gpu.resourceName (int .gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Volumes of every Ray pod: /dev/shm and the model source. */}}
{{- define "epserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.sharedMemory.sizeLimit }}
{{- $source := include "epserve.modelSource" . }}
{{- if eq $source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.source.persistentVolumeClaim.claimName }}
{{- else if eq $source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.source.hostPath.path }}
    type: {{ .Values.model.source.hostPath.type }}
{{- end }}
{{- with .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- with .Values.auth.tokenSecret }}
{{- if .name }}
- name: auth
  secret:
    secretName: {{ .name }}
    defaultMode: 0440
    items:
      - {key: {{ .key }}, path: token}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volume mounts of the Ray containers: the model read-only. */}}
{{- define "epserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if include "epserve.modelSource" . }}
- name: model
  mountPath: {{ include "epserve.modelMount" . }}
  readOnly: true
{{- end }}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: {{ include "epserve.tlsMount" . }}
  readOnly: true
{{- end }}
{{- if .Values.auth.tokenSecret.name }}
- name: auth
  mountPath: {{ include "epserve.authMount" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* With HTTPS on Serve's port, KubeRay's default worker readiness probe (plain HTTP to :8000) would never
     pass: the same checks, over HTTPS (to localhost, so the certificate's name is not checked). */}}
{{- define "epserve.readinessProbe" -}}
{{- if .Values.tls.secretName }}
readinessProbe:
  exec:
    command: ["bash", "-c", "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success && wget -T 10 -q --no-check-certificate -O- https://localhost:8000/-/healthz | grep success"]
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 15
  failureThreshold: 10
{{- end }}
{{- end -}}

{{/* The optional model-fetch init container; ctx: root, role ("head" or a worker group). */}}
{{- define "epserve.initContainers" -}}
{{- $root := .root -}}
{{- $fetch := $root.Values.model.fetch -}}
{{- $source := include "epserve.modelSource" $root -}}
{{- if and $fetch.enabled (or (eq $source "hostPath") (eq .role "head")) }}
initContainers:
  - name: fetch-model
    image: {{ include "epserve.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: ["/bin/sh", "-c"]
    args:
      - |
        set -eu
        if [ -f "$EPSERVE_CHECKPOINT/.epserve-fetched" ]; then
          echo "model already in $EPSERVE_CHECKPOINT"; exit 0
        fi
        mkdir -p "$EPSERVE_CHECKPOINT"
        hf download "$HF_REPO" --revision "$HF_REVISION" --local-dir "$EPSERVE_CHECKPOINT"
        touch "$EPSERVE_CHECKPOINT/.epserve-fetched"
    env:
      - name: EPSERVE_CHECKPOINT
        value: {{ include "epserve.checkpoint" $root | quote }}
      - name: HF_REPO
        value: {{ $fetch.repo | quote }}
      - name: HF_REVISION
        value: {{ $fetch.revision | quote }}
      - name: HF_HOME
        value: /tmp/hf-home
      - name: HF_HUB_DISABLE_TELEMETRY
        value: "1"
      - name: HF_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $fetch.tokenSecret.name }}
            key: {{ $fetch.tokenSecret.key }}
    resources:
      {{- toYaml $fetch.resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: model
        mountPath: {{ include "epserve.modelMount" $root }}
{{- end }}
{{- end -}}

{{/* The pod spec parts every Ray pod shares (after containers). */}}
{{- define "epserve.podCommon" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "epserve.volumes" . | nindent 2 }}
{{- end -}}

{{- define "epserve.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "epserve.env" -}}
{{- with .Values.extraEnv }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod labels: stable ones only. A change to rayClusterConfig (a chart version label, say) makes KubeRay
     replace the whole cluster (NewCluster upgrade), so no version labels here. */}}
{{- define "epserve.podMetadata" -}}
{{- $root := .root -}}
labels:
  {{- include "epserve.selectorLabels" $root | nindent 2 }}
  app.kubernetes.io/part-of: epserve
  app.kubernetes.io/component: {{ .component }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
