{{/*
stage=serve: the serving Deployment's pieces (templates/serve.yaml renders the objects).

A pod: the init container `fetch-model` resolves the model (models:/NAME/VERSION when the pod template pins a
version in the annotation llmpipe.io/model-version, else models:/NAME@ALIAS) from the MLflow registry into the
emptyDir /models (`llmpipe serve --fetch-only`: /models/v<version>/hf and /models/served.json) and leaves
served.json as its termination message (what `llmpipe k8s status` shows); then the server container serves
/models/served.json's folder: `llmpipe serve` (profile cpu) or vLLM's OpenAI server (profile vllm). The pod is
Ready only once the model answered a short generation (the startup probe).
*/}}

{{- define "llmpipe.serve.modelDir" -}}/models{{- end -}}

{{/* The labels the Deployment, its pods, the Service, the PDB and the ServiceMonitor select on (immutable). */}}
{{- define "llmpipe.serve.selector" -}}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
llmpipe.io/stage: serve
llmpipe.io/role: server
{{- end -}}

{{/* models:/NAME@ALIAS, for messages and annotations */}}
{{- define "llmpipe.serve.uri" -}}
{{- with .Values.serving.model -}}
{{- if .version }}models:/{{ .name }}/{{ .version }}{{ else }}models:/{{ .name }}@{{ .alias }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* Checks across serving values that the schema cannot express; each fails with one line. */}}
{{- define "llmpipe.serve.validate" -}}
{{- $s := .Values.serving -}}
{{- if not .Values.mlflow.trackingUri -}}
{{- fail "stage=serve reads the model from the MLflow registry: set mlflow.trackingUri (e.g. http://mlflow.llm-pipeline.svc:5000, the server of k8s/mlflow/)" -}}
{{- end -}}
{{- if and (eq $s.profile "vllm") (lt (int .Values.gpus) 1) -}}
{{- fail "serving.profile=vllm runs vLLM's CUDA server: set gpus to 1 or more (serving.profile=cpu serves small models without a GPU)" -}}
{{- end -}}
{{- if and $s.autoscaling.enabled (gt (int $s.autoscaling.minReplicas) (int $s.autoscaling.maxReplicas)) -}}
{{- fail (printf "serving.autoscaling: minReplicas %d is above maxReplicas %d" (int $s.autoscaling.minReplicas) (int $s.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and (eq (toString $s.maxSurge) "0") (eq (toString $s.maxUnavailable) "0") -}}
{{- fail "serving.maxSurge and serving.maxUnavailable are both 0: a rolling update could never replace a pod (the Deployment's validation refuses it); allow one of them" -}}
{{- end -}}
{{- $names := list "models" "shm" "tmp" "home" -}}
{{- range .Values.extraVolumes -}}
{{- if has .name $names -}}
{{- fail (printf "extraVolumes: the name %q is taken by the serving pod's own volumes (%s); pick another" .name (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- range .Values.extraVolumeMounts -}}
{{- $m := . -}}
{{- $found := false -}}
{{- range $.Values.extraVolumes }}{{ if eq .name $m.name }}{{ $found = true }}{{ end }}{{ end -}}
{{- if not $found -}}
{{- fail (printf "extraVolumeMounts: %q mounts no volume of extraVolumes (names: %s)" $m.name (include "llmpipe.extraVolumeNames" $)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The container security context of the chart's pods ("restricted"). */}}
{{- define "llmpipe.serve.containerSecurity" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment of the init container: the registry (and the artefact store's S3 credentials, if any). */}}
{{- define "llmpipe.serve.registryEnv" -}}
{{- $v := .Values -}}
- name: MLFLOW_TRACKING_URI
  value: {{ $v.mlflow.trackingUri | quote }}
{{- if eq $v.storage.type "s3" }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $v.storage.s3.secretName | quote }}
      key: {{ $v.storage.s3.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.storage.s3.secretName | quote }}
      key: {{ $v.storage.s3.secretAccessKeyKey | quote }}
{{- with $v.storage.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $v.storage.s3.endpoint }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The init container's script: the pinned version, else the alias; then what was fetched as the termination
message (kubernetes v1.33 pkg/kubelet/kuberuntime/kuberuntime_container.go: makeMounts creates the file 0666, so the
non-root user writes it; the kubelet reports it in status.initContainerStatuses[].state.terminated.message). */}}
{{- define "llmpipe.serve.fetchScript" -}}
{{- $dir := include "llmpipe.serve.modelDir" . -}}
set -eu
if [ -n "${LLMPIPE_MODEL_VERSION:-}" ]; then
  uri="models:/${LLMPIPE_MODEL_NAME}/${LLMPIPE_MODEL_VERSION}"
else
  uri="models:/${LLMPIPE_MODEL_NAME}@${LLMPIPE_MODEL_ALIAS}"
fi
echo "fetch-model: $uri -> {{ $dir }}"
llmpipe serve --fetch-only {{ $dir }} --model "$uri"
cp {{ $dir }}/served.json /dev/termination-log
{{- end -}}

{{/* vLLM's launcher: the folder and version from served.json, a logging config whose lines carry the model
version (VLLM_LOGGING_CONFIG_PATH configures the vllm and the uvicorn loggers: vllm/logger.py
_configure_vllm_root_logger; vllm/entrypoints/openai/cli_args.py FrontendArgs.log_config_file, "for both vllm and
uvicorn"), then `vllm serve <folder> --served-model-name <name>` in its place. Extra arguments come as argv. */}}
{{- define "llmpipe.serve.vllmLauncher" -}}
{{- $dir := include "llmpipe.serve.modelDir" . -}}
import json, os, sys
served = json.load(open("{{ $dir }}/served.json"))
tag = ("model=%s model_version=%s" % (served["name"], served["version"])).replace("%", "%%")
cfg = {"version": 1, "disable_existing_loggers": False,
       "formatters": {"served": {"format": "%(asctime)s %(levelname)s " + tag + " [%(name)s] %(message)s"}},
       "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "served", "stream": "ext://sys.stdout"}},
       "loggers": {n: {"handlers": ["out"], "level": "INFO", "propagate": False}
                   for n in ("vllm", "uvicorn", "uvicorn.error", "uvicorn.access")}}
path = "/tmp/llmpipe-vllm-logging.json"
with open(path, "w") as fh:
    json.dump(cfg, fh)
os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
argv = ["vllm", "serve", served["folder"], "--served-model-name", served["name"],
        "--host", "0.0.0.0", "--port", "{{ int .Values.serving.port }}"] + sys.argv[1:]
print("serving %s version %s: %s" % (served["name"], served["version"], " ".join(argv)), flush=True)
os.execvp(argv[0], argv)
{{- end -}}

{{/* vLLM's startup probe: a 1-token completion on localhost (its /health answers once the engine is up, before
anything was generated: vllm/entrypoints/serve/instrumentator/health.py). */}}
{{- define "llmpipe.serve.vllmGenerate" -}}
import json, urllib.request as u
body = json.dumps({"model": {{ .Values.serving.model.name | toJson }}, "prompt": "Hello", "max_tokens": 1}).encode()
req = u.Request("http://127.0.0.1:{{ int .Values.serving.port }}/v1/completions", data=body, headers={"Content-Type": "application/json"})
assert json.load(u.urlopen(req, timeout={{ max 1 (sub (int .Values.serving.probes.startup.timeoutSeconds) 1) }}))["choices"], "no choices"
{{- end -}}

{{- define "llmpipe.serve.probe" -}}
{{- $defaults := dict "periodSeconds" 10 "timeoutSeconds" 5 "failureThreshold" 3 -}}
{{- $timing := merge (deepCopy (.timing | default dict)) $defaults -}}
{{- toYaml (merge $timing .handler) -}}
{{- end -}}

{{/* The pod template of the serving Deployment. */}}
{{- define "llmpipe.serve.podTemplate" -}}
{{- $v := .Values -}}
{{- $s := $v.serving -}}
{{- $home := "/home/llmpipe" -}}
{{- $dir := include "llmpipe.serve.modelDir" . -}}
{{- $vllm := eq $s.profile "vllm" -}}
metadata:
  labels:
    {{- include "llmpipe.labels" (dict "root" . "role" "server") | nindent 4 }}
  annotations:
    {{- with $s.model.version }}
    llmpipe.io/model-version: {{ . | quote }}
    {{- end }}
    {{- if $s.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ int $s.port | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with $v.serviceAccountName }}
  serviceAccountName: {{ . | quote }}
  {{- end }}
  automountServiceAccountToken: false
  # the pause container is PID 1: reaps the server's worker processes
  shareProcessNamespace: true
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ int $s.terminationGracePeriodSeconds }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . | quote }}
    {{- end }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $v.securityContext.runAsUser }}
    runAsGroup: {{ $v.securityContext.runAsGroup }}
    fsGroup: {{ $v.securityContext.fsGroup }}
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  initContainers:
    - name: fetch-model
      image: {{ include "llmpipe.image" . | quote }}
      imagePullPolicy: {{ include "llmpipe.pullPolicy" . }}
      command: ["sh", "-c"]
      args:
        - |
          {{- include "llmpipe.serve.fetchScript" . | nindent 10 }}
      env:
        - name: LLMPIPE_MODEL_NAME
          value: {{ $s.model.name | quote }}
        - name: LLMPIPE_MODEL_ALIAS
          value: {{ $s.model.alias | quote }}
        # the version the pod template pins (llmpipe promote sets it); empty: follow the alias
        - name: LLMPIPE_MODEL_VERSION
          valueFrom:
            fieldRef:
              fieldPath: metadata.annotations['llmpipe.io/model-version']
        - name: HOME
          value: {{ $home }}
        - name: PYTHONUNBUFFERED
          value: "1"
        {{- include "llmpipe.serve.registryEnv" . | nindent 8 }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.mlflow.secretName }}
      envFrom:
        - secretRef:
            name: {{ . | quote }}
      {{- end }}
      {{- with $s.fetch.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "llmpipe.serve.containerSecurity" . | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: {{ $dir }}
        - name: tmp
          mountPath: /tmp
        - name: home
          mountPath: {{ $home }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  containers:
    - name: server
      {{- if $vllm }}
      {{- with $s.vllm.image.digest }}
      image: {{ printf "%s@%s" $s.vllm.image.repository . | quote }}
      {{- else }}
      image: {{ printf "%s:%s" $s.vllm.image.repository $s.vllm.image.tag | quote }}
      {{- end }}
      imagePullPolicy: {{ $v.image.pullPolicy | default (ternary "IfNotPresent" "Always" (ne ($s.vllm.image.digest | default "") "")) }}
      command:
        - python3
        - -c
        - |
          {{- include "llmpipe.serve.vllmLauncher" . | nindent 10 }}
      {{- $args := $s.vllm.args | default list -}}
      {{- if and (gt (int $v.gpus) 1) (not (or (has "--tensor-parallel-size" $args) (has "-tp" $args))) }}
      {{- $args = concat $args (list "--tensor-parallel-size" (toString (int $v.gpus))) }}
      {{- end }}
      {{- if $s.vllm.logRequests }}
      {{- $args = append $args "--enable-log-requests" }}
      {{- end }}
      {{- with $args }}
      args:
        {{- range . }}
        - {{ . | quote }}
        {{- end }}
      {{- end }}
      {{- else }}
      image: {{ include "llmpipe.image" . | quote }}
      imagePullPolicy: {{ include "llmpipe.pullPolicy" . }}
      command: ["llmpipe"]
      args:
        - serve
        - --model-dir
        - {{ $dir }}
        - --host
        - 0.0.0.0
        - --port
        - {{ int $s.port | quote }}
        {{- range $s.cpu.args }}
        - {{ . | quote }}
        {{- end }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ int $s.port }}
          protocol: TCP
      env:
        - name: HOME
          value: {{ $home }}
        - name: PYTHONUNBUFFERED
          value: "1"
        - name: LLMPIPE_MODEL_NAME
          value: {{ $s.model.name | quote }}
        # the model is on the volume: nothing to fetch from the Hugging Face Hub
        - name: HF_HUB_OFFLINE
          value: "1"
        {{- if $vllm }}
        - name: VLLM_NO_USAGE_STATS
          value: "1"
        - name: DO_NOT_TRACK
          value: "1"
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $res := deepCopy ($v.resources | default dict) -}}
      {{- if gt (int $v.gpus) 0 }}
      {{- $_ := set $res "requests" (merge (dict $v.gpuResourceName (int $v.gpus)) ($res.requests | default dict)) }}
      {{- $_ := set $res "limits" (merge (dict $v.gpuResourceName (int $v.gpus)) ($res.limits | default dict)) }}
      {{- end }}
      {{- with $res }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $startup := dict "httpGet" (dict "path" "/ready" "port" "http") -}}
      {{- $ready := dict "httpGet" (dict "path" "/ready" "port" "http") -}}
      {{- if $vllm }}
      {{- $startup = dict "exec" (dict "command" (list "python3" "-c" (include "llmpipe.serve.vllmGenerate" .))) -}}
      {{- $ready = dict "httpGet" (dict "path" "/health" "port" "http") -}}
      {{- end }}
      # ready = the model answered a short generation (startup), then the server stays healthy
      startupProbe:
        {{- include "llmpipe.serve.probe" (dict "handler" $startup "timing" $s.probes.startup) | nindent 8 }}
      readinessProbe:
        {{- include "llmpipe.serve.probe" (dict "handler" $ready "timing" $s.probes.readiness) | nindent 8 }}
      livenessProbe:
        {{- include "llmpipe.serve.probe" (dict "handler" (dict "httpGet" (dict "path" "/health" "port" "http")) "timing" $s.probes.liveness) | nindent 8 }}
      securityContext:
        {{- include "llmpipe.serve.containerSecurity" . | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: {{ $dir }}
          readOnly: true
        - name: shm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        - name: home
          mountPath: {{ $home }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: models
      emptyDir:
        sizeLimit: {{ $s.modelVolume.sizeLimit | quote }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shm.sizeLimit | quote }}
    - name: tmp
      emptyDir: {}
    - name: home
      emptyDir: {}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
