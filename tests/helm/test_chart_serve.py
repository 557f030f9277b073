"""stage=serve of charts/llm-pipeline: the serving Deployment, its Service, HPA, PodDisruptionBudget and
ServiceMonitor, rendered by the real helm binary (as `make render-serve` / `make deploy-serve` renders them),
validated like the other workloads (Kubernetes 1.33 schemas, strict; the ServiceMonitor against the Prometheus
operator's CRD; Pod Security "restricted" by the admission model of tests/k8s/podsecurity.py), and the scripts the
pods run, executed: the init container's (which model URI it fetches, what it leaves as its termination message),
vLLM's launcher (its command line and a logging config whose lines carry the model version) and vLLM's startup probe
(a 1-token completion) against a local HTTP server."""

from __future__ import annotations

import http.server
import json
import logging
import logging.config
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helm.chart import CHART, REPO, SCHEMAS, helm, helm_run, one, validate
from tests.k8s import podsecurity as ps

SERVICEMONITOR_SCHEMA = SCHEMAS / "servicemonitor-monitoring.coreos.com-v1.json"
NAMESPACE_DOC = next(d for d in yaml.safe_load_all((REPO / "k8s" / "namespace.yaml").read_text()) if d and d["kind"] == "Namespace")
SHAPES = REPO / "jobs" / "cluster" / "values"
TRACKING = "mlflow.trackingUri=http://mlflow.llm-pipeline.svc:5000"
SELECTOR = {"app.kubernetes.io/instance": "llmpipe-serve", "llmpipe.io/stage": "serve", "llmpipe.io/role": "server"}


def render_serve(*sets: str, values: list[Path] = (), release: str = "llmpipe-serve") -> list[dict]:
    args = ["template", release, str(CHART), "-n", "llm-pipeline", "--set", "stage=serve"]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm_run(*args).stdout) if d]


def serve_error(*sets: str) -> str:
    proc = helm_run("template", "llmpipe-serve", str(CHART), "--set", "stage=serve", *[a for s in sets for a in ("--set", s)],
                    check=False)
    assert proc.returncode != 0, f"helm accepted {sets}"
    return proc.stderr


def make_render(*args: str) -> list[dict]:
    out = subprocess.run(["make", "-s", "render-serve", f"HELM={helm()}", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def check(objs: list[dict]) -> None:
    """Every object as the API server (or the Prometheus operator's CRD) would take it."""
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            errors = list(jsonschema.Draft202012Validator(json.loads(SERVICEMONITOR_SCHEMA.read_text())).iter_errors(obj))
            assert not errors, errors[0].message
        else:
            validate(obj)


def pod_of(deploy: dict) -> dict:
    """The pod the ReplicaSet controller creates from the Deployment's template."""
    tpl = deploy["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**tpl["metadata"], "name": "llmpipe-serve-7d9f8-abcde"},
            "spec": tpl["spec"]}


def container(deploy: dict, name: str = "server") -> dict:
    spec = deploy["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ------------------------------------------------------------------------------ what is rendered


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    helm()
    return make_render()


@pytest.fixture(scope="module")
def cpu() -> list[dict]:
    helm()
    return make_render("VARIANT=cpu")


def test_make_render_serve_is_the_vllm_deployment_of_its_shape(gpu):
    check(gpu)
    assert sorted(o["kind"] for o in gpu) == ["Deployment", "PodDisruptionBudget", "Service"]
    deploy = one(gpu, "Deployment")
    assert deploy["metadata"]["name"] == "llmpipe-serve"
    assert deploy["metadata"]["annotations"] == {"llmpipe.io/model-name": "llm-pipeline", "llmpipe.io/model-alias": "champion",
                                                 "llmpipe.io/profile": "vllm"}
    spec = deploy["spec"]
    assert spec["replicas"] == 2 and spec["selector"]["matchLabels"] == SELECTOR
    assert spec["template"]["metadata"]["labels"].items() >= SELECTOR.items()  # the API server's validation
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert spec["progressDeadlineSeconds"] == 900 and spec["revisionHistoryLimit"] >= 1
    # no version pinned by the chart: the pods follow the alias until `llmpipe promote` pins one
    assert "llmpipe.io/model-version" not in spec["template"]["metadata"]["annotations"]
    server = container(deploy)
    assert server["image"] == "vllm/vllm-openai:v0.11.0"
    assert server["command"][:2] == ["python3", "-c"] and "os.execvp(argv[0], argv)" in server["command"][2]
    assert server["args"] == ["--max-model-len", "4096", "--gpu-memory-utilization", "0.90"]  # 1 GPU: no tensor parallel
    assert server["resources"]["limits"]["nvidia.com/gpu"] == server["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert server["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    env = env_of(server)
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["HF_HUB_OFFLINE"] == "1" and "MLFLOW_TRACKING_URI" not in env
    # ready only once the model generated: a 1-token completion as the startup probe, then vLLM's /health
    startup = server["startupProbe"]
    assert startup["exec"]["command"][:2] == ["python3", "-c"] and '"max_tokens": 1' in startup["exec"]["command"][2]
    assert startup["failureThreshold"] * startup["periodSeconds"] == 900
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    fetch = container(deploy, "fetch-model")
    assert fetch["image"] == "ghcr.io/llm-pipeline/llmpipe-eval:0.1.0" and fetch["command"] == ["sh", "-c"]
    fenv = env_of(fetch)
    assert fenv["MLFLOW_TRACKING_URI"] == "http://mlflow.llm-pipeline.svc:5000"
    assert fenv["LLMPIPE_MODEL_VERSION"] == {"fieldRef": {"fieldPath": "metadata.annotations['llmpipe.io/model-version']"}}
    assert (fenv["LLMPIPE_MODEL_NAME"], fenv["LLMPIPE_MODEL_ALIAS"]) == ("llm-pipeline", "champion")
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert {m["name"] for m in fetch["volumeMounts"]} >= {"models", "tmp", "home"}
    svc = one(gpu, "Service")
    assert svc["spec"]["selector"] == SELECTOR and svc["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one(gpu, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}


def test_cpu_variant_is_llmpipe_serve_scaled_by_an_hpa(cpu):
    check(cpu)
    assert sorted(o["kind"] for o in cpu) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    deploy = one(cpu, "Deployment")
    assert deploy["metadata"]["name"] == "llmpipe-serve-cpu"
    assert "replicas" not in deploy["spec"]  # the HPA owns the count; a helm upgrade must not reset it
    server = container(deploy)
    assert server["image"] == "ghcr.io/llm-pipeline/llmpipe-eval:0.1.0"
    assert server["command"] == ["llmpipe"]
    assert server["args"] == ["serve", "--model-dir", "/models", "--host", "0.0.0.0", "--port", "8000"]
    assert "nvidia.com/gpu" not in server["resources"]["limits"]
    assert server["startupProbe"]["httpGet"] == server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    hpa = one(cpu, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llmpipe-serve-cpu"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                                                  "averageUtilization": 80}}}]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_serving_pods_meet_pod_security_restricted(gpu, cpu, variant):
    """The namespace of k8s/namespace.yaml enforces "restricted": the ReplicaSet controller's pods must be admitted
    (a Deployment itself is only warned about, so a refusal would show only as pods that never appear)."""
    deploy = one(gpu if variant == "gpu" else cpu, "Deployment")
    allowed, message, warnings = ps.admit_pod(pod_of(deploy), NAMESPACE_DOC)
    assert allowed and not warnings, message or warnings
    spec = deploy["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    for c in spec["initContainers"] + spec["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # the check is not vacuous: a root server container is refused
    bad = pod_of(deploy)
    bad["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] = False
    assert ps.admit_pod(bad, NAMESPACE_DOC)[0] is False


def test_service_monitor_and_scrape_annotations():
    objs = render_serve(TRACKING, "serving.metrics.serviceMonitor.enabled=true",
                        "serving.metrics.serviceMonitor.labels.release=kube-prometheus-stack")
    check(objs)
    sm = one(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"] == {"matchLabels": SELECTOR}
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["port"], ep["path"]) == ("http", "/metrics")
    assert {"sourceLabels": ["__meta_kubernetes_pod_annotation_llmpipe_io_model_version"], "targetLabel": "model_version"} \
        in ep["relabelings"]
    annotations = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}
    none = render_serve(TRACKING, "serving.metrics.podAnnotations=false")
    assert not one(none, "Deployment")["spec"]["template"]["metadata"].get("annotations")
    assert "ServiceMonitor" not in {o["kind"] for o in none}
    # the CRD schema check is not vacuous
    sm["spec"]["endpoints"][0]["relabellings"] = []
    with pytest.raises(AssertionError, match="relabellings"):
        check([sm])


def test_pinned_version_tensor_parallel_request_logs_and_probe_timings():
    objs = render_serve(TRACKING, "serving.profile=vllm", "gpus=4", "serving.model.version=7", "serving.vllm.logRequests=true",
                        "serving.probes.startup.failureThreshold=120", "serving.port=9000", "serving.model.name=kk-chat")
    check(objs)
    deploy = one(objs, "Deployment")
    assert deploy["spec"]["template"]["metadata"]["annotations"]["llmpipe.io/model-version"] == "7"
    server = container(deploy)
    assert server["args"] == ["--tensor-parallel-size", "4", "--enable-log-requests"]
    assert '"--port", "9000"' in server["command"][2]
    assert server["startupProbe"]["failureThreshold"] == 120
    assert "http://127.0.0.1:9000/v1/completions" in server["startupProbe"]["exec"]["command"][2]
    assert '"model": "kk-chat"' in server["startupProbe"]["exec"]["command"][2]
    assert one(objs, "Service")["spec"]["ports"][0]["port"] == 9000
    given = one(render_serve(TRACKING, "serving.profile=vllm", "gpus=2", "serving.vllm.args={-tp,2}"), "Deployment")
    assert container(given)["args"] == ["-tp", "2"]  # the site's own tensor parallel size stays alone


def test_serve_renders_no_job_and_stages_render_no_deployment():
    kinds = {o["kind"] for o in render_serve(TRACKING)}
    assert kinds == {"Deployment", "Service"}  # no ConfigMap, no Job: serve has no config
    from tests.helm.chart import render

    kinds = {o["kind"] for o in render("collect", REPO / "jobs" / "cluster" / "collect.yaml")}
    assert kinds == {"ConfigMap", "Job"}


def test_site_values_reach_the_serving_pods(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({
        "mlflow": {"trackingUri": "http://mlflow.team:5000", "secretName": "mlflow-auth"},
        "image": {"registry": "registry.example.com/team", "tag": "1.2.3"},
        "stages": {"serve": {"nodeSelector": {"pool": "l4"}, "serving": {"replicas": 3}}},
        "extraEnv": [{"name": "HF_HOME", "value": "/home/llmpipe/hf"}]}))
    objs = make_render(f"VALUES={site}")
    check(objs)
    deploy = one(objs, "Deployment")
    assert deploy["spec"]["replicas"] == 3 and deploy["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "l4"}
    fetch = container(deploy, "fetch-model")
    assert fetch["image"] == "registry.example.com/team/llmpipe-eval:1.2.3"
    assert env_of(fetch)["MLFLOW_TRACKING_URI"] == "http://mlflow.team:5000"
    assert fetch["envFrom"] == [{"secretRef": {"name": "mlflow-auth"}}]
    assert env_of(container(deploy))["HF_HOME"] == "/home/llmpipe/hf"


@pytest.mark.parametrize(("sets", "message"), [
    (["serving.profile=vllm"], "serving.profile=vllm runs vLLM's CUDA server: set gpus"),
    ([], "stage=serve reads the model from the MLflow registry: set mlflow.trackingUri"),
    (["serving.autoscaling.enabled=true", "serving.autoscaling.minReplicas=5"], "minReplicas 5 is above maxReplicas 4"),
    (["serving.maxSurge=0"], "are both 0"),
    (["serving.profil=vllm"], "additional properties 'profil' not allowed"),
    (["serving.profile=tgi"], "/serving/profile"),
    (["serving.model.version=v3"], "/serving/model/version"),
    (["serving.model.name=a/b"], "/serving/model/name"),
    (["serving.probes.startup.exec=x"], "additional properties 'exec' not allowed"),
    (["serving.revisionHistoryLimit=0"], "/serving/revisionHistoryLimit"),
    (["extraVolumes[0].name=models", "extraVolumes[0].emptyDir.medium=Memory"], "is taken by the serving pod's own volumes"),
])
def test_refused_serving_values(sets, message):
    if message != "stage=serve reads the model from the MLflow registry: set mlflow.trackingUri":
        sets = [TRACKING, *sets]
    assert message in serve_error(*sets)


def test_helm_lint_strict_and_notes():
    out = helm_run("lint", "--strict", str(CHART), "--set", "stage=serve", "--set", TRACKING)
    assert "0 chart(s) failed" in out.stdout and "[WARNING]" not in out.stdout
    out = helm_run("install", "llmpipe-serve", str(CHART), "--dry-run=client", "-n", "ml", "-f", str(SHAPES / "serve.yaml")).stdout
    notes = out[out.index("NOTES:"):]
    assert "Serving models:/llm-pipeline@champion as release llmpipe-serve in namespace ml" in notes
    assert "llmpipe k8s status serve -n ml" in notes and "llmpipe promote" in notes
    assert "kubectl -n ml rollout status deployment/llmpipe-serve" in notes


def test_make_deploy_serve_upgrades_in_place():
    out = subprocess.run(["make", "-n", "deploy-serve", "K8S_NAMESPACE=ml", "VALUES=site.yaml", "HELM=helm"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "upgrade --install" in ln)
    assert re.search(r"helm upgrade --install llmpipe-serve charts/llm-pipeline -n ml --set stage=serve "
                     r"-f jobs/cluster/values/serve.yaml -f site.yaml", line), line
    assert "uninstall" not in out  # a rolling update, not a replacement
    out = subprocess.run(["make", "-n", "deploy-serve", "VARIANT=cpu", "HELM=helm"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "upgrade --install llmpipe-serve-cpu charts/llm-pipeline -n llm-pipeline --set stage=serve -f " \
           "jobs/cluster/values/serve-cpu.yaml" in out
    out = subprocess.run(["make", "-n", "deploy-pipeline", "HELM=helm"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "llmpipe-serve" not in out  # a Deployment never finishes: not a pipeline step


# --------------------------------------------------------------------------- the pods' scripts, executed


def _exe(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _local(text: str, models: Path, termlog: Path) -> str:
    """A rendered script with the pod's paths moved to local folders (as tests/helm/test_chart_run.py does)."""
    text = text.replace('"/tmp/llmpipe-', f'"{models.parent}/tmp-llmpipe-')
    return text.replace("/dev/termination-log", str(termlog)).replace("/models", str(models))


@pytest.mark.parametrize("pinned", [None, "5"])
def test_init_container_fetches_the_pinned_version_else_the_alias(tmp_path, pinned):
    """The init container's script with a stand-in for `llmpipe serve --fetch-only` (which resolves, downloads and
    writes served.json: pipeline/serving/resolve.py fetch): the URI it is given, and served.json as the termination
    message. The downward API gives an empty string for a missing annotation (kubernetes v1.33 pkg/fieldpath/
    fieldpath.go: ExtractFieldPathAsString returns GetAnnotations()[key])."""
    sets = [TRACKING] + ([f"serving.model.version={pinned}"] if pinned else [])
    deploy = one(render_serve(*sets), "Deployment")
    fetch = container(deploy, "fetch-model")
    bin_, models, termlog = tmp_path / "bin", tmp_path / "models", tmp_path / "termination-log"
    bin_.mkdir()
    models.mkdir()
    termlog.write_text("")
    _exe(bin_, "llmpipe", """import json, sys
args = sys.argv[1:]
into, uri = args[args.index("--fetch-only") + 1], args[args.index("--model") + 1]
open(into + "/argv.json", "w").write(json.dumps(args))
version = int(uri.rsplit("/", 1)[1]) if "@" not in uri else 4
served = {"name": "llm-pipeline", "version": version, "alias": None if "@" not in uri else "champion",
          "uri": "models:/llm-pipeline/%d" % version, "folder": into + "/v%d/hf" % version, "run_id": "r1"}
open(into + "/served.json", "w").write(json.dumps(served))
""")
    annotation = (deploy["spec"]["template"]["metadata"].get("annotations") or {}).get("llmpipe.io/model-version", "")
    env = {**{k: v for k, v in env_of(fetch).items() if isinstance(v, str)}, "LLMPIPE_MODEL_VERSION": annotation,
           "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    script = _local(fetch["args"][0], models, termlog)
    proc = subprocess.run([*fetch["command"], script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = json.loads((models / "argv.json").read_text())
    want = "models:/llm-pipeline/5" if pinned else "models:/llm-pipeline@champion"
    assert args == ["serve", "--fetch-only", str(models), "--model", want]
    assert f"fetch-model: {want} -> {models}" in proc.stdout
    assert json.loads(termlog.read_text())["version"] == (5 if pinned else 4)
    # a failed fetch fails the init container (the pod never starts the server)
    _exe(bin_, "llmpipe", "import sys; print('error: models:/llm-pipeline@champion does not exist', file=sys.stderr); sys.exit(1)")
    proc = subprocess.run([*fetch["command"], script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_vllm_launcher_serves_the_fetched_folder_with_versioned_request_logs(tmp_path):
    deploy = one(render_serve(TRACKING, "serving.profile=vllm", "gpus=2", "serving.vllm.args={--max-model-len,2048}"),
                 "Deployment")
    server = container(deploy)
    bin_, models = tmp_path / "bin", tmp_path / "models"
    bin_.mkdir()
    (models / "v9" / "hf").mkdir(parents=True)
    (models / "served.json").write_text(json.dumps({"name": "llm-pipeline", "version": 9, "alias": "champion",
                                                    "uri": "models:/llm-pipeline/9", "folder": str(models / "v9" / "hf"),
                                                    "run_id": "r"}))
    _exe(bin_, "vllm", """import json, os, sys
json.dump({"argv": sys.argv[1:], "config": os.environ["VLLM_LOGGING_CONFIG_PATH"]}, open(os.environ["OUT"], "w"))
""")
    out = tmp_path / "vllm.json"
    script = _local(server["command"][2], models, tmp_path / "unused")
    env = {**{k: v for k, v in env_of(server).items() if isinstance(v, str)}, "OUT": str(out),
           "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", script, *server["args"]], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert got["argv"] == ["serve", str(models / "v9" / "hf"), "--served-model-name", "llm-pipeline", "--host", "0.0.0.0",
                           "--port", "8000", "--max-model-len", "2048", "--tensor-parallel-size", "2"]
    assert "serving llm-pipeline version 9" in proc.stdout
    # the logging config vLLM and uvicorn load: an access log line carries the model and its version
    cfg = json.loads(Path(got["config"]).read_text())
    assert set(cfg["loggers"]) == {"vllm", "uvicorn", "uvicorn.error", "uvicorn.access"}
    records = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    formatter = logging.Formatter(cfg["formatters"]["served"]["format"])
    keep = Keep()
    keep.setFormatter(formatter)
    logging.config.dictConfig(cfg)  # valid for dictConfig as it is
    access = logging.getLogger("uvicorn.access")
    access.addHandler(keep)
    try:
        access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.7:51234", "POST", "/v1/chat/completions", "1.1", 200)
    finally:
        for name in cfg["loggers"]:
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    assert re.search(r"INFO model=llm-pipeline model_version=9 \[uvicorn.access\] 10.0.0.7:51234 - "
                     r'"POST /v1/chat/completions HTTP/1.1" 200$', records[0]), records


class _Completions(http.server.BaseHTTPRequestHandler):
    answer: dict | None = None
    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        if self.answer is None:
            self.send_response(503)
            self.end_headers()
            return
        data = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_vllm_startup_probe_passes_only_once_a_token_was_generated():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deploy = one(render_serve(TRACKING, "serving.profile=vllm", "gpus=1", f"serving.port={port}"), "Deployment")
    command = container(deploy)["startupProbe"]["exec"]["command"]
    assert command[0] == "python3"

    def probe() -> int:
        return subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=60).returncode

    assert probe() != 0  # nothing listens yet (the engine still loads: vLLM opens its port after)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Completions.answer = None
        assert probe() != 0  # the server answers, but not with a generation
        _Completions.answer = {"id": "cmpl-1", "object": "text_completion", "model": "llm-pipeline",
                               "choices": [{"index": 0, "text": " world", "finish_reason": "length"}]}
        assert probe() == 0
        path, body = _Completions.seen[-1]
        assert path == "/v1/completions" and body == {"model": "llm-pipeline", "prompt": "Hello", "max_tokens": 1}
    finally:
        server.shutdown()
        server.server_close()
