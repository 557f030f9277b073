"""The ``llmpipe k8s`` subcommand: argparse wiring only (``llmpipe --help`` imports this and
nothing heavier; the kubernetes client is imported when an action runs)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.k8s import CHART, release_name
from pipeline.k8s.client import Kube, resolve_namespace  # light: client imports kubernetes inside its functions
from pipeline.stages import ORDER, load_config

# The modules behind each action are imported by the action: render (PyYAML, ~30 ms) and submit, wait,
# logs, status (dataclasses and inspect through state/explain, ~20 ms) would about double the ~45 ms
# of imports of `llmpipe --help`, which builds this parser.

EPILOG = """\
examples:
  llmpipe k8s submit clean                      # render charts/llm-pipeline with jobs/cluster/clean.yaml, create the Jobs
  llmpipe k8s submit pretrain -f site.yaml --set nnodes=4 --set image.tag=0.2.0 --wait
  llmpipe k8s submit clean --dry-run            # print what would be created, touch nothing
  llmpipe k8s wait clean --timeout 2h           # exit 0 when it succeeds; else why it failed, one line per cause
  llmpipe k8s logs clean --follow               # stream every pod of the stage until it finishes
  llmpipe k8s logs pretrain --tail 50 --role train
  llmpipe k8s status                            # every stage in the namespace, with what is wrong
  llmpipe k8s status serve                      # the serving Deployments: each pod's model version

The namespace is -n, else $LLMPIPE_NAMESPACE, else the kubeconfig context's, else llm-pipeline.
The cluster comes from --kubeconfig, else $KUBECONFIG, else ~/.kube/config (or the pod's service account).
Each stage is the Helm release llmpipe-<stage>: `helm upgrade --install` of the same chart and values
creates the same objects (`make deploy-<stage>`); submit uses `helm template` (helm: $HELM, else
.cache/bin/helm from scripts/fetch_tools.py, else PATH) and the kubernetes client.
wait exits 0 on success, 1 when the stage failed, 124 on --timeout.
"""


# releases that are no pipeline stage but a PyTorchJob of the chart all the same (make deploy-nccl-check)
CHECKS = ("nccl-check",)


def _stages() -> list[str]:
    return ORDER


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", metavar="NS", help="namespace (default: $LLMPIPE_NAMESPACE, the context's, llm-pipeline)")
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", metavar="NAME", help="kubeconfig context (default: the current one)")


def _stage(p: argparse.ArgumentParser, optional: bool = False, extra: tuple[str, ...] = ()) -> None:
    stages = [*_stages(), *extra]
    p.add_argument("stage", choices=stages, metavar="STAGE", nargs="?" if optional else None,
                   help=f"one of: {', '.join(stages)}" + (" (default: every stage)" if optional else ""))


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", metavar="T", help="give up after T (seconds, or 90s/15m/2h/1d; default: no limit); exit 124")
    p.add_argument("--interval", type=float, default=5.0, metavar="S", help="seconds between looks at the cluster (default 5)")
    p.add_argument("--fail-fast", action="store_true",
                   help="fail as soon as a pod shows a cause that does not fix itself (image pull, OOMKilled, bad config)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    k8s = sub.add_parser(
        "k8s",
        help="submit a stage to Kubernetes, wait for it, stream its logs, show status",
        description="Run stages on Kubernetes: one Helm release per stage, found again by the label llmpipe.io/stage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = k8s.add_subparsers(dest="k8s_action", metavar="ACTION")

    submit = actions.add_parser(
        "submit", help="render the chart for a stage and create its objects",
        description="Render charts/llm-pipeline for STAGE with `helm template` (release llmpipe-STAGE, "
        "--set stage=STAGE --set-file config=CONFIG) and create the objects with the kubernetes client. "
        "The stage config is validated first. An existing Job or PyTorchJob is deleted and created anew.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _stage(submit)
    submit.add_argument("--config", "-c", metavar="FILE", help="stage config (default: jobs/cluster/STAGE.yaml)")
    submit.add_argument("--values", "-f", action="append", default=[], metavar="FILE",
                        help="site values for the chart, e.g. image, storage, mlflow (repeatable); applied over the "
                        "workload shape the config is sized for (values/<config name>.yaml beside the config)")
    submit.add_argument("--no-shape", action="store_true",
                        help="do not apply values/<config name>.yaml (the chart's small defaults, or yours only)")
    submit.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a chart value, as helm --set: workers=8, nnodes=2, image.tag=0.2.0 (repeatable)")
    submit.add_argument("--chart", metavar="DIR", help=f"the chart (default: $LLMPIPE_CHART, else {CHART})")
    submit.add_argument("--dry-run", action="store_true", help="print the rendered objects as YAML; create nothing")
    submit.add_argument("--wait", action="store_true", help="then wait for the stage, like `llmpipe k8s wait`")
    _wait_options(submit)
    _common(submit)

    wait = actions.add_parser(
        "wait", help="wait until a stage succeeds; explain why it failed",
        description="Wait for the stage's completion object (the merge Job, the PyTorchJob, or the Job) to succeed, "
        "showing pods running/succeeded/failed and the elapsed time. On failure or timeout, print one line per cause: "
        "OOMKilled (with the memory limit), ImagePullBackOff (with the image), Unschedulable (with the scheduler's "
        "message), BackoffLimitExceeded, DeadlineExceeded, a failed PyTorchJob, a container's exit and its last error line.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _stage(wait, extra=CHECKS)
    _wait_options(wait)
    _common(wait)

    logs = actions.add_parser(
        "logs", help="print or stream the logs of a stage's pods",
        description="Print the logs of every pod of the stage (prefixed with the pod name when there are several). "
        "--follow streams them as pods start, until the stage finishes (exit status as for wait).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _stage(logs, extra=CHECKS)
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the stage finishes")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines of each pod")
    logs.add_argument("--role", choices=["single", "part", "merge", "train"], help="only pods of this role")
    logs.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between looks for new pods (default 2)")
    _common(logs)

    status = actions.add_parser(
        "status", help="the stages' Jobs and pods in a namespace, and what is wrong",
        description="A table of the Jobs / PyTorchJobs of one stage (or all), their state and pods, followed by "
        "one line per cause for any stage that failed or is stuck; then the serving Deployments (stage serve: only "
        "those), their rollout and the model version each of their pods runs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _stage(status, optional=True, extra=("serve", *CHECKS))
    _common(status)
    k8s.set_defaults(k8s_parser=k8s)
    return k8s


def _validate_config(stage: str, path: Path) -> None:
    try:
        load_config(stage, str(path), [])
    except ModuleNotFoundError as exc:  # the k8s-only install (.[k8s], make status / logs: .venv-k8s) lacks the stage's libraries
        print(f"note: {path} not validated here ({exc}: an install with only the k8s extra); the stage validates it "
              "when its pod starts", file=sys.stderr)


def _kube(args: argparse.Namespace):
    return Kube(args.namespace, args.kubeconfig, args.context)


def cmd_submit(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.k8s.render import default_config, find_chart, render, shape_values
    from pipeline.k8s.submit import ordered, submit

    config = Path(args.config) if args.config else default_config(args.stage)
    if not config.is_file():
        raise PipelineError(f"--config {config}: no such file")
    _validate_config(args.stage, config)
    timeout = _timeout(args)  # bad --timeout / --interval fail before anything is created
    chart = find_chart(args.chart)
    shape = [] if args.no_shape else shape_values(args.stage, config)
    args.values = shape + args.values
    if args.dry_run:
        namespace = resolve_namespace(args.namespace, args.kubeconfig, args.context)
        objects = render(args.stage, config, namespace, chart, args.values, args.sets)
        print(yaml.safe_dump_all(ordered(objects), sort_keys=False), end="")
        return 0
    kube = _kube(args)
    objects = render(args.stage, config, kube.namespace, chart, args.values, args.sets)
    print(f"{release_name(args.stage)}: {len(objects)} objects from {chart} (config {config}"
          f"{', shape ' + shape[0] if shape else ''}) -> "
          f"namespace {kube.namespace} at {kube.server}")
    submit(kube, objects)
    if not args.wait:
        ns = f" -n {kube.namespace}"
        print(f"submitted {args.stage}: follow it with `llmpipe k8s wait {args.stage}{ns}` or "
              f"`llmpipe k8s logs {args.stage}{ns} --follow`")
        return 0
    return _wait(kube, args, timeout)


def _timeout(args: argparse.Namespace) -> float | None:
    from pipeline.k8s.wait import parse_duration

    if args.interval <= 0:
        raise PipelineError("--interval must be > 0 seconds")
    return parse_duration(args.timeout)


def _wait(kube, args: argparse.Namespace, timeout: float | None) -> int:
    from pipeline.k8s.wait import summary, wait_for

    start = time.monotonic()
    snap = wait_for(kube, args.stage, timeout=timeout, interval=args.interval, fail_fast=args.fail_fast)
    print(summary(snap, time.monotonic() - start))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    timeout = _timeout(args)
    return _wait(_kube(args), args, timeout)


def cmd_logs(args: argparse.Namespace) -> int:
    from pipeline.k8s.logs import follow_logs, print_logs

    if args.tail is not None and args.tail < 0:
        raise PipelineError("--tail must be >= 0")
    kube = _kube(args)
    if args.follow:
        return follow_logs(kube, args.stage, args.tail, args.role, args.interval)
    return print_logs(kube, args.stage, args.tail, args.role)


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.k8s.status import show_status

    return show_status(_kube(args), args.stage)


def main(args: argparse.Namespace) -> int:
    """Run one ``llmpipe k8s`` action; errors are PipelineErrors (one line) for the caller to print."""
    handlers = {"submit": cmd_submit, "wait": cmd_wait, "logs": cmd_logs, "status": cmd_status}
    action = getattr(args, "k8s_action", None)
    if action not in handlers:
        args.k8s_parser.print_help()
        return 2
    try:
        return handlers[action](args)
    except KeyboardInterrupt:
        print("\ninterrupted: whatever was submitted keeps running on the cluster (`llmpipe k8s status` shows it)",
              file=sys.stderr)
        return 130
