{{/*
The stage table: family (which image) and kind (what runs it). Keep in step with
pipeline/stages/__init__.py (ORDER, TRAINING) and the sharded stages (clean, pack). serve is no pipeline stage: the
serving Deployment (templates/serve.yaml), in the eval image (torch and transformers; MLflow is in every image).
nccl-check is none either: the fabric check (`llmpipe fabric-check`, pipeline/fabric.py; `run:` is the command its
pods run instead of `llmpipe run <stage>`), a PyTorchJob with a training stage's pod shape (make deploy-nccl-check).
*/}}
{{- define "llmpipe.stageTable" -}}
collect: {family: data, kind: single}
clean: {family: data, kind: sharded}
tokenizer: {family: data, kind: single}
pack: {family: data, kind: sharded}
init: {family: train, kind: single}
pretrain: {family: train, kind: training}
sft: {family: train, kind: training}
dpo: {family: train, kind: training}
reward: {family: train, kind: training}
evaluate: {family: eval, kind: single}
quantize: {family: eval, kind: single}
register: {family: registry, kind: single}
serve: {family: eval, kind: service}
nccl-check: {family: train, kind: training, run: fabric-check}
{{- end -}}

{{/*
Merge stages.<stage> over the top-level values, in place (idempotent: every template calls it first).
The site's per-stage settings then read as ordinary values everywhere below.
*/}}
{{- define "llmpipe.applyStageValues" -}}
{{- $over := get (.Values.stages | default dict) (.Values.stage | default "") -}}
{{- if $over -}}
{{- $_ := mergeOverwrite .Values (deepCopy $over) -}}
{{- end -}}
{{- end -}}

{{/* The stage's entry of the table; fails with the list of stages when unknown. */}}
{{- define "llmpipe.stageInfo" -}}
{{- $table := include "llmpipe.stageTable" . | fromYaml -}}
{{- $stage := .Values.stage | default "" -}}
{{- if not (hasKey $table $stage) -}}
{{- fail (printf "stage %q is not a stage; set --set stage=<one of: %s>" $stage (keys $table | sortAlpha | join ", ")) -}}
{{- end -}}
{{- get $table $stage | toYaml -}}
{{- end -}}

{{- define "llmpipe.kind" -}}{{ (include "llmpipe.stageInfo" . | fromYaml).kind }}{{- end -}}

{{/* Object name prefix = release name (llmpipe-<stage> by convention). */}}
{{- define "llmpipe.fullname" -}}{{ .Release.Name | trunc 52 | trimSuffix "-" }}{{- end -}}

{{- define "llmpipe.imageTag" -}}{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}

{{/* The image's digest, "" when none: image.digest (this release's), else image.digests.<family>. */}}
{{- define "llmpipe.imageDigest" -}}
{{- $info := include "llmpipe.stageInfo" . | fromYaml -}}
{{- .Values.image.digest | default (get (.Values.image.digests | default dict) $info.family) | default "" -}}
{{- end -}}

{{/* <repository>@<digest> when a digest is given (the tag is then only the version label), else <repository>:<tag>. */}}
{{- define "llmpipe.image" -}}
{{- $info := include "llmpipe.stageInfo" . | fromYaml -}}
{{- $repo := .Values.image.repository | default (printf "%s/llmpipe-%s" (.Values.image.registry | trimSuffix "/") $info.family) -}}
{{- $digest := include "llmpipe.imageDigest" . -}}
{{- if $digest -}}{{ printf "%s@%s" $repo $digest }}{{- else -}}{{ printf "%s:%s" $repo (include "llmpipe.imageTag" .) }}{{- end -}}
{{- end -}}

{{/* image.pullPolicy, else IfNotPresent for an image pinned by digest (the same bytes wherever cached) and Always for a
tag (a tag can be pushed again: a node's cached copy may be an older image) */}}
{{- define "llmpipe.pullPolicy" -}}
{{- .Values.image.pullPolicy | default (ternary "IfNotPresent" "Always" (ne (include "llmpipe.imageDigest" .) "")) -}}
{{- end -}}

{{/* Labels of every object and pod. Call with (dict "root" $ "role" "single|part|merge|train"). */}}
{{- define "llmpipe.labels" -}}
{{- $root := .root -}}
app.kubernetes.io/name: llm-pipeline
app.kubernetes.io/instance: {{ $root.Release.Name | quote }}
app.kubernetes.io/component: {{ $root.Values.stage | quote }}
app.kubernetes.io/part-of: llm-pipeline
app.kubernetes.io/managed-by: {{ $root.Release.Service | quote }}
app.kubernetes.io/version: {{ include "llmpipe.imageTag" $root | trunc 63 | quote }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | quote }}
llmpipe.io/stage: {{ $root.Values.stage | quote }}
{{- with .role }}
llmpipe.io/role: {{ . | quote }}
{{- end }}
{{- with $root.Values.extraLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of a workload object (Job / PyTorchJob): the labels plus the Kueue queue. */}}
{{- define "llmpipe.workloadLabels" -}}
{{ include "llmpipe.labels" . }}
{{- with .root.Values.kueue.queueName }}
kueue.x-k8s.io/queue-name: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* processes per pod for torchrun: nprocPerNode, else gpus when > 0, else 1 */}}
{{- define "llmpipe.nprocPerNode" -}}
{{- $v := .Values.nprocPerNode -}}
{{- if kindIs "invalid" $v -}}
{{- if gt (int .Values.gpus) 0 }}{{ int .Values.gpus }}{{ else }}1{{ end -}}
{{- else if kindIs "string" $v -}}{{ $v }}
{{- else -}}{{ int $v }}
{{- end -}}
{{- end -}}

{{/* CHECKPOINT_DIR of a training stage: <checkpointRoot>/<runRoot without scheme>/<stage>; empty: the stage's
default (<runRoot>/checkpoints/<stage>, on the PVC). */}}
{{- define "llmpipe.checkpointDir" -}}
{{- with .Values.checkpointRoot -}}
{{- printf "%s/%s/%s" (trimSuffix "/" .) ($.Values.runRoot | trimPrefix "s3://" | trimAll "/") $.Values.stage -}}
{{- end -}}
{{- end -}}

{{/* Mount paths of the container's volumes that a training stage can write checkpoints to. */}}
{{- define "llmpipe.sharedMounts" -}}
{{- $mounts := list -}}
{{- if eq .Values.storage.type "pvc" }}{{ $mounts = append $mounts (.Values.storage.pvc.mountPath | trimSuffix "/") }}{{ end -}}
{{- range .Values.extraVolumeMounts }}{{ $mounts = append $mounts (.mountPath | trimSuffix "/") }}{{ end -}}
{{- toJson $mounts -}}
{{- end -}}

{{/* Checks across values that the schema cannot express; each fails with one line. */}}
{{- define "llmpipe.validate" -}}
{{- $kind := include "llmpipe.kind" . -}}
{{- if not (trim (.Values.config | default "")) -}}
{{- fail (printf "config is empty: pass the stage config with --set-file config=jobs/cluster/%s.yaml" .Values.stage) -}}
{{- end -}}
{{- if eq .Values.storage.type "pvc" -}}
{{- if not .Values.storage.pvc.claimName -}}
{{- fail "storage.type=pvc needs storage.pvc.claimName (a ReadWriteMany claim; k8s/storage.yaml creates llmpipe-data)" -}}
{{- end -}}
{{- $mount := .Values.storage.pvc.mountPath | trimSuffix "/" -}}
{{- if not (or (eq .Values.runRoot $mount) (hasPrefix (printf "%s/" $mount) .Values.runRoot)) -}}
{{- fail (printf "runRoot %q is not on the volume: with storage.type=pvc it must be under storage.pvc.mountPath %q (or use storage.type=s3 for an s3:// run root)" .Values.runRoot .Values.storage.pvc.mountPath) -}}
{{- end -}}
{{- else -}}
{{- if not (hasPrefix "s3://" .Values.runRoot) -}}
{{- fail (printf "runRoot %q: with storage.type=s3 the run root is an s3://bucket/prefix" .Values.runRoot) -}}
{{- end -}}
{{- if not .Values.storage.s3.secretName -}}
{{- fail "storage.type=s3 needs storage.s3.secretName: a Secret with the S3 access key id and secret key (credentials never go in values)" -}}
{{- end -}}
{{- end -}}
{{- if eq $kind "training" -}}
{{- $ckpt := include "llmpipe.checkpointDir" . -}}
{{- if and (eq .Values.storage.type "s3") (not $ckpt) (ne .Values.stage "nccl-check") -}}
{{- fail (printf "storage.type=s3: %s writes DeepSpeed checkpoints as files on a filesystem every pod mounts, and an s3:// run root is none. Mount one (extraVolumes + extraVolumeMounts, e.g. a ReadWriteMany PVC) and set checkpointRoot to its mountPath (docs/kubernetes.md, S3 run roots)" .Values.stage) -}}
{{- end -}}
{{- if $ckpt -}}
{{- $on := false -}}
{{- range (include "llmpipe.sharedMounts" . | fromJsonArray) -}}
{{- if or (eq $ckpt .) (hasPrefix (printf "%s/" .) $ckpt) }}{{ $on = true }}{{ end -}}
{{- end -}}
{{- if not $on -}}
{{- fail (printf "checkpointRoot %q is not on a mounted volume: put it under storage.pvc.mountPath or the mountPath of one of extraVolumeMounts (a pod's own filesystem is lost with the pod)" .Values.checkpointRoot) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $names := list "config" "data" "shm" "tmp" "home" -}}
{{- range .Values.extraVolumes -}}
{{- if has .name $names -}}
{{- fail (printf "extraVolumes: the name %q is taken by the chart's own volumes (%s); pick another" .name (join ", " $names)) -}}
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
{{- with .Values.schedulingPolicy -}}
{{- if gt (int (.minAvailable | default 0)) (int $.Values.nnodes) -}}
{{- fail (printf "schedulingPolicy.minAvailable %d is more than the job's %d pods (nnodes): its PodGroup could never be scheduled" (int .minAvailable) (int $.Values.nnodes)) -}}
{{- end -}}
{{- end -}}
{{- with .Values.elasticPolicy -}}
{{- $n := int $.Values.nnodes -}}
{{- $min := .minReplicas | default $n | int -}}
{{- $max := .maxReplicas | default $n | int -}}
{{- if or (ne $min $n) (ne $max $n) -}}
{{- fail (printf "elasticPolicy: minReplicas %d / maxReplicas %d must both equal nnodes %d: training keeps a fixed world size (the global batch and the ZeRO partitions depend on it); leave them out to get nnodes" $min $max $n) -}}
{{- end -}}
{{- if and .rdzvBackend (ne .rdzvBackend "c10d") -}}
{{- fail (printf "elasticPolicy.rdzvBackend %q: only c10d works here (etcd needs an etcd server and python-etcd in the image)" .rdzvBackend) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmpipe.extraVolumeNames" -}}
{{- $n := list -}}{{- range .Values.extraVolumes }}{{ $n = append $n .name }}{{ end -}}{{ join ", " $n | default "none" }}
{{- end -}}

{{/*
The scheduling and runtime fields of a pod spec, shared by every workload template (Job, Indexed Job,
PyTorchJob, and any other pod the chart renders). Call with (dict "root" $ "role" "<llmpipe.io/role>").
A topologySpreadConstraint without labelSelector gets one that matches this workload's pods
(app.kubernetes.io/instance + llmpipe.io/role), so the spread is among the stage's own pods.
*/}}
{{- define "llmpipe.podScheduling" -}}
{{- $v := .root.Values -}}
{{- with $v.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $v.runtimeClassName }}
runtimeClassName: {{ . | quote }}
{{- end }}
{{- with $v.schedulerName }}
schedulerName: {{ . | quote }}
{{- end }}
{{- with $v.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . | quote }}
  {{- end }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  {{- $c := deepCopy . }}
  {{- if not (hasKey $c "labelSelector") }}
  {{- $sel := dict "app.kubernetes.io/instance" $.root.Release.Name }}
  {{- with $.role }}{{ $_ := set $sel "llmpipe.io/role" . }}{{ end }}
  {{- $_ := set $c "labelSelector" (dict "matchLabels" $sel) }}
  {{- end }}
  - {{ toYaml $c | nindent 4 | trim }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
The pod template of every workload. Call with
  (dict "root" $ "role" "single|part|merge|train" "args" (list extra args) "container" "llmpipe"
        "restartPolicy" "Never|..." "ports" (list of ContainerPort) "interconnect" true|false )
interconnect: apply `interconnect` (RDMA resources, IPC_LOCK, network annotation, NCCL env) when it is enabled;
the training pods pass true, data stages use no NCCL.
*/}}
{{- define "llmpipe.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $home := "/home/llmpipe" -}}
{{- $ic := and .interconnect $v.interconnect.enabled -}}
metadata:
  labels:
    {{- include "llmpipe.labels" (dict "root" $root "role" .role) | nindent 4 }}
  annotations:
    llmpipe.io/config-sha256: {{ $v.config | sha256sum | quote }}
    {{- if $ic }}
    {{- with $v.interconnect.networks }}
    k8s.v1.cni.cncf.io/networks: {{ join "," . | quote }}
    {{- end }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  {{- with $v.serviceAccountName }}
  serviceAccountName: {{ . | quote }}
  {{- end }}
  automountServiceAccountToken: false
  # the pause container is PID 1 (reaps zombies); llmpipe gets SIGTERM's default action
  shareProcessNamespace: true
  enableServiceLinks: false
  {{- with include "llmpipe.podScheduling" (dict "root" $root "role" .role) | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $v.securityContext.runAsUser }}
    runAsGroup: {{ $v.securityContext.runAsGroup }}
    fsGroup: {{ $v.securityContext.fsGroup }}
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: {{ .container }}
      image: {{ include "llmpipe.image" $root | quote }}
      imagePullPolicy: {{ include "llmpipe.pullPolicy" $root }}
      command: ["llmpipe"]
      args:
        {{- with (include "llmpipe.stageInfo" $root | fromYaml).run }}
        - {{ . | quote }}
        {{- else }}
        - run
        - {{ $v.stage | quote }}
        {{- end }}
        - --config
        - /etc/llmpipe/config.yaml
        - --root
        - {{ $v.runRoot | quote }}
        {{- range .args }}
        - {{ . | quote }}
        {{- end }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        - name: LLMPIPE_ROOT
          value: {{ $v.runRoot | quote }}
        - name: HOME
          value: {{ $home }}
        {{- if ne .role "train" }}
        # (the training operator adds it to PyTorchJob pods itself: pkg/controller.v1/pytorch/envvar.go setPodEnv)
        - name: PYTHONUNBUFFERED
          value: "1"
        {{- end }}
        {{- with $v.mlflow.trackingUri }}
        - name: MLFLOW_TRACKING_URI
          value: {{ . | quote }}
        {{- end }}
        {{- with $v.mlflow.experimentName }}
        - name: MLFLOW_EXPERIMENT_NAME
          value: {{ . | quote }}
        {{- end }}
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
        - name: AWS_ENDPOINT_URL
          value: {{ . | quote }}
        - name: LLMPIPE_STORAGE_OPTIONS
          value: {{ dict "client_kwargs" (dict "endpoint_url" .) | toJson | quote }}
        {{- end }}
        {{- end }}
        {{- if eq .role "train" }}
        {{- with include "llmpipe.checkpointDir" $root }}
        - name: CHECKPOINT_DIR
          value: {{ . | quote }}
        {{- end }}
        # the restart budget (pipeline/training/restarts.py): starts in a row without a new checkpoint, per deploy
        - name: LLMPIPE_MAX_RESTARTS
          value: {{ int $v.backoffLimit | quote }}
        - name: LLMPIPE_JOB_ID
          value: {{ printf "%s-%s" $root.Release.Name (now | date "20060102-150405") | quote }}
        {{- end }}
        {{- if $ic }}
        {{- $own := list }}{{ range $v.extraEnv }}{{ $own = append $own .name }}{{ end }}
        {{- range $name, $value := $v.interconnect.ncclEnv }}
        {{- if not (has $name $own) }}
        - name: {{ $name }}
          value: {{ $value | toString | quote }}
        {{- end }}
        {{- end }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or $v.mlflow.secretName $v.extraEnvFrom }}
      envFrom:
        {{- with $v.mlflow.secretName }}
        - secretRef:
            name: {{ . | quote }}
        {{- end }}
        {{- with $v.extraEnvFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- $res := deepCopy ($v.resources | default dict) -}}
      {{- if gt (int $v.gpus) 0 }}
      {{- $_ := set $res "requests" (merge (dict $v.gpuResourceName (int $v.gpus)) ($res.requests | default dict)) }}
      {{- $_ := set $res "limits" (merge (dict $v.gpuResourceName (int $v.gpus)) ($res.limits | default dict)) }}
      {{- end }}
      {{- if and $ic $v.interconnect.resources }}
      {{- $_ := set $res "requests" (merge ($res.requests | default dict) (deepCopy $v.interconnect.resources)) }}
      {{- $_ := set $res "limits" (merge ($res.limits | default dict) (deepCopy $v.interconnect.resources)) }}
      {{- end }}
      {{- with $res }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        privileged: false
        readOnlyRootFilesystem: {{ $v.securityContext.readOnlyRootFilesystem }}
        runAsNonRoot: true
        capabilities:
          drop: ["ALL"]
          {{- if and $ic $v.interconnect.ipcLock }}
          # RDMA memory registration pins pages (ibv_reg_mr): needs Pod Security "privileged" (k8s/interconnect/)
          add: ["IPC_LOCK"]
          {{- end }}
        seccompProfile:
          type: RuntimeDefault
      volumeMounts:
        - name: config
          mountPath: /etc/llmpipe
          readOnly: true
        {{- if eq $v.storage.type "pvc" }}
        - name: data
          mountPath: {{ $v.storage.pvc.mountPath | quote }}
          {{- with $v.storage.pvc.subPath }}
          subPath: {{ . | quote }}
          {{- end }}
        {{- end }}
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
    - name: config
      configMap:
        name: {{ include "llmpipe.fullname" $root }}-config
        items:
          - key: config.yaml
            path: config.yaml
    {{- if eq $v.storage.type "pvc" }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ $v.storage.pvc.claimName | quote }}
    {{- end }}
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
