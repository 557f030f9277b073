"""``llmpipe k8s``: submit a stage to Kubernetes, wait for it, stream its logs, show what runs.

One Helm release per stage (``llmpipe-<stage>``) of ``charts/llm-pipeline``. ``submit`` renders
the chart with ``helm template`` and creates the objects with the kubernetes client; ``wait``,
``logs`` and ``status`` find the stage's objects by the label ``llmpipe.io/stage=<stage>``.
The object that says "the stage is finished" carries the annotation
``llmpipe.io/completion: "true"``: the merge Job of a sharded stage, the PyTorchJob of a
training stage, the Job of the others.

Modules: ``client`` (kubeconfig, namespace, API errors -> one line), ``render`` (helm),
``submit``, ``state`` (a stage's Jobs, PyTorchJobs and pods), ``explain`` (failures in one
line each), ``wait``, ``logs``, ``status`` and ``cli`` (argparse). Only ``cli`` is imported by
``llmpipe --help``; the kubernetes client is imported when a command runs.
"""

STAGE_LABEL = "llmpipe.io/stage"
ROLE_LABEL = "llmpipe.io/role"
COMPLETION_ANNOTATION = "llmpipe.io/completion"
PART_OF_SELECTOR = "app.kubernetes.io/part-of=llm-pipeline"
DEFAULT_NAMESPACE = "llm-pipeline"
CHART = "charts/llm-pipeline"


def release_name(stage: str) -> str:
    """The Helm release (and object name prefix) of a stage."""
    return f"llmpipe-{stage.replace('_', '-')}"
