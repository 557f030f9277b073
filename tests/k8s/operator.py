"""What the Kubeflow training operator v1.8.1 does to a PyTorchJob, as plain Python over dicts.

A model for tests: it turns a PyTorchJob (as `helm template` renders it) into the Pods and
Services the operator's PyTorchJob controller would create, and reproduces the decisions the
controller takes afterwards (restart or fail a replica, backoff limit, clean-up, job
conditions). No API server and no Go toolchain: each function reproduces one Go function of
github.com/kubeflow/training-operator at tag v1.8.1 and names it in its docstring
(``pkg/...go: FuncName``). Read from the tag, not copied: the only upstream text kept verbatim is
the default init container template, as data (DEFAULT_INIT_TEMPLATE), because the tests must
prove that *that* template is what the namespace's Pod Security admission rejects.

Where the Go code iterates a map (replica types, container ports) the order is random; the model
uses a fixed order (Master before Worker, ports by name) and says so. Where the Go code panics
(a nil pointer) or returns an error, the model raises OperatorError with the message.

Not modelled: gang scheduling (PodGroups, schedulerName), the HPA of elastic jobs, suspension,
ttlSecondsAfterFinished, expectations/requeues, owner-reference adoption.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterable

import yaml

OPERATOR_VERSION = "v1.8.1"
API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"

# pkg/apis/kubeflow.org/v1/pytorch_types.go
DEFAULT_CONTAINER_NAME = "pytorch"
DEFAULT_PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456
DEFAULT_RESTART_POLICY = "OnFailure"
MASTER, WORKER = "Master", "Worker"
REPLICA_TYPES = (MASTER, WORKER)
BACKEND_C10D = "c10d"
# pkg/apis/kubeflow.org/v1/pytorch_defaults.go
DEFAULT_NPROC_PER_NODE = "auto"
# pkg/controller.v1/pytorch/pytorchjob_controller.go: controllerName
CONTROLLER_NAME = "pytorchjob-controller"
# pkg/webhooks/pytorch/pytorchjob_webhook.go (+kubebuilder:webhook name=...)
WEBHOOK_NAME = "validator.pytorchjob.training-operator.kubeflow.org"

# pkg/apis/kubeflow.org/v1/common_types.go
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
OPERATOR_NAME_LABEL = "training.kubeflow.org/operator-name"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")

# pkg/config/config.go and cmd/training-operator.v1/main.go (the flags that set them)
INIT_CONTAINER_IMAGE_DEFAULT = "alpine:3.10"          # --pytorch-init-container-image
INIT_TEMPLATE_FILE_DEFAULT = "/etc/config/initContainer.yaml"  # --pytorch-init-container-template-file
INIT_MAX_TRIES_DEFAULT = 100                          # --pytorch-init-container-max-tries
INIT_TEMPLATE_FLAG = "--pytorch-init-container-template-file"
INIT_IMAGE_FLAG = "--pytorch-init-container-image"

# pkg/controller.v1/pytorch/initcontainer.go: initContainerTemplate (verbatim, as data: the template
# the operator uses when the template file cannot be read)
DEFAULT_INIT_TEMPLATE = """
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits:
      cpu: 100m
      memory: 20Mi
    requests:
      cpu: 50m
      memory: 10Mi
  command: ['sh', '-c', 'err=1;for i in $(seq {{.MaxTries}}); do if nslookup {{.MasterAddr}}; then err=0 && break; fi;echo waiting for master; sleep 2; done; exit $err']"""

# pkg/controller.v1/pytorch/envvar.go, master.go, elastic.go
ENV_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
ENV_NNODES = "PET_NNODES"
ENV_NODE_RANK = "PET_NODE_RANK"
ENV_MASTER_PORT, ENV_MASTER_ADDR = "MASTER_PORT", "MASTER_ADDR"
ENV_PET_MASTER_PORT, ENV_PET_MASTER_ADDR = "PET_MASTER_PORT", "PET_MASTER_ADDR"
ENV_RDZV_BACKEND = "PET_RDZV_BACKEND"
ENV_RDZV_ID = "PET_RDZV_ID"
ENV_RDZV_CONF = "PET_RDZV_CONF"
ENV_RDZV_ENDPOINT = "PET_RDZV_ENDPOINT"
ENV_STANDALONE = "PET_STANDALONE"
ENV_MAX_RESTARTS = "PET_MAX_RESTARTS"

# pkg/controller.v1/common/pod.go: ReconcilePods (exit code when the pytorch container has not terminated)
NO_EXIT_CODE = 0xBEEF

# pkg/util/status.go / common_types.go: condition types and reasons
JOB_CREATED, JOB_RUNNING, JOB_RESTARTING = "Created", "Running", "Restarting"
JOB_SUCCEEDED, JOB_SUSPENDED, JOB_FAILED = "Succeeded", "Suspended", "Failed"


class OperatorError(Exception):
    """An error the Go code returns (or a nil-pointer panic it hits) for this job."""


def _spec(job: dict) -> dict:
    return job.setdefault("spec", {})


def _replicas(job: dict) -> dict:
    return _spec(job).get("pytorchReplicaSpecs") or {}


def _rtype_order(replicas: dict) -> list[str]:
    """Replica types in the model's fixed order (Go ranges over a map: random order)."""
    known = [t for t in REPLICA_TYPES if t in replicas]
    return known + sorted(t for t in replicas if t not in REPLICA_TYPES)


# ------------------------------------------------------------------------------------ defaults


def _set_type_names_to_camel_case(job: dict) -> None:
    """pkg/apis/kubeflow.org/v1/defaulting_utils.go: setTypeNameToCamelCase (via
    pytorch_defaults.go: setPyTorchTypeNamesToCamelCase): "master"/"WORKER" keys become Master/Worker."""
    replicas = _replicas(job)
    for typ in REPLICA_TYPES:
        for key in list(replicas):
            if key.lower() == typ.lower() and key != typ:
                replicas[typ] = replicas.pop(key)
                break


def _default_container_index(pod_spec: dict) -> int:
    """pkg/apis/kubeflow.org/v1/defaulting_utils.go: getDefaultContainerIndex (0 when no "pytorch")."""
    for i, c in enumerate(pod_spec.get("containers") or []):
        if c.get("name") == DEFAULT_CONTAINER_NAME:
            return i
    return 0


def _set_default_port(pod_spec: dict) -> None:
    """pkg/apis/kubeflow.org/v1/pytorch_defaults.go: setPyTorchDefaultPort (with hasDefaultPort and
    setDefaultPort): append pytorchjob-port 23456 to the pytorch container unless it has a port of that name."""
    containers = pod_spec.get("containers") or []
    if not containers:
        raise OperatorError("runtime error: index out of range [0] with length 0 (setPyTorchDefaultPort: no containers)")
    c = containers[_default_container_index(pod_spec)]
    if not any(p.get("name") == DEFAULT_PORT_NAME for p in c.get("ports") or []):
        c.setdefault("ports", []).append({"name": DEFAULT_PORT_NAME, "containerPort": DEFAULT_PORT})


def _set_elastic_policy(job: dict) -> None:
    """pkg/apis/kubeflow.org/v1/pytorch_defaults.go: setElasticPolicy: with an elasticPolicy, a missing
    min/maxReplicas takes the other's value; with neither, both take the Worker's replicas."""
    ep = _spec(job).get("elasticPolicy")
    if ep is None:
        return
    lo, hi = ep.get("minReplicas"), ep.get("maxReplicas")
    if hi is not None and lo is not None:
        return
    if hi is not None:
        ep["minReplicas"] = hi
    elif lo is not None:
        ep["maxReplicas"] = lo
    else:
        worker = _replicas(job).get(WORKER)
        if worker is None:
            raise OperatorError("runtime error: invalid memory address or nil pointer dereference "
                                "(setElasticPolicy: elasticPolicy without min/maxReplicas and no Worker spec)")
        ep["maxReplicas"] = worker.get("replicas")
        ep["minReplicas"] = worker.get("replicas")


def _set_default_nproc_per_node(job: dict) -> None:
    """pkg/apis/kubeflow.org/v1/pytorch_defaults.go: setDefaultNprocPerNode: nprocPerNode "auto" unless set,
    or unless the (deprecated) elasticPolicy.nProcPerNode is set."""
    spec = _spec(job)
    ep = spec.get("elasticPolicy")
    if ep is None or ep.get("nProcPerNode") is None:
        if spec.get("nprocPerNode") is None:
            spec["nprocPerNode"] = DEFAULT_NPROC_PER_NODE


def defaulted(job: dict) -> dict:
    """pkg/apis/kubeflow.org/v1/pytorch_defaults.go: SetDefaults_PyTorchJob, on a copy: cleanPodPolicy
    None, replica type names camel-cased, per replica 1 replica / restartPolicy OnFailure / the default
    port, the elastic policy's min/max, nprocPerNode "auto". The reconciler applies it in memory
    (pytorchjob_controller.go: Reconcile calls r.Scheme.Default) before creating anything."""
    job = copy.deepcopy(job)
    run_policy = _spec(job).setdefault("runPolicy", {})
    if run_policy.get("cleanPodPolicy") is None:
        run_policy["cleanPodPolicy"] = "None"
    _set_type_names_to_camel_case(job)
    for rtype in _rtype_order(_replicas(job)):
        rspec = _replicas(job)[rtype]
        if rspec is None:
            continue
        if rspec.get("replicas") is None:
            rspec["replicas"] = 1                            # defaulting_utils.go: setDefaultReplicas
        if not rspec.get("restartPolicy"):
            rspec["restartPolicy"] = DEFAULT_RESTART_POLICY  # defaulting_utils.go: setDefaultRestartPolicy
        _set_default_port(rspec.setdefault("template", {}).setdefault("spec", {}))
    _set_elastic_policy(job)
    _set_default_nproc_per_node(job)
    return job


# ---------------------------------------------------------------------------------- validation

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_FMT = "[a-z]([-a-z0-9]*[a-z0-9])?"


def _dns1035_errors(value: str) -> list[str]:
    """k8s.io/apimachinery v0.29.3 pkg/util/validation/validation.go: IsDNS1035Label (the training
    operator v1.8.1 builds with apimachinery v0.29.3), messages from MaxLenError and RegexError."""
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _DNS1035.match(value):
        errs.append("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                    f"regex used for validation is '{_DNS1035_FMT}')")
    return errs


class FieldError:
    """k8s.io/apimachinery pkg/util/validation/field/errors.go: Error (Type, Field, BadValue, Detail),
    with Error()/ErrorBody() as the string form."""

    TYPES = {"Required": "Required value", "Invalid": "Invalid value", "NotSupported": "Unsupported value",
             "Forbidden": "Forbidden"}

    def __init__(self, type_: str, field: str, bad_value: Any = None, detail: str = ""):
        self.type, self.field, self.bad_value, self.detail = type_, field, bad_value, detail

    def __repr__(self) -> str:
        return f"FieldError({self.type!r}, {self.field!r})"

    def __str__(self) -> str:
        body = self.TYPES[self.type]
        if self.type not in ("Required", "Forbidden"):
            v = self.bad_value
            body += ": " + ("null" if v is None else str(v).lower() if isinstance(v, bool)
                            else f'"{v}"' if isinstance(v, str) else str(v))
        if self.detail:
            body += f": {self.detail}"
        return f"{self.field}: {body}"


def validation_errors(job: dict) -> list[FieldError]:
    """pkg/webhooks/pytorch/pytorchjob_webhook.go: validatePyTorchJob (with validateSpec and
    validatePyTorchReplicaSpecs): the validating webhook, on the job as submitted (no defaulting).
    Replica types are visited Master, Worker, then the rest (Go: map order)."""
    errs: list[FieldError] = []
    name = (job.get("metadata") or {}).get("name", "")
    dns = _dns1035_errors(name)
    if dns:
        errs.append(FieldError("Invalid", "metadata.name", name, f"should match: {','.join(dns)}"))
    spec = job.get("spec") or {}
    ep = spec.get("elasticPolicy")
    if ep is not None and ep.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        errs.append(FieldError("Forbidden", "spec.elasticPolicy.nProcPerNode", detail="must not be used with spec.nprocPerNode"))
    rspecs = spec.get("pytorchReplicaSpecs")
    if rspecs is None:
        errs.append(FieldError("Required", "spec.pytorchReplicaSpecs", detail="must be required"))
        rspecs = {}
    for rtype in _rtype_order(rspecs):
        rspec = rspecs[rtype]
        role = f"spec.pytorchReplicaSpecs[{rtype}]"
        containers_path = f"{role}.template.spec.containers"
        if rtype not in REPLICA_TYPES:
            errs.append(FieldError("NotSupported", role, rtype, 'supported values: "Master", "Worker"'))
        containers = ((((rspec or {}).get("template") or {}).get("spec") or {}).get("containers")) or []
        if rspec is None or not containers:
            errs.append(FieldError("Required", containers_path, detail="must be specified"))
        present = False
        for i, c in enumerate(containers):
            if not c.get("image"):
                errs.append(FieldError("Required", f"{containers_path}[{i}].image", detail="must be required"))
            if c.get("name") == DEFAULT_CONTAINER_NAME:
                present = True
        if not present:
            errs.append(FieldError("Required", containers_path,
                                   detail=f"must have at least one container with name {DEFAULT_CONTAINER_NAME}"))
        if rtype == MASTER and (rspec or {}).get("replicas") != 1:
            errs.append(FieldError("Forbidden", f"{role}.replicas", detail="must be 1"))
    return errs


def validate(job: dict) -> list[str]:
    """pkg/webhooks/pytorch/pytorchjob_webhook.go: ValidateCreate: the field errors as the webhook
    prints them (empty: admitted)."""
    return [str(e) for e in validation_errors(job)]


def webhook_warnings(job: dict) -> list[str]:
    """pkg/webhooks/pytorch/pytorchjob_webhook.go: validateSpec's warnings (deprecated nProcPerNode)."""
    ep = (job.get("spec") or {}).get("elasticPolicy")
    if ep is not None and ep.get("nProcPerNode") is not None:
        return ["spec.elasticPolicy.nProcPerNode is deprecated, use spec.nprocPerNode instead"]
    return []


def webhook_denial(job: dict) -> str | None:
    """The API server's message for a PyTorchJob the webhook denies: field.ErrorList.ToAggregate()
    (k8s.io/apimachinery pkg/util/errors/errors.go: aggregate.Error: one error alone, several as
    "[a, b]", duplicates dropped) behind k8s.io/apiserver's `admission webhook %q denied the request: `."""
    msgs = list(dict.fromkeys(validate(job)))
    if not msgs:
        return None
    text = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
    return f'admission webhook "{WEBHOOK_NAME}" denied the request: {text}'


# ------------------------------------------------------------------------------- environment


def replica_name(job_name: str, rtype: str, index: int | str) -> str:
    """pkg/controller.v1/pytorch/envvar.go: replicaName (= pkg/core/utils.go: GenGeneralName):
    <job>-<rtype lower-cased>-<index>, "/" replaced by "-"."""
    return f"{job_name}-{rtype.lower()}-{index}".replace("/", "-")


def _port_from_job(job: dict, rtype: str) -> int:
    """pkg/controller.v1/pytorch/envvar.go: getPortFromPyTorchJob: the pytorchjob-port of the rtype's
    "pytorch" container (a missing rtype is a nil-pointer panic in Go)."""
    rspec = _replicas(job).get(rtype)
    if rspec is None:
        raise OperatorError(f"runtime error: invalid memory address or nil pointer dereference "
                            f"(getPortFromPyTorchJob: no {rtype} spec)")
    for c in ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []:
        if c.get("name") == DEFAULT_CONTAINER_NAME:
            for p in c.get("ports") or []:
                if p.get("name") == DEFAULT_PORT_NAME:
                    return int(p["containerPort"])
    raise OperatorError("port not found")


def _total_replicas(job: dict) -> int:
    """pkg/controller.v1/pytorch/envvar.go: getTotalReplicas."""
    return sum(int(r["replicas"]) for r in _replicas(job).values())


def _nproc_per_node_int(job: dict) -> int:
    """pkg/controller.v1/pytorch/envvar.go: getNprocPerNodeInt: the number, or 1 (auto, gpu, cpu, unset)."""
    v = _spec(job).get("nprocPerNode")
    try:
        return int(str(v)) if v is not None and re.fullmatch(r"[+-]?\d+", str(v)) else 1
    except ValueError:
        return 1


def _env(name: str, value: Any) -> dict:
    return {"name": name, "value": str(value)}


def master_env(job: dict) -> list[dict]:
    """pkg/controller.v1/pytorch/master.go: MasterEnvVarGenerator.Generate: MASTER_PORT, PET_MASTER_PORT,
    MASTER_ADDR, PET_MASTER_ADDR (the Master's port and its pod/Service name) when there is a Master."""
    if MASTER not in _replicas(job):
        return []
    port = _port_from_job(job, MASTER)
    addr = replica_name(job["metadata"]["name"], MASTER, 0)
    return [_env(ENV_MASTER_PORT, port), _env(ENV_PET_MASTER_PORT, port),
            _env(ENV_MASTER_ADDR, addr), _env(ENV_PET_MASTER_ADDR, addr)]


def elastic_env(job: dict) -> list[dict] | None:
    """pkg/controller.v1/pytorch/elastic.go: ElasticEnvVarGenerator.Generate (generateEnvRDZVEndpoint,
    generateEnvBackend, generateEnvNnodes, generateEnvRDZVConf): None without an elasticPolicy."""
    ep = _spec(job).get("elasticPolicy")
    if ep is None:
        return None
    name = job["metadata"]["name"]
    host = ep["rdzvHost"] if ep.get("rdzvHost") is not None else f"{name}-worker-0"
    port = ep["rdzvPort"] if ep.get("rdzvPort") is not None else _port_from_job(job, WORKER)
    out = [_env(ENV_RDZV_ENDPOINT, f"{host}:{port}"),
           _env(ENV_RDZV_BACKEND, ep["rdzvBackend"] if ep.get("rdzvBackend") is not None else BACKEND_C10D)]
    if ep.get("minReplicas") is None and ep.get("maxReplicas") is None:
        worker = _replicas(job).get(WORKER)
        if worker is None:
            raise OperatorError("cannot find the worker spec")
        out.append(_env(ENV_NNODES, worker["replicas"]))
    else:
        # Go dereferences both pointers: one unset is a nil-pointer panic (defaulting sets both)
        if ep.get("minReplicas") is None or ep.get("maxReplicas") is None:
            raise OperatorError("runtime error: invalid memory address or nil pointer dereference (generateEnvNnodes)")
        out.append(_env(ENV_NNODES, f"{ep['minReplicas']}:{ep['maxReplicas']}"))
    if ep.get("maxRestarts") is not None:
        out.append(_env(ENV_MAX_RESTARTS, ep["maxRestarts"]))
    if ep.get("nProcPerNode") is not None:
        out.append(_env(ENV_NPROC_PER_NODE, ep["nProcPerNode"]))
    if ep.get("rdzvId") is not None:
        out.append(_env(ENV_RDZV_ID, ep["rdzvId"]))
    if ep.get("rdzvConf") is not None:
        out.append(_env(ENV_RDZV_CONF, ",".join(f"{c.get('key', '')}={c.get('value', '')}" for c in ep["rdzvConf"])))
    if ep.get("standalone") is True:
        out.append(_env(ENV_STANDALONE, ""))
    return out


def pod_env(job: dict, rtype: str, index: int) -> list[dict]:
    """pkg/controller.v1/pytorch/envvar.go: setPodEnv: the variables appended to *every* container of
    the pod (after the template's own env), in order: PYTHONUNBUFFERED=1; with a Master the master
    variables, WORLD_SIZE (replicas x nprocPerNode, 1 when not a number), RANK and PET_NODE_RANK (index,
    +1 for Workers); PET_NPROC_PER_NODE; the elastic variables, else PET_NNODES = all replicas."""
    out = [_env("PYTHONUNBUFFERED", "1")]
    total = _total_replicas(job)
    world_size = total * _nproc_per_node_int(job)
    if MASTER in _replicas(job):
        out += master_env(job)
        rank = int(index) + (1 if rtype.lower() == "worker" else 0)
        out += [_env("WORLD_SIZE", world_size), _env("RANK", rank), _env(ENV_NODE_RANK, rank)]
    if _spec(job).get("nprocPerNode") is not None:
        out.append(_env(ENV_NPROC_PER_NODE, _spec(job)["nprocPerNode"]))
    elastic = elastic_env(job)
    if elastic is not None:
        out += elastic
    else:
        out.append(_env(ENV_NNODES, total))
    return out


# ---------------------------------------------------------------------------- init container

# html/template's escaper for values in HTML text context (Go src/html/template/html.go:
# htmlReplacementTable): initcontainer.go imports "html/template", not text/template
_HTML_TEXT_ESCAPES = {"\x00": "\ufffd", '"': "&#34;", "&": "&amp;", "'": "&#39;", "+": "&#43;", "<": "&lt;", ">": "&gt;"}
_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_FIELDS = ("MasterAddr", "InitContainerImage", "MaxTries")

# k8s.io/api v0.29.3 core/v1 Container and SecurityContext JSON fields: sigs.k8s.io/yaml.Unmarshal
# silently drops anything else (a typo in the template is lost, not reported)
CONTAINER_FIELDS = frozenset((
    "name", "image", "command", "args", "workingDir", "ports", "envFrom", "env", "resources", "resizePolicy",
    "restartPolicy", "volumeMounts", "volumeDevices", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle", "terminationMessagePath", "terminationMessagePolicy", "imagePullPolicy", "securityContext",
    "stdin", "stdinOnce", "tty"))
SECURITY_CONTEXT_FIELDS = frozenset((
    "capabilities", "privileged", "seLinuxOptions", "windowsOptions", "runAsUser", "runAsGroup", "runAsNonRoot",
    "readOnlyRootFilesystem", "allowPrivilegeEscalation", "procMount", "seccompProfile"))


def execute_init_template(template: str, master_addr: str, image: str = INIT_CONTAINER_IMAGE_DEFAULT,
                          max_tries: int = INIT_MAX_TRIES_DEFAULT) -> str:
    """pkg/controller.v1/pytorch/initcontainer.go: initContainerGenerator.GetInitContainer, the
    template.Execute half: {{.MasterAddr}}, {{.InitContainerImage}} and {{.MaxTries}} substituted,
    HTML-escaped as html/template does in text context. Any other action, or a "<" (html/template
    would parse a tag and escape differently), is outside the model: OperatorError."""
    if "<" in template:
        raise OperatorError("template contains '<': html/template would switch context; not modelled")
    values = {"MasterAddr": master_addr, "InitContainerImage": image, "MaxTries": max_tries}

    def sub(m: re.Match) -> str:
        action = m.group(1)
        if not re.fullmatch(r"\.\w+", action):
            raise OperatorError(f"template action {{{{{action}}}}} not modelled")
        field = action[1:]
        if field not in values:
            raise OperatorError(f'template: container: executing "container" at <{action}>: can\'t evaluate field '
                                f"{field} in type struct {{ MasterAddr string; InitContainerImage string; MaxTries int }}")
        return "".join(_HTML_TEXT_ESCAPES.get(ch, ch) for ch in str(values[field]))

    return _ACTION.sub(sub, template)


def parse_init_containers(text: str) -> list[dict]:
    """pkg/controller.v1/pytorch/initcontainer.go: GetInitContainer, the yaml.Unmarshal half: a YAML list
    of Containers; unknown Container / securityContext fields are dropped as Go's decoder drops them."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OperatorError(f"error converting YAML to JSON: {e}") from e
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise OperatorError("error unmarshaling JSON: json: cannot unmarshal into Go value of type []v1.Container")
    out = []
    for c in data:
        c = {k: v for k, v in c.items() if k in CONTAINER_FIELDS}
        if isinstance(c.get("securityContext"), dict):
            c["securityContext"] = {k: v for k, v in c["securityContext"].items() if k in SECURITY_CONTEXT_FIELDS}
        out.append(c)
    return out


def init_containers(job: dict, rtype: str, template: str = DEFAULT_INIT_TEMPLATE,
                    image: str = INIT_CONTAINER_IMAGE_DEFAULT, max_tries: int = INIT_MAX_TRIES_DEFAULT) -> list[dict]:
    """pkg/controller.v1/pytorch/initcontainer.go: setInitContainer: the containers appended to a pod's
    initContainers: the template's, for Worker pods of a job that has a Master; none otherwise."""
    if MASTER not in _replicas(job) or rtype.lower() != "worker":
        return []
    addr = replica_name(job["metadata"]["name"], MASTER, 0)
    return parse_init_containers(execute_init_template(template, addr, image, max_tries))


def template_from_file(path: str | None) -> str:
    """pkg/controller.v1/pytorch/initcontainer.go: getInitContainerTemplateOrDefault: the file's text, or
    the built-in default when it cannot be read (silently: a wrong mount falls back to the default)."""
    try:
        with open(path or INIT_TEMPLATE_FILE_DEFAULT, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return DEFAULT_INIT_TEMPLATE


# ---------------------------------------------------------------------------------- pods


def gen_labels(job_name: str) -> dict:
    """pkg/controller.v1/common/job_controller.go: GenLabels."""
    return {OPERATOR_NAME_LABEL: CONTROLLER_NAME, JOB_NAME_LABEL: job_name.replace("/", "-")}


def is_master_role(replicas: dict, rtype: str, index: int) -> bool:
    """pkg/controller.v1/pytorch/pytorchjob_controller.go: IsMasterRole: the Master, else Worker 0."""
    if MASTER in replicas:
        return rtype == MASTER
    return rtype == WORKER and index == 0


def pod_restart_policy(replica_restart_policy: str) -> str:
    """pkg/core/pod.go: SetRestartPolicy: ExitCode is the operator's own policy; the pod gets Never."""
    return "Never" if replica_restart_policy == "ExitCode" else replica_restart_policy


def owner_reference(job: dict) -> dict:
    """pkg/controller.v1/common/job_controller.go: GenOwnerReference."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job["metadata"]["name"],
            "uid": job["metadata"].get("uid", ""), "controller": True, "blockOwnerDeletion": True}


def pod_for(job: dict, rtype: str, index: int, init_template: str = DEFAULT_INIT_TEMPLATE,
            image: str = INIT_CONTAINER_IMAGE_DEFAULT, max_tries: int = INIT_MAX_TRIES_DEFAULT) -> dict:
    """pkg/controller.v1/common/pod.go: createNewPod, with pytorchjob_controller.go: SetClusterSpec
    (setPodEnv, then setInitContainer), pkg/core/pod.go: SetRestartPolicy and
    pkg/controller.v1/control/pod_control.go: GetPodFromTemplate: the Pod the operator POSTs for replica
    (rtype, index) of an already defaulted job."""
    replicas = _replicas(job)
    rspec = replicas[rtype]
    template = copy.deepcopy(rspec.get("template") or {})
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    rt = rtype.lower()
    labels = dict(meta.get("labels") or {})
    labels.update(gen_labels(job["metadata"]["name"]))
    labels[REPLICA_TYPE_LABEL] = rt
    labels[REPLICA_INDEX_LABEL] = str(index)
    if is_master_role(replicas, rtype, index):
        labels[JOB_ROLE_LABEL] = "master"
    added = pod_env(job, rt, index)
    for c in spec.get("containers") or []:
        c["env"] = list(c.get("env") or []) + copy.deepcopy(added)
    inits = init_containers(job, rt, init_template, image, max_tries)
    if inits:
        spec["initContainers"] = list(spec.get("initContainers") or []) + inits
    spec["restartPolicy"] = pod_restart_policy(rspec["restartPolicy"])
    metadata = {"name": replica_name(job["metadata"]["name"], rt, index), "labels": labels,
                "ownerReferences": [owner_reference(job)]}
    if job["metadata"].get("namespace"):
        metadata["namespace"] = job["metadata"]["namespace"]
    if meta.get("annotations"):
        metadata["annotations"] = dict(meta["annotations"])
    if meta.get("finalizers"):
        metadata["finalizers"] = list(meta["finalizers"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def pods_for(job: dict, init_template: str = DEFAULT_INIT_TEMPLATE, image: str = INIT_CONTAINER_IMAGE_DEFAULT,
             max_tries: int = INIT_MAX_TRIES_DEFAULT) -> list[dict]:
    """Every Pod the controller creates for a new job: pkg/controller.v1/common/job.go: ReconcileJobs ->
    pod.go: ReconcilePods -> createNewPod for each missing (rtype, index), after SetDefaults_PyTorchJob.
    Master first, then Workers by index (Go: map order)."""
    job = defaulted(job)
    return [pod_for(job, rtype, i, init_template, image, max_tries)
            for rtype in _rtype_order(_replicas(job)) for i in range(int(_replicas(job)[rtype]["replicas"]))]


def services_for(job: dict) -> list[dict]:
    """pkg/controller.v1/common/service.go: ReconcileServices -> CreateNewService (ports from
    pkg/core/service.go: GetPortsFromJob): one headless Service per pod, same name, selecting exactly that
    pod (job name, operator, replica type and index; no job-role), one port per named port of the pytorch
    container (name -> containerPort; Go ranges over a map, the model sorts by name)."""
    job = defaulted(job)
    out = []
    for rtype in _rtype_order(_replicas(job)):
        rspec = _replicas(job)[rtype]
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        pytorch = next((c for c in containers if c.get("name") == DEFAULT_CONTAINER_NAME), None)
        if pytorch is None:
            raise OperatorError("failed to find the port")
        ports = {p.get("name", ""): int(p["containerPort"]) for p in pytorch.get("ports") or []}
        for i in range(int(rspec["replicas"])):
            labels = gen_labels(job["metadata"]["name"])
            labels[REPLICA_TYPE_LABEL] = rtype.lower()
            labels[REPLICA_INDEX_LABEL] = str(i)
            metadata = {"name": replica_name(job["metadata"]["name"], rtype, i), "labels": labels,
                        "ownerReferences": [owner_reference(job)]}
            if job["metadata"].get("namespace"):
                metadata["namespace"] = job["metadata"]["namespace"]
            out.append({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
                        "spec": {"clusterIP": "None", "selector": dict(labels),
                                 "ports": [{"name": n, "port": p} for n, p in sorted(ports.items())]}})
    return out


def failed_create_pod_event(error_message: str) -> tuple[str, str, str]:
    """pkg/controller.v1/control/pod_control.go: RealPodControl.createPods: the Warning event recorded on
    the PyTorchJob when the API server refuses a pod (the job then stays without that pod; the
    reconcile returns the error and is retried)."""
    return ("Warning", "FailedCreatePod", f"Error creating: {error_message}")


# ------------------------------------------------------------------------- restarts, failure


def is_retryable_exit_code(exit_code: int) -> bool:
    """pkg/util/train/train_util.go: IsRetryableExitCode: 128 and above (killed by a signal)."""
    return exit_code >= 128


def restart_action(replica_spec_restart_policy: str, exit_code: int | None) -> str:
    """What becomes of a replica whose pod reached phase Failed, exit_code being the "pytorch"
    container's (None: it never terminated, e.g. an init container failed or the pod was evicted;
    ReconcilePods then uses its magic 0xbeef, which is "retryable").

    pkg/controller.v1/common/pod.go: ReconcilePods: ExitCode with a retryable code, OnFailure and Always
    delete the pod ("restart": the next reconcile creates it again, condition Restarting); ExitCode with
    a code below 128 marks the job Failed ("fail"). Never does nothing there, and
    pytorchjob_controller.go: UpdateJobStatus then marks the job Failed ("fail")."""
    code = NO_EXIT_CODE if exit_code is None else exit_code
    if replica_spec_restart_policy == "ExitCode":
        return "restart" if is_retryable_exit_code(code) else "fail"
    if replica_spec_restart_policy in ("OnFailure", "Always"):
        return "restart"
    if replica_spec_restart_policy == "Never":
        return "fail"
    raise ValueError(f"unknown restart policy {replica_spec_restart_policy!r}")


def reconcile_failed_pod(job: dict, status: dict, rtype: str, exit_code: int | None) -> str:
    """pkg/controller.v1/common/pod.go: ReconcilePods, the branch for a pod in phase Failed: deletes
    it (returns "restart", condition Restarting) or fails the job (returns "fail", condition Failed), with
    the conditions and messages the Go code sets; "none" for Never (left to UpdateJobStatus)."""
    name = job["metadata"]["name"]
    policy = _replicas(job)[rtype]["restartPolicy"]
    code = NO_EXIT_CODE if exit_code is None else exit_code
    if (policy == "ExitCode" and is_retryable_exit_code(code)) or policy in ("OnFailure", "Always"):
        update_job_conditions(status, JOB_RESTARTING, "True", KIND + "Restarting",
                              f"job {name} is restarting because {rtype} replica(s) failed.")
        return "restart"
    if policy == "ExitCode":
        update_job_conditions(status, JOB_FAILED, "True", KIND + "Failed",
                              f'job "{name}" is failing because "{rtype}" replica(s) failed.')
        return "fail"
    return "none"


def past_backoff_limit(backoff_limit: int | None, replica_specs: dict, pods: Iterable[dict]) -> bool:
    """pkg/core/job.go: PastBackoffLimit: the restartCounts of the init and app containers of *Running*
    pods of replicas whose policy is OnFailure, Always or ExitCode, against runPolicy.backoffLimit (0:
    any restart). A pod with restartPolicy Never (what ExitCode becomes) never restarts a container, and
    a failed pod is not Running: with ExitCode this never trips; only deleted-and-recreated pods happen."""
    if backoff_limit is None:
        return False
    total = 0
    pods = list(pods)
    for rtype, spec in replica_specs.items():
        if spec.get("restartPolicy") not in ("OnFailure", "Always", "ExitCode"):
            continue
        for pod in pods:
            if (pod.get("metadata", {}).get("labels") or {}).get(REPLICA_TYPE_LABEL) != rtype.lower():
                continue
            st = pod.get("status") or {}
            if st.get("phase") != "Running":
                continue
            for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
                total += int(cs.get("restartCount") or 0)
    return total > 0 if backoff_limit == 0 else total >= backoff_limit


def pods_to_delete(clean_pod_policy: str, status: dict, pods: Iterable[dict]) -> list[str]:
    """pkg/controller.v1/common/job.go: DeletePodsAndServices: the names of the pods (and the Services
    of the same names) deleted. A finished job (Succeeded/Failed): None keeps all, Running deletes the
    Running and Pending ones, All deletes all. A job not finished - suspended, or failing for its backoff
    limit or active deadline (ReconcileJobs deletes before it sets Failed) - loses every pod whatever the
    policy."""
    pods = list(pods)
    if not pods:
        return []
    finished = is_finished(status)
    if finished and clean_pod_policy == "None":
        return []
    out = []
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase")
        if finished and clean_pod_policy == "Running" and phase not in ("Running", "Pending"):
            continue
        out.append(pod["metadata"]["name"])
    return out


# -------------------------------------------------------------------------------- conditions


def _condition(status: dict, ctype: str) -> dict | None:
    """pkg/util/status.go: getCondition."""
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def _is_true(status: dict, ctype: str) -> bool:
    """pkg/util/status.go: isStatusConditionTrue."""
    return any(c.get("type") == ctype and c.get("status") == "True" for c in status.get("conditions") or [])


def is_succeeded(status: dict) -> bool:
    """pkg/util/status.go: IsSucceeded."""
    return _is_true(status, JOB_SUCCEEDED)


def is_failed(status: dict) -> bool:
    """pkg/util/status.go: IsFailed."""
    return _is_true(status, JOB_FAILED)


def is_finished(status: dict) -> bool:
    """pkg/util/status.go: IsFinished."""
    return is_succeeded(status) or is_failed(status)


def is_running(status: dict) -> bool:
    """pkg/util/status.go: IsRunning."""
    return _is_true(status, JOB_RUNNING)


def _filter_out_condition(conditions: list[dict], ctype: str) -> list[dict]:
    """pkg/util/status.go: filterOutCondition: drops ctype; Running and Restarting replace each other;
    a Succeeded or Failed condition turns Running to False."""
    out = []
    for c in conditions:
        if ctype == JOB_RESTARTING and c["type"] == JOB_RUNNING:
            continue
        if ctype == JOB_RUNNING and c["type"] == JOB_RESTARTING:
            continue
        if c["type"] == ctype:
            continue
        if ctype in (JOB_FAILED, JOB_SUCCEEDED) and c["type"] == JOB_RUNNING:
            c = dict(c, status="False")
        out.append(c)
    return out


def set_condition(status: dict, condition: dict) -> None:
    """pkg/util/status.go: setCondition: nothing once Failed; nothing if the type has the same status and
    reason; else the condition replaces its type (filterOutCondition) at the end of the list."""
    if is_failed(status):
        return
    current = _condition(status, condition["type"])
    if current is not None and current.get("status") == condition["status"] and current.get("reason") == condition["reason"]:
        return
    status["conditions"] = _filter_out_condition(list(status.get("conditions") or []), condition["type"]) + [condition]


def update_job_conditions(status: dict, ctype: str, cstatus: str, reason: str, message: str) -> None:
    """pkg/util/status.go: UpdateJobConditions (newCondition + setCondition; times left out)."""
    set_condition(status, {"type": ctype, "status": cstatus, "reason": reason, "message": message})


def update_job_status(job: dict, status: dict) -> None:
    """pkg/controller.v1/pytorch/pytorchjob_controller.go: UpdateJobStatus: from status["replicaStatuses"]
    ({rtype: {active, succeeded, failed}}, what ReconcilePods counted): with a Master, Running while the
    Master is active and Succeeded when it has succeeded (Workers' success is not waited for); without,
    Workers decide (all succeeded, or any succeeded with an elasticPolicy). Then for each replica type with
    failed pods and fewer succeeded+active than replicas: Restarting unless its restartPolicy is Never,
    else Failed."""
    name = job["metadata"]["name"]
    ns = job["metadata"].get("namespace", "")
    replicas = _replicas(job)
    for rtype in _rtype_order(replicas):
        spec = replicas[rtype]
        st = (status.get("replicaStatuses") or {}).get(rtype) or {}
        succeeded, running, failed = (int(st.get(k) or 0) for k in ("succeeded", "active", "failed"))
        want = int(spec["replicas"])
        expected = want - succeeded
        if MASTER in replicas:
            if rtype == MASTER:
                if running > 0:
                    update_job_conditions(status, JOB_RUNNING, "True", KIND + "Running", f"PyTorchJob {name} is running.")
                if expected == 0:
                    update_job_conditions(status, JOB_SUCCEEDED, "True", KIND + "Succeeded",
                                          f"PyTorchJob {name} is successfully completed.")
                    return
        elif rtype == WORKER:
            if expected == 0 or (_spec(job).get("elasticPolicy") is not None and succeeded > 0):
                update_job_conditions(status, JOB_SUCCEEDED, "True", KIND + "Succeeded",
                                      f"PyTorchJob {ns}/{name} successfully completed.")
            elif running > 0:
                update_job_conditions(status, JOB_RUNNING, "True", KIND + "Running", f"PyTorchJob {ns}/{name} is running.")
        if failed > 0 and want > succeeded + running:
            if spec["restartPolicy"] != "Never":
                update_job_conditions(status, JOB_RESTARTING, "True", KIND + "Restarting",
                                      f"PyTorchJob {name} is restarting because {failed} {rtype} replica(s) failed.")
            else:
                update_job_conditions(status, JOB_FAILED, "True", KIND + "Failed",
                                      f"PyTorchJob {name} is failed because {failed} {rtype} replica(s) failed.")
