{{- define "t.family" -}}
{{- if has .Values.stage (list "collect" "clean" "tokenizer" "pack") -}}data
{{- else if has .Values.stage (list "init" "pretrain" "sft" "dpo" "reward") -}}train
{{- else if has .Values.stage (list "evaluate" "quantize") -}}eval
{{- else -}}registry{{- end -}}
{{- end -}}

{{- define "t.image" -}}
{{ .Values.image.repository | default (printf "ghcr.io/llm-pipeline/llmpipe-%s" (include "t.family" .)) }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "t.labels" -}}
app.kubernetes.io/name: llm-pipeline
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.stage }}
app.kubernetes.io/part-of: llm-pipeline
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
llmpipe.io/stage: {{ .Values.stage }}
{{- end -}}

{{/* the pod template; .role and .args come in a dict with the root as .root */}}
{{- define "t.pod" -}}
metadata:
  labels:
    {{- include "t.labels" .root | nindent 4 }}
    llmpipe.io/role: {{ .role }}
spec:
  restartPolicy: {{ .restartPolicy | default "Never" }}
  containers:
    - name: llmpipe
      image: {{ include "t.image" .root }}
      imagePullPolicy: {{ .root.Values.image.pullPolicy }}
      command: ["llmpipe", "run", {{ .root.Values.stage | quote }}, "--config", "/etc/llmpipe/config.yaml", "--root", {{ .root.Values.runRoot | quote }}{{ range .args }}, {{ . | quote }}{{ end }}]
      resources:
        {{- toYaml .root.Values.resources | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/llmpipe}
  volumes:
    - name: config
      configMap: {name: {{ .root.Release.Name }}-config}
{{- end -}}
