"""The rendered workloads, executed: every container the chart renders runs as a local process,
exactly as rendered (command, args, env), with what the controllers would add:

* Job: nothing; Indexed Job: ``JOB_COMPLETION_INDEX`` per pod, all pods at once, the merge Job
  started at the same time (it waits for the parts, as on the cluster);
* PyTorchJob: the pods the training operator v1.8.1 creates, built by its model (tests/k8s/operator.py:
  ``pods_for``: the env of envvar.go setPodEnv / master.go / elastic.go), one process per pod; when a pod
  ends Failed, the operator's decision (``restart_action``: pkg/controller.v1/common/pod.go ReconcilePods,
  pkg/util/train/train_util.go) recreates it under the same name or fails the job; the job succeeds with its
  Master (pytorchjob_controller.go UpdateJobStatus), or with a Worker of an elastic job.

Volumes become local folders: the ConfigMap's data is written where it is mounted, the PVC is one
shared folder, emptyDirs are fresh folders; mount paths in args and env values are rewritten to
those folders, nothing else. The only other changes: the pods' DNS names (the operator's per-pod
Services) resolve to localhost, because every "pod" shares it, and the rendezvous port (masterPort) is
set to a free local port with --set. Init containers (the operator's wait for the Master's DNS name)
are not run.

Chain: collect (Job) -> clean (Indexed Job x2 + merge) -> tokenizer (Job) -> pack (Indexed Job
x2 + merge) -> init (Job) on tests/fixtures/corpus, then pretrain as a PyTorchJob with 2 pods x 1
process (slow).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.localserver import free_port
from tests.conftest import CORPUS, write_configs
from tests.helm.chart import REPO, helm, one, pod_templates, render
from tests.k8s import operator

RUN_ROOT = "/data/runs/chart"
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 600
# the site values of this "cluster": a run root on the PVC, the corpus folder, one thread per process
SITE = {"runRoot": RUN_ROOT, "extraEnv": [{"name": "CORPUS_DIR", "value": "/data/corpus"},
                                          {"name": "OMP_NUM_THREADS", "value": "1"},
                                          {"name": "LLMPIPE_TRACKING", "value": "off"}]}
CLEAR = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX", "LLMPIPE_ROOT")


class Pod:
    """One rendered pod template run as a local process."""

    def __init__(self, name: str, template: dict, objects: list[dict], cluster: Path, env: dict[str, str] | None = None):
        spec = template["spec"]
        (self.container,) = spec["containers"]
        self.name = name
        self.dir = cluster / "pods" / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        volumes = {}
        for vol in spec["volumes"]:
            if "configMap" in vol:
                cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == vol["configMap"]["name"])
                folder = self.dir / f"vol-{vol['name']}"
                folder.mkdir()
                for item in vol["configMap"]["items"]:
                    (folder / item["path"]).write_text(cm["data"][item["key"]], encoding="utf-8")
            elif "persistentVolumeClaim" in vol:
                folder = cluster / "pvc" / vol["persistentVolumeClaim"]["claimName"]
            elif "emptyDir" in vol:
                folder = self.dir / f"vol-{vol['name']}"
                folder.mkdir()
            else:
                raise AssertionError(f"no local stand-in for volume {vol}")
            volumes[vol["name"]] = folder
        self.mounts = {}
        for m in self.container["volumeMounts"]:
            local = volumes[m["name"]] / m.get("subPath", "")
            local.mkdir(parents=True, exist_ok=True)
            self.mounts[m["mountPath"].rstrip("/")] = str(local)
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None

    def local(self, value: str) -> str:
        """A pod path as the local path: only a mount path prefix changes."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return self.mounts[mount] + value[len(mount):]
        return value

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CLEAR and not k.startswith("PET_")}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the image's PATH starts with its venv
        for item in self.container.get("env", []):
            assert "value" in item, f"{item['name']}: only literal values can run locally"
            env[item["name"]] = self.local(item["value"])
        env.update(self.extra_env)
        return env

    def argv(self) -> list[str]:
        return [self.local(a) for a in self.container["command"] + self.container["args"]]

    def start(self) -> "Pod":
        env = self.environment()
        argv = self.argv()
        exe = shutil.which(argv[0], path=env["PATH"])
        assert exe, f"{argv[0]} is not on the pod's PATH"
        self.log = self.dir / "log.txt"
        self.proc = subprocess.Popen([exe, *argv[1:]], env=env, cwd=self.local("/home/llmpipe"),
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        return self

    def wait(self, timeout: float = TIMEOUT) -> str:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"pod {self.name} did not finish in {timeout}s:\n{self.log.read_text()[-3000:]}")
        out = self.log.read_text(errors="replace")
        assert rc == 0, f"pod {self.name} exited {rc}:\n{out[-4000:]}"
        return out


def run_jobs(objects: list[dict], cluster: Path) -> dict[str, list[str]]:
    """What the Job controller does: every pod of every Job at once; returns the logs by Job name.

    kubernetes pkg/controller/job/job_controller.go, ``manageJob``: a Job wants ``parallelism`` active pods
    (at most ``completions`` minus the succeeded ones) and creates the missing ones in one pass; for an Indexed
    Job, pkg/controller/job/indexed_job_utils.go ``firstPendingIndexes`` gives them the indexes not yet active
    or succeeded, each pod's ``JOB_COMPLETION_INDEX``. With parallelism = completions (our chart; asserted below)
    every rank runs at once, which clean's ranks need: they meet between its steps."""
    pods: dict[str, list[Pod]] = {}
    for job in (o for o in objects if o["kind"] == "Job"):
        spec, name = job["spec"], job["metadata"]["name"]
        tpl = spec["template"]
        if spec.get("completionMode") == "Indexed":
            assert spec["parallelism"] == spec["completions"]
            pods[name] = [Pod(f"{name}-{i}", tpl, objects, cluster, {"JOB_COMPLETION_INDEX": str(i)})
                          for i in range(spec["completions"])]
        else:
            pods[name] = [Pod(f"{name}-0", tpl, objects, cluster)]
    for group in pods.values():
        for p in group:
            p.start()
    return {name: [p.wait() for p in group] for name, group in pods.items()}


class PyTorchJobRun:
    """What the training operator does with a rendered PyTorchJob, on this machine (see the module docstring)."""

    def __init__(self, ptj: dict, objects: list[dict], cluster: Path, max_starts: int = 6):
        self.job = operator.defaulted(ptj)
        self.objects, self.cluster, self.max_starts = objects, cluster, max_starts
        self.pods = operator.pods_for(self.job)
        self.hosts = {p["metadata"]["name"] for p in self.pods}  # their Services' DNS names
        self.running: dict[str, Pod] = {}
        self.starts: dict[str, int] = {}
        self.exits: list[tuple[str, int]] = []  # (pod, exit code) of every pod that ended, in order
        self.logs: dict[str, list[str]] = {}  # pod name -> the log of each of its incarnations

    def _start(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}
        for key, value in env.items():  # the pods' DNS names (<job>-master-0, <job>-worker-0) -> this machine
            host, _, port = value.partition(":")
            if host in self.hosts:
                env[key] = "localhost" + (f":{port}" if port else "")
        run = self.starts[name] = self.starts.get(name, 0) + 1
        self.running[name] = Pod(f"{name}.{run}", {"spec": pod["spec"]}, self.objects, self.cluster, env).start()

    def run(self, chaos=None, timeout: float = TIMEOUT) -> "PyTorchJobRun":
        """Start every pod; restart or fail them as the operator would; return when the job has succeeded.
        ``chaos(run)`` is called while the pods run (a test kills one from there)."""
        for pod in self.pods:
            self._start(pod)
        deadline = time.monotonic() + timeout
        elastic = bool(self.job["spec"].get("elasticPolicy"))
        done = set()
        while self.running:
            if time.monotonic() > deadline:
                for p in self.running.values():
                    p.proc.kill()
                raise AssertionError(f"PyTorchJob did not finish in {timeout}s; exits {self.exits}")
            if chaos is not None:
                chaos(self)
            for name, pod in list(self.running.items()):
                rc = pod.proc.poll()
                if rc is None:
                    continue
                del self.running[name]
                code = 128 - rc if rc < 0 else rc  # the kubelet reports a signal N as exit code 128+N
                self.exits.append((name, code))
                self.logs.setdefault(name, []).append(pod.log.read_text(errors="replace"))
                spec = next(p for p in self.pods if p["metadata"]["name"] == name)
                rtype = spec["metadata"]["labels"][operator.REPLICA_TYPE_LABEL].capitalize()
                if code == 0:
                    done.add(name)
                    continue
                action = operator.restart_action(self.job["spec"]["pytorchReplicaSpecs"][rtype]["restartPolicy"], code)
                if action == "fail" or self.starts[name] >= self.max_starts:
                    for p in self.running.values():
                        p.proc.kill()
                    raise AssertionError(f"pod {name} exited {code}: the operator {'fails the job' if action == 'fail' else 'would restart it again'}"
                                         f"; exits {self.exits}:\n{self.logs[name][-1][-4000:]}")
                self._start(spec)  # ReconcilePods deletes it; the next reconcile creates it under the same name
            time.sleep(0.1)
        masters = [n for n in self.starts if n.endswith("-master-0")]
        assert (set(masters) <= done) if masters else (elastic and done), f"no success: exits {self.exits}"
        return self

    def last_logs(self) -> list[str]:
        return [self.logs[p["metadata"]["name"]][-1] for p in self.pods]


def run_pytorchjob(ptj: dict, objects: list[dict], cluster: Path) -> list[str]:
    """Run a PyTorchJob to success; the last log of each pod (Master first)."""
    return PyTorchJobRun(ptj, objects, cluster).run().last_logs()


def configs(folder: Path) -> dict[str, Path]:
    """jobs/demo configs where they are small enough, else the fixtures' quick data configs."""
    write_configs(folder, corpus=Path("${CORPUS_DIR}"))  # CORPUS_DIR: an extraEnv value, a path on the PVC
    out = {s: folder / f"{s}.yaml" for s in ("collect", "tokenizer", "pack")}
    out["clean"] = REPO / "jobs" / "demo" / "clean.yaml"
    out["init"] = REPO / "jobs" / "demo" / "init.yaml"
    # a pack variant (what jobs/*/pack-clean.yaml is) into shards-clean/, the demo's second data phase
    pack = yaml.safe_load(out["pack"].read_text())
    (folder / "pack-clean.yaml").write_text(yaml.safe_dump({**pack, "input": "clean", "output": "shards-clean"}))
    out["pack-clean"] = folder / "pack-clean.yaml"
    pre = yaml.safe_load((REPO / "jobs" / "demo" / "pretrain.yaml").read_text())
    pre.update(phases=[{"name": "broad", "shards": "shards", "until_step": 2}, {"name": "strict", "shards": "shards-clean"}])
    pre.update(max_steps=4, global_batch_tokens=64 * 4 * 2, warmup_steps=1, checkpoint_every=2, eval_every=2,
               eval_max_blocks=8, log_every=1, generation={"every": 4, "prompts": ["The"], "max_new_tokens": 4})
    (folder / "pretrain.yaml").write_text(yaml.safe_dump(pre, allow_unicode=True))
    out["pretrain"] = folder / "pretrain.yaml"
    return out


def manifest(root: Path, name: str) -> dict:
    return json.loads((root / name / "manifest.json").read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    helm()
    base = tmp_path_factory.mktemp("chart-run")
    pvc = base / "pvc" / "llmpipe-data"
    shutil.copytree(CORPUS, pvc / "corpus")
    site = base / "site.yaml"
    site.write_text(yaml.safe_dump(SITE))
    return base, pvc, configs(base / "jobs"), site


@pytest.fixture(scope="module")
def data_chain(cluster):
    """collect (Job), then clean (Indexed Job with 2 pods + the merge Job, all started together)."""
    base, pvc, cfgs, site = cluster
    root = pvc / RUN_ROOT.removeprefix("/data/")
    logs = {}
    t0 = time.monotonic()
    for stage in ("collect", "clean"):
        logs[stage] = run_jobs(render(stage, cfgs[stage], "workers=2", values=[site]), base)
    return root, logs, time.monotonic() - t0


def test_rendered_job_and_indexed_job_run_collect_and_clean(data_chain):
    root, logs, seconds = data_chain
    raw = manifest(root, "raw")
    assert raw["stage"] == "collect" and raw["metrics"]["documents"] > 100
    clean = manifest(root, "clean")
    assert clean["metrics"]["documents_in"] == raw["metrics"]["documents"]
    assert 0 < clean["metrics"]["kept"] < clean["metrics"]["documents_in"]
    assert clean["inputs"]["raw"]["fingerprint"] == raw["fingerprint"]  # lineage
    assert clean["inputs"]["raw"]["uri"] == str(root / "raw")  # the run root came from --root on the PVC
    assert not (root / "clean.parts").exists()  # the merge Job merged and removed both ranks' parts
    part_logs = logs["clean"]["llmpipe-clean-part"]
    assert len(part_logs) == 2
    for rank, out in enumerate(part_logs):
        assert f"== clean rank {rank}/2: done" in out
    (merge_log,) = logs["clean"]["llmpipe-clean-merge"]
    assert "== clean: done" in merge_log
    print(f"collect + clean through the chart: {seconds:.0f}s")


@pytest.fixture(scope="module")
def model_inputs(cluster, data_chain):
    """tokenizer (Job) -> pack (Indexed Job + merge), its pack-clean variant -> init (Job): what pretrain reads."""
    base, _, cfgs, site = cluster
    root, _, _ = data_chain
    t0 = time.monotonic()
    logs = {stage: run_jobs(render(stage, cfgs[stage], "workers=2", values=[site]), base)
            for stage in ("tokenizer", "pack", "init")}
    # the variant: the same chart and stage with the pack-clean config (its parts and merge go to shards-clean)
    logs["pack-clean"] = run_jobs(render("pack", cfgs["pack-clean"], "workers=2", values=[site]), base)
    print(f"tokenizer + pack + init: {time.monotonic() - t0:.0f}s")
    return root, logs


@pytest.mark.slow
def test_rendered_workloads_run_on_to_a_model_pretrained_by_a_two_pod_pytorchjob(cluster, model_inputs):
    """tokenizer (Job) -> pack (Indexed Job + merge) -> init (Job) -> pretrain (PyTorchJob, 2 pods x 1 process)."""
    base, _, cfgs, site = cluster
    root, logs = model_inputs
    for rank, out in enumerate(logs["pack"]["llmpipe-pack-part"]):
        assert f"== pack rank {rank}/2: done" in out
    (merge_log,) = logs["pack-clean"]["llmpipe-pack-merge"]
    assert "== pack -> shards-clean/: done" in merge_log
    assert manifest(root, "shards-clean")["world_size"] == 2 and not (root / "shards-clean.parts").exists()
    tok, shards, init = manifest(root, "tokenizer"), manifest(root, "shards"), manifest(root, "models/init")
    assert not (root / "shards.parts").exists()
    assert shards["inputs"]["tokenizer"]["fingerprint"] == tok["fingerprint"]
    cfg = json.loads((root / "models" / "init" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] >= 800 // 2
    t1 = time.monotonic()

    objs = render("pretrain", cfgs["pretrain"], "nnodes=2", "nprocPerNode=1", f"masterPort={free_port()}", values=[site])
    ptj = one(objs, "PyTorchJob")
    assert len(pod_templates(ptj)) == 2
    master_log, worker_log = run_pytorchjob(ptj, objs, base)
    m = manifest(root, "models/pretrain")
    assert m["stage"] == "pretrain"
    assert m["inputs"]["models/init"]["fingerprint"] == init["fingerprint"]
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["steps"] == 4
    assert m["metrics"]["phases"]["strict"] == {"shards": "shards-clean", "steps": [2, 4],
                                                "fingerprint": manifest(root, "shards-clean")["fingerprint"]}
    assert m["metrics"]["tokens"] == 4 * 512  # 2 ranks x micro 4 x 64 tokens per step
    assert (root / "models" / "pretrain" / "model.safetensors").is_file()
    assert "--nnodes 2 --node-rank 0 --master-addr localhost" in master_log
    assert "--nnodes 2 --node-rank 1 --master-addr localhost" in worker_log
    assert "[PyTorchJob env]" in master_log
    print(f"pretrain PyTorchJob: {time.monotonic() - t1:.0f}s")


def _run_root_like(root: Path, run: Path) -> Path:
    """A run root of its own with the same inputs as ``root`` (another test's model is not this one's business)."""
    run.mkdir(parents=True)
    for name in ("tokenizer", "shards", "shards-clean", "models"):
        shutil.copytree(root / name, run / name, ignore=shutil.ignore_patterns("pretrain"))
    return run


@pytest.mark.slow
def test_an_elastic_pytorchjob_runs_through_the_operators_c10d_rendezvous(cluster, model_inputs):
    """elasticPolicy: 2 Workers and no Master; the operator's PET_RDZV_ENDPOINT (<job>-worker-0), PET_NNODES 2:2 and
    PET_MAX_RESTARTS reach torchrun as flags (training-operator v1.8.1 elastic.go), and the job succeeds with its
    Workers (pytorchjob_controller.go UpdateJobStatus)."""
    base, pvc, cfgs, site = cluster
    root, _ = model_inputs
    run = _run_root_like(root, pvc / "runs" / "elastic")
    objs = render("pretrain", cfgs["pretrain"], "nnodes=2", "nprocPerNode=1", f"masterPort={free_port()}",
                  "elasticPolicy.maxRestarts=1", "runRoot=/data/runs/elastic", values=[site])
    ptj = one(objs, "PyTorchJob")
    assert list(ptj["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    t0 = time.monotonic()
    job = PyTorchJobRun(ptj, objs, base).run(timeout=600)
    logs = job.last_logs()
    assert [code for _, code in job.exits] == [0, 0], job.exits
    for log in logs:
        assert "--nnodes 2:2 --rdzv-backend c10d --rdzv-endpoint localhost:" in log and "--max-restarts 1" in log
        assert "[PyTorchJob env, elastic]" in log
    m = manifest(run, "models/pretrain")
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["steps"] == 4
    print(f"elastic PyTorchJob: {time.monotonic() - t0:.0f}s")


def _samples_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "samples"' in line]


def _kill_rank_of(pod: Pod, sig: int) -> bool:
    """Send ``sig`` to the training process (torchrun's worker, LOCAL_RANK set) inside a pod; False if none yet."""
    import psutil

    for child in psutil.Process(pod.proc.pid).children(recursive=True):
        try:
            if "LOCAL_RANK" in child.environ():
                child.send_signal(sig)
                return True
        except psutil.Error:
            continue
    return False


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["sigterm-worker-pod", "oom-kill-master-rank"])
def test_a_preempted_pod_makes_the_pytorchjob_restart_and_resume_from_its_checkpoint(cluster, model_inputs, tmp_path,
                                                                                      victim):
    """Mid-run, either SIGTERM to the Worker pod's process (what the kubelet sends on preemption or eviction), or
    SIGKILL to the training process inside the Master pod (what the OOM killer does). The hit pod's launcher exits
    143 / 137, the other pod's rank loses its peer and its launcher exits 143; the operator recreates both pods
    (restartPolicy ExitCode, >= 128); they resume from the newest complete checkpoint and finish at the same final
    step as an uninterrupted run."""
    import signal

    base, pvc, cfgs, site = cluster
    root, _ = model_inputs
    steps = 16
    cfg = yaml.safe_load(cfgs["pretrain"].read_text())
    cfg.update(max_steps=steps, checkpoint_every=4, keep_checkpoints=4, eval_every=0,
               phases=[{"name": "broad", "shards": "shards", "until_step": 8}, {"name": "strict", "shards": "shards-clean"}],
               generation={"every": 0, "prompts": []})
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    run = _run_root_like(root, pvc / "runs" / victim)
    objs = render("pretrain", path, "nnodes=2", "nprocPerNode=1", f"masterPort={free_port()}",
                  f"runRoot=/data/runs/{victim}", values=[site])
    job = PyTorchJobRun(one(objs, "PyTorchJob"), objs, base)
    metrics = run / "checkpoints" / "pretrain" / "metrics.jsonl"
    master, worker = "llmpipe-pretrain-master-0", "llmpipe-pretrain-worker-0"
    hit, other, code = (worker, master, 143) if victim == "sigterm-worker-pod" else (master, worker, 137)
    killed = []

    def chaos(r: PyTorchJobRun) -> None:
        pod = r.running.get(hit)
        if killed or pod is None or max(_samples_steps(metrics), default=0) < 6:
            return
        if victim == "sigterm-worker-pod":
            pod.proc.send_signal(signal.SIGTERM)
            killed.append(time.monotonic())
        elif _kill_rank_of(pod, signal.SIGKILL):
            killed.append(time.monotonic())

    t0 = time.monotonic()
    job.run(chaos=chaos, timeout=900)
    assert killed, "the run ended before it could be hit"
    first = dict(job.exits[:2])
    assert first == {hit: code, other: 143}, job.exits  # both retryable (>= 128)
    hit_line = job.logs[hit][0].strip().splitlines()[-1]
    if victim == "sigterm-worker-pod":
        assert "exit 143: stopped by SIGTERM, the operator restarts the pod" in hit_line, hit_line
    else:
        assert "exit 137: rank 0 was killed by signal 9" in hit_line, hit_line
    other_line = job.logs[other][0].strip().splitlines()[-1]
    assert "exit 143: rank" in other_line and "lost a peer" in other_line, other_line
    assert job.exits[-2:] and all(c == 0 for _, c in job.exits[-2:])
    m = manifest(run, "models/pretrain")
    resumed = m["metrics"]["resumed_from_step"]
    assert resumed in (4, 8, 12) and m["metrics"]["steps"] == steps
    assert sorted(set(_samples_steps(metrics))) == list(range(1, steps + 1))
    restarts = json.loads((run / "checkpoints" / "pretrain" / "restarts.json").read_text())
    assert restarts["step"] == resumed and restarts["starts"] <= 2  # progress was made: the count started over
    assert "resuming from step" in job.logs[master][-1]
    print(f"{victim}: {time.monotonic() - t0:.0f}s, {sum(job.starts.values())} pod starts, "
          f"resumed from step {resumed}; exits {job.exits}")
