"""k8s/mlflow/ locked down: the MLflow server of server.yaml, started as a real `mlflow server --app-name basic-auth`
process with the Deployment's own args and environment (Secrets from secrets.yaml, the auth config from the
ConfigMap), refuses a request without credentials, accepts the admin, and the pipeline's tracking code logs a run as
the pipeline's (non-admin) MLflow user that the setup Job's script (k8s/mlflow/mlflow_users.py) creates.

With PostgreSQL on this machine (initdb, psycopg2) the backend store is a real PostgreSQL whose password holds
characters a URI cannot (it reaches libpq as PGPASSWORD, never in a URI); without, SQLite stands in and the
PostgreSQL test skips. No credential may appear on the command line of the server or any process it starts.

Offline checks of the manifests: no Secret value in any container's command or args, each Secret only where it is
needed, the NetworkPolicies select the chart's pods (helm template) and nothing else.
"""

from __future__ import annotations

import base64
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helm.chart import CHART, find_helm, kubectl
from tests.k8s.conftest import REPO

MLFLOW = REPO / "k8s" / "mlflow"
K8S_VERSION = "1.33.0"
# a PostgreSQL password a URI would break on (@ : / # % ? & space quote $())
PG_PASSWORD = "p@ss:w/rd #%?&$(x)'\"q"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _secrets(overrides: dict[tuple[str, str], str] | None = None) -> dict[str, dict[str, str]]:
    out = {d["metadata"]["name"]: dict(d["stringData"]) for d in _docs(MLFLOW / "secrets.yaml")}
    for (name, key), value in (overrides or {}).items():
        out[name][key] = value
    return out


def _container(path: Path, kind: str, name: str, container: str) -> dict:
    obj = next(d for d in _docs(path) if d["kind"] == kind and d["metadata"]["name"] == name)
    spec = obj["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container)


def _env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (literal values and secretKeyRefs; no $(VAR) here)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            assert "$(" not in e["value"], e
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


from pipeline.localserver import free_port as _free_port  # noqa: E402
from pipeline.localserver import wait_http  # noqa: E402


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def postgres(request):
    """A throw-away PostgreSQL on loopback with the bootstrap's user and database and PG_PASSWORD (the slow
    parameter: its migrations take a minute on two busy cores); None for SQLite, or when this machine has no
    PostgreSQL or psycopg2."""
    if request.param == "sqlite":
        yield None
        return
    bindir = _pg_bin()
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        bindir = None
    if bindir is None:
        pytest.skip("no PostgreSQL (initdb) or psycopg2 on this machine")
    pg = _secrets()["mlflow-postgres"]
    base = Path(tempfile.mkdtemp(prefix="llmpipe-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and no postgres user to run PostgreSQL as")
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pwfile = base / "pw"
    pwfile.write_text(PG_PASSWORD)
    if as_user:
        shutil.chown(pwfile, "postgres")
    port = _free_port()
    run = dict(capture_output=True, text=True, timeout=120)
    out = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(base / "data"), "-U", pg["POSTGRES_USER"],
                          f"--pwfile={pwfile}", "-A", "scram-sha-256"], **run)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(base / "data"), "-w", "-l", str(base / "log"),
                          "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], **run)
    assert out.returncode == 0, out.stderr + (base / "log").read_text()
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user=pg["POSTGRES_USER"], password=PG_PASSWORD, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{pg["POSTGRES_DB"]}"')
        conn.close()
        yield {"port": port}
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(base / "data"), "-m", "fast", "stop"], **run)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`mlflow server` with server.yaml's args and env, on a free loopback port."""
    from mlflow import environment_variables

    if not hasattr(environment_variables, "MLFLOW_AUTH_ADMIN_PASSWORD"):
        # the server is the mlflow image's (docker/mlflow.Dockerfile: the lock's MLflow); an older client-side MLflow
        # in this virtualenv (make test-floors: 3.10) reads the admin only from the ini file, which holds no secret
        import mlflow

        pytest.skip(f"MLflow {mlflow.__version__} takes no MLFLOW_AUTH_ADMIN_* from the environment; the image's does")
    base = tmp_path_factory.mktemp("mlflow-auth")
    secrets = _secrets({("mlflow-postgres", "POSTGRES_PASSWORD"): PG_PASSWORD})
    c = _container(MLFLOW / "server.yaml", "Deployment", "mlflow", "mlflow")
    env = _env(c, secrets)
    cm = next(d for d in _docs(MLFLOW / "server.yaml") if d["kind"] == "ConfigMap")
    ini = cm["data"]["basic_auth.ini"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "auth-config")["mountPath"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == f"{mount}/basic_auth.ini"
    if postgres:
        env.update(PGHOST="127.0.0.1", PGPORT=str(postgres["port"]))
    else:  # SQLite stands in for PostgreSQL (the same env-driven options)
        env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{base}/mlflow.db"
        ini = ini.replace("database_uri = postgresql+psycopg2://", f"database_uri = sqlite:///{base}/auth.db")
    (base / "basic_auth.ini").write_text(ini)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(base / "basic_auth.ini")
    port = _free_port()
    args = []
    for a in c["args"]:
        if a.startswith("--host="):
            a = "--host=127.0.0.1"
        elif a.startswith("--port="):
            a = f"--port={port}"
        elif a.startswith("--workers="):
            a = "--workers=1"  # two CPUs shared with other tests
        elif a.startswith("--artifacts-destination="):
            a = f"--artifacts-destination={base / 'artifacts'}"  # MinIO stands aside: artefacts are proxied either way
        args.append(a)
    assert args[:2] == ["server", "--app-name=basic-auth"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG", "AWS_"))}
    full_env.update(env)
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), *args], env=full_env, cwd=base, stdout=open(base / "server.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, timeout=120, what="mlflow server --app-name basic-auth", log=base / "server.log")
    except RuntimeError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    yield {"url": url, "proc": proc, "secrets": secrets, "postgres": postgres}
    os.killpg(proc.pid, signal.SIGTERM)  # the CLI, its uvicorn workers and job runner (its own session)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _call(url: str, path: str, auth: tuple[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + path)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def test_unauthenticated_request_is_refused_and_the_admin_accepted(server):
    url, auth = server["url"], server["secrets"]["mlflow-auth"]
    admin = (auth["MLFLOW_AUTH_ADMIN_USERNAME"], auth["MLFLOW_AUTH_ADMIN_PASSWORD"])
    code, headers = _call(url, SEARCH)
    assert code == 401 and headers.get("www-authenticate", "").startswith("Basic")
    assert _call(url, SEARCH, (admin[0], admin[1] + "x"))[0] == 401
    assert _call(url, SEARCH, ("nobody", admin[1]))[0] == 401
    assert _call(url, SEARCH, admin)[0] == 200
    assert _call(url, "/health")[0] == 200  # the kubelet's probes need no credentials


def _run_setup_script(url: str, secrets: dict) -> subprocess.CompletedProcess:
    c = _container(MLFLOW / "setup.yaml", "Job", "mlflow-setup", "mlflow-users")
    env = _env(c, secrets)
    assert env.pop("MLFLOW_TRACKING_URI") == "http://mlflow:5000"
    full = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full.update(env, MLFLOW_TRACKING_URI=url, WAIT_SECONDS="30")
    assert c["command"] == ["python", "/scripts/mlflow_users.py"]
    return subprocess.run([sys.executable, str(MLFLOW / "mlflow_users.py")], env=full, capture_output=True, text=True,
                          timeout=120)


def test_pipeline_user_logs_a_run_through_the_auth_app(server, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    url, secrets = server["url"], server["secrets"]
    user = secrets["llmpipe-mlflow"]
    out = _run_setup_script(url, secrets)
    assert out.returncode == 0, out.stderr
    assert f"MLflow user {user['MLFLOW_TRACKING_USERNAME']}: created" in out.stdout
    out = _run_setup_script(url, secrets)  # the Job runs again on every apply
    assert out.returncode == 0 and "exists, password set" in out.stdout, out.stderr

    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "auth-test")
    # no credentials: refused, and tracking goes off with a warning (the stage itself goes on)
    assert not tracking.Tracker(url).start("clean").on
    # the chart's pods: the keys of Secret llmpipe-mlflow as environment variables (mlflow.secretName)
    for k, v in user.items():
        monkeypatch.setenv(k, v)
    t = tracking.Tracker(url).start("clean", tags={"llmpipe.stage": "clean"})
    assert t.on
    t.params({"workers": "2"})
    t.metrics({"docs_kept": 42.0}, step=1)
    report = tmp_path / "report.json"
    report.write_text("{}")
    t.artifact(str(report))
    t.end()
    assert t.on, "a logging call failed"
    run = MlflowClient(tracking_uri=url).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["docs_kept"] == 42.0 and run.data.params["workers"] == "2"
    assert [f.path for f in MlflowClient(tracking_uri=url).list_artifacts(t.run_id)] == ["report.json"]
    # not an admin: it cannot create users
    with pytest.raises(MlflowException, match="403"):
        AuthServiceClient(url).create_user("intruder", "a-long-enough-password")


def _descendants(pid: int) -> list[int]:
    import psutil

    proc = psutil.Process(pid)
    return [pid] + [p.pid for p in proc.children(recursive=True)]


def test_no_credential_on_any_command_line_of_the_server(server):
    values = [v for name, kv in server["secrets"].items() for k, v in kv.items()
              if any(w in k for w in ("PASSWORD", "SECRET"))]
    assert PG_PASSWORD in values and len(values) >= 5
    pids = _descendants(server["proc"].pid)
    assert len(pids) >= 2  # mlflow's CLI and its uvicorn workers
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
        except FileNotFoundError:
            continue
        for v in values:
            assert v not in cmdline, f"pid {pid}: a credential on its command line: {cmdline[:200]}"


def test_postgres_password_with_uri_special_characters_works(server):
    """The backend store and the auth app's users live in PostgreSQL, reached with PG_PASSWORD through PGPASSWORD."""
    if not server["postgres"]:
        pytest.skip("the SQLite run (the postgres parameter is marked slow)")
    import psycopg2

    pg = server["secrets"]["mlflow-postgres"]
    conn = psycopg2.connect(host="127.0.0.1", port=server["postgres"]["port"], user=pg["POSTGRES_USER"],
                            password=PG_PASSWORD, dbname=pg["POSTGRES_DB"])
    with conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {r[0] for r in cur.fetchall()}
        cur.execute("SELECT username, is_admin FROM users")
        users = dict(cur.fetchall())
    conn.close()
    assert {"experiments", "runs", "registered_models", "alembic_version", "alembic_version_auth", "users"} <= tables
    assert users[server["secrets"]["mlflow-auth"]["MLFLOW_AUTH_ADMIN_USERNAME"]] is True


# ------------------------------------------------------------------------------ the manifests, offline

@pytest.fixture(scope="module")
def bundle() -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(REPO / "k8s")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _pods(bundle: list[dict]):
    for d in bundle:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]


def test_the_mlflow_manifests_validate(bundle):
    import kubernetes_validate

    kinds = {(d["kind"], d["metadata"]["name"]) for d in bundle}
    assert {("Job", "mlflow-setup"), ("NetworkPolicy", "mlflow"), ("NetworkPolicy", "mlflow-postgres"),
            ("NetworkPolicy", "minio"), ("ConfigMap", "mlflow-auth-config")} <= kinds
    for d in bundle:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    scripts = next(d for d in bundle if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mlflow-setup-scripts"))
    assert scripts["data"]["minio_users.sh"] == (MLFLOW / "minio_users.sh").read_text()
    assert scripts["data"]["mlflow_users.py"] == (MLFLOW / "mlflow_users.py").read_text()


def test_no_secret_value_in_any_command_or_args(bundle):
    values = {v for d in bundle if d["kind"] == "Secret" for k, v in d["stringData"].items()
              if "PASSWORD" in k or "SECRET" in k}
    assert len(values) >= 6
    secret_env: set[str] = set()
    for name, tmpl in _pods(bundle):
        for c in tmpl["spec"].get("initContainers", []) + tmpl["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", []) if "valueFrom" in e}
            secret_env |= names
            words = [*c.get("command", []), *c.get("args", [])]
            for w in words:
                assert not any(v in w for v in values), f"{name}/{c['name']}: a secret in {w!r}"
                # $(VAR) in command/args is expanded by the kubelet into the process's argv
                assert not any(f"$({n})" in w for n in names), f"{name}/{c['name']}: $(secret) in {w!r}"
            for e in c.get("env", []):  # a secret spliced into another variable is as good as one in a URI
                assert not any(f"$({n})" in e.get("value", "") for n in names), (name, e)
    assert {"PGPASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= secret_env


def test_each_secret_only_where_it_is_needed(bundle):
    users: dict[str, set[str]] = {}
    for name, tmpl in _pods(bundle):
        for c in tmpl["spec"].get("initContainers", []) + tmpl["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    users.setdefault(ref["name"], set()).add(f"{name}/{c['name']}")
            for src in c.get("envFrom", []):
                users.setdefault(src["secretRef"]["name"], set()).add(f"{name}/{c['name']}")
    assert users["mlflow-minio"] == {"minio/minio", "mlflow-setup/minio-users"}  # the root user: nobody else
    assert users["mlflow-s3"] == {"mlflow/mlflow", "mlflow-setup/minio-users"}
    assert users["llmpipe-s3"] == {"mlflow-setup/minio-users"}  # and the chart's pods, via storage.s3.secretName
    assert users["mlflow-auth"] == {"mlflow/mlflow", "mlflow-setup/mlflow-users"}
    assert users["mlflow-postgres"] == {"mlflow-postgres/postgres", "mlflow/mlflow"}


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def _admits(policy: dict, labels: dict, namespace_labels: dict | None = None) -> bool:
    """Whether an Ingress rule of `policy` admits a pod with `labels` (namespace_labels: from another namespace)."""
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            if namespace_labels is None and "podSelector" in peer and "namespaceSelector" not in peer:
                if _selects(peer["podSelector"], labels):
                    return True
            if namespace_labels is not None and "namespaceSelector" in peer and "podSelector" not in peer:
                if _selects(peer["namespaceSelector"], namespace_labels):
                    return True
    return False


def _chart_pod_labels() -> list[dict]:
    helm = find_helm()
    if helm is None:
        pytest.skip("helm not found")
    labels = []
    for args in (["--set", "stage=clean", "--set-file", f"config={REPO / 'jobs' / 'cluster' / 'clean.yaml'}"],
                 ["--set", "stage=pretrain", "--set-file", f"config={REPO / 'jobs' / 'cluster' / 'pretrain.yaml'}"],
                 ["--set", "stage=serve", "-f", str(REPO / "jobs" / "cluster" / "values" / "serve-cpu.yaml")]):
        out = subprocess.run([helm, "template", "llmpipe-x", str(CHART), "-n", "llm-pipeline", *args],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for d in yaml.safe_load_all(out.stdout):
            if not d:
                continue
            if d["kind"] in ("Job", "Deployment"):
                labels.append(d["spec"]["template"]["metadata"]["labels"])
            elif d["kind"] == "PyTorchJob":
                labels += [r["template"]["metadata"]["labels"] for r in d["spec"]["pytorchReplicaSpecs"].values()]
    assert len(labels) >= 3
    return labels


def test_network_policies_admit_the_pipeline_and_nothing_else(bundle):
    pol = {d["metadata"]["name"]: d for d in bundle if d["kind"] == "NetworkPolicy"}
    pods = {name: tmpl["metadata"]["labels"] for name, tmpl in _pods(bundle)}
    for name, p in pol.items():
        assert p["spec"]["policyTypes"] == ["Ingress"]
        selected = [n for n, lab in pods.items() if _selects(p["spec"]["podSelector"], lab)]
        assert selected == [{"mlflow": "mlflow", "mlflow-postgres": "mlflow-postgres", "minio": "minio"}[name]]
    chart = _chart_pod_labels()
    for labels in chart:  # stages and serving reach MLflow and MinIO, never PostgreSQL
        assert _admits(pol["mlflow"], labels) and _admits(pol["minio"], labels)
        assert not _admits(pol["mlflow-postgres"], labels)
    stranger = {"app": "something-else", "app.kubernetes.io/part-of": "llm-pipeline"}
    for p in pol.values():
        assert not _admits(p, stranger)
        assert not _admits(p, {}, {"kubernetes.io/metadata.name": "default"})
    assert _admits(pol["mlflow"], {"llmpipe.io/mlflow-client": "true"})
    assert _admits(pol["mlflow"], {}, {"kubernetes.io/metadata.name": "ingress-nginx"})  # the UI's ingress
    assert not _admits(pol["minio"], {}, {"kubernetes.io/metadata.name": "ingress-nginx"})
    assert _admits(pol["mlflow-postgres"], pods["mlflow"]) and not _admits(pol["mlflow-postgres"], pods["mlflow-setup"])
    assert _admits(pol["mlflow"], pods["mlflow-setup"]) and _admits(pol["minio"], pods["mlflow-setup"])
    # the ports are the containers' named ports
    ports = {name: {p["name"] for c in tmpl["spec"]["containers"] for p in c.get("ports", [])} for name, tmpl in _pods(bundle)}
    for name, target in (("mlflow", "mlflow"), ("mlflow-postgres", "mlflow-postgres"), ("minio", "minio")):
        for rule in pol[name]["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= ports[target]


def test_minio_setup_script_keeps_keys_off_the_command_line(tmp_path):
    """minio_users.sh with a recording `mc` on PATH (a stand-in: no MinIO here): every argv and stdin it gets;
    no secret in any argv, the new users' keys on stdin, each policy on its own bucket."""
    c = _container(MLFLOW / "setup.yaml", "Job", "mlflow-setup", "minio-users")
    assert c["command"] == ["/bin/sh", "/scripts/minio_users.sh"]
    secrets = _secrets()
    env = _env(c, secrets)
    log = tmp_path / "mc.log"
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n{ printf 'ARGV %s\\n' \"$*\"; printf 'HOST %s\\n' \"$MC_HOST_minio\";"
                    " case \"$*\" in 'admin user add'*) while IFS= read -r l; do printf 'STDIN %s\\n' \"$l\"; done;; esac;"
                    f" }} >> {log}\n")
    fake.chmod(0o755)
    full = {"PATH": f"{fake.parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env}
    out = subprocess.run(["/bin/sh", str(MLFLOW / "minio_users.sh")], env=full, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = log.read_text().splitlines()
    argv = [x[5:] for x in lines if x.startswith("ARGV ")]
    stdin = [x[6:] for x in lines if x.startswith("STDIN ")]
    root = secrets["mlflow-minio"]
    assert {x[5:] for x in lines if x.startswith("HOST ")} == {
        f"http://{root['MINIO_ROOT_USER']}:{root['MINIO_ROOT_PASSWORD']}@minio:9000"}
    values = [root["MINIO_ROOT_PASSWORD"], secrets["mlflow-s3"]["AWS_SECRET_ACCESS_KEY"], secrets["llmpipe-s3"]["AWS_SECRET_ACCESS_KEY"]]
    assert not any(v in a for a in argv for v in values)
    assert stdin == [secrets["mlflow-s3"]["AWS_ACCESS_KEY_ID"], secrets["mlflow-s3"]["AWS_SECRET_ACCESS_KEY"],
                     secrets["llmpipe-s3"]["AWS_ACCESS_KEY_ID"], secrets["llmpipe-s3"]["AWS_SECRET_ACCESS_KEY"]]
    assert "mb --ignore-existing minio/mlflow-artifacts" in argv and "mb --ignore-existing minio/llm-pipeline" in argv
    assert f"admin policy attach minio llmpipe-rw-llm-pipeline --user {secrets['llmpipe-s3']['AWS_ACCESS_KEY_ID']}" in argv
    import json

    policy = json.loads((tmp_path / "llmpipe-rw-llm-pipeline.json").read_text())
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::llm-pipeline", "arn:aws:s3:::llm-pipeline/*"}
    assert not any(a in ("s3:*", "admin:*") or a.startswith("admin:") for s in policy["Statement"] for a in s["Action"])
    # a root password with ':' is refused before anything runs (mc would misread it)
    log.unlink()
    bad = subprocess.run(["/bin/sh", str(MLFLOW / "minio_users.sh")], env={**full, "MINIO_ROOT_PASSWORD": "a:b"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "must not contain ':'" in bad.stderr and not log.exists()
