"""``llmpipe``: run pipeline stages on a laptop or inside a cluster pod, the same way."""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import DEFAULT_ROOT, __version__, default_root
from pipeline.errors import PipelineError

EPILOG = """\
examples:
  llmpipe pipeline --config-dir jobs/demo --root runs/demo       # every stage, in order
  llmpipe run clean --config jobs/demo/clean.yaml --root runs/demo --set dedup.threshold=0.85
  llmpipe run clean --config jobs/cluster/clean.yaml --rank 3 --world-size 8   # one Indexed Job pod
  llmpipe run clean --config jobs/cluster/clean.yaml --merge --world-size 8    # the merge after them
  llmpipe config clean --config jobs/demo/clean.yaml              # the resolved config, validated
  llmpipe show clean --root runs/demo                             # what a stage produced
  llmpipe run pretrain --config jobs/demo/pretrain.yaml --root runs/demo --nproc-per-node 2   # torchrun, 2 ranks
  llmpipe run pretrain --config jobs/demo/pretrain.yaml --nnodes 2 --nproc-per-node 1   # 2 simulated nodes
  llmpipe summary --root runs/demo                                # the report of a whole run
  llmpipe promote --config jobs/demo/register.yaml --root runs/demo --dry-run   # candidate vs champion
  llmpipe lineage models:/llm-pipeline-demo@champion --root runs/demo          # back to the raw data
  llmpipe k8s submit pretrain --wait                              # the stage as a PyTorchJob (see k8s --help)
  llmpipe fabric-check --nnodes 2 --nproc-per-node 1             # all-reduce bandwidth (see fabric-check --help)

The run root (--root, else $LLMPIPE_ROOT, else runs/local) is a folder or an s3:// URI;
extra fsspec options (e.g. an S3 endpoint) come as JSON in $LLMPIPE_STORAGE_OPTIONS.
A stage whose output already matches its config and inputs prints "up to date"; --force redoes it.
MLflow: $MLFLOW_TRACKING_URI, else SQLite under a local run root; LLMPIPE_TRACKING=off disables it.
"""


def _root(args: argparse.Namespace) -> str:
    return default_root(args.root)


def _stage_names() -> list[str]:
    """Stages `llmpipe pipeline` runs, in order."""
    from pipeline.stages import ORDER

    return ORDER


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="URI", help=f"run root: a folder or s3://bucket/prefix (default: $LLMPIPE_ROOT or {DEFAULT_ROOT})")
    p.add_argument("--force", action="store_true", help="redo the stage even if its output is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")


def build_parser() -> argparse.ArgumentParser:
    stages = _stage_names()
    parser = argparse.ArgumentParser(
        prog="llmpipe",
        description="Raw text to a trained model: each stage is one command with one typed config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run one stage",
        description="Run one stage. Sharded stages (clean, pack) run `workers` local processes and then merge; "
        "on a cluster each Indexed Job pod runs one --rank and a final Job runs --merge.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    run.add_argument("stage", choices=_stage_names(), metavar="STAGE", help=f"one of: {', '.join(_stage_names())}")
    run.add_argument("--config", "-c", metavar="FILE", help="stage config YAML (default: the built-in defaults)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, dotted for nesting, value parsed as YAML (repeatable)")
    _add_common(run)
    shard = run.add_argument_group("sharded stages (Indexed Jobs)")
    shard.add_argument("--rank", type=int, metavar="R",
                       help="run only this rank's share (default with --world-size: $JOB_COMPLETION_INDEX)")
    shard.add_argument("--world-size", type=int, metavar="W", help="how many ranks share the stage")
    shard.add_argument("--merge", action="store_true", help="only merge the parts that all W ranks committed")
    shard.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="with --merge: wait up to SECONDS for the ranks' parts (a merge Job started beside "
                       "the Indexed Job), then merge; with --rank, for a stage that runs in steps (clean): wait up "
                       "to SECONDS at each step for the other ranks' parts of the step before")
    dist = run.add_argument_group(
        "training stages (pretrain, sft, dpo, reward): torchrun through our launcher when a topology flag "
        "or a PyTorchJob's $PET_* variables are present, else one in-process rank"
    )
    dist.add_argument("--nnodes", metavar="N", help="nodes (pods); locally with --nproc-per-node, N simulated nodes")
    dist.add_argument("--node-rank", type=int, metavar="R", help="this node's rank")
    dist.add_argument("--nproc-per-node", metavar="P", help="processes per node: a number, or auto/gpu/cpu")
    dist.add_argument("--master-addr", metavar="HOST", help="address of node 0")
    dist.add_argument("--master-port", type=int, metavar="PORT", help="rendezvous port on node 0")

    pipe = sub.add_parser(
        "pipeline",
        help="run stages in order from a folder of configs",
        description="Run the stages in order, each with CONFIG_DIR/<stage>.yaml; every config is validated before "
        "anything runs. Stages that are up to date are skipped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pipe.add_argument("--config-dir", required=True, metavar="DIR",
                      help="folder with <stage>.yaml files, e.g. jobs/demo; clean-<v>.yaml / pack-<v>.yaml there run "
                           "after clean / pack (their own `output:`, e.g. the data of a second pretraining phase)")
    pipe.add_argument("--from", dest="start", choices=stages, metavar="STAGE", help="first stage to run")
    pipe.add_argument("--until", dest="stop", choices=stages, metavar="STAGE", help="last stage to run")
    _add_common(pipe)

    cfg = sub.add_parser("config", help="print a stage's resolved config (or its JSON schema)")
    cfg.add_argument("stage", choices=_stage_names(), metavar="STAGE")
    cfg.add_argument("--config", "-c", metavar="FILE")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cfg.add_argument("--schema", action="store_true", help="print the JSON schema of the stage config instead")

    show = sub.add_parser("show", help="summarise what a stage produced (its manifest)")
    show.add_argument("stage", choices=_stage_names(), metavar="STAGE")
    show.add_argument("--root", metavar="URI")
    show.add_argument("--json", action="store_true", help="print the whole manifest")
    show.add_argument("--output", metavar="NAME", help="the artifact to show when the stage's config renamed it "
                                                       "(clean and pack take `output:`), e.g. shards-clean")

    sub.add_parser("stages", help="list the stages with what they read and write")

    prom = sub.add_parser(
        "promote",
        help="move the champion alias to the candidate version when it passes the gates",
        description="Compare the registered model's `candidate` version with its `champion` on the gates of a "
        "register config's `promote` section (e.g. val_perplexity no more than 5% worse, lm_eval accuracy at least "
        "0.3); move `champion` only when all pass; record the decision as tags on the candidate version. "
        "When a serving Deployment of the model follows that alias (charts/llm-pipeline stage=serve, `make deploy-serve`), "
        "roll it to the new champion; when its new pods do not become ready in time, move the alias and the Deployment "
        "back and say so in one line. "
        "Exit status: 0 promoted (or already champion, or --dry-run), 3 rejected, 4 rolled back.",
        epilog="examples:\n  llmpipe promote --config jobs/demo/register.yaml --root runs/demo --dry-run\n"
        "  MLFLOW_TRACKING_URI=http://mlflow:5000 llmpipe promote --config jobs/cluster/register.yaml\n"
        "  llmpipe promote -c jobs/cluster/register.yaml -n llm-pipeline --rollout --rollout-timeout 20m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prom.add_argument("--config", "-c", metavar="FILE", help="a register config; its `name` and `promote.gates` are used")
    prom.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    prom.add_argument("--name", help="registered model name (default: the config's `name`)")
    prom.add_argument("--root", metavar="URI", help="run root whose embedded MLflow store to use when $MLFLOW_TRACKING_URI is unset")
    prom.add_argument("--dry-run", action="store_true", help="show the comparison and the decision; change nothing")
    prom.add_argument("--json", action="store_true", help="print the decision as JSON")
    roll = prom.add_argument_group(
        "serving rollout (docs/kubernetes.md, Serving): by default, when a kubeconfig (or a pod's service account) is "
        "there, look for serving Deployments of the model that follow the alias and roll them")
    mode = roll.add_mutually_exclusive_group()
    mode.add_argument("--rollout", action="store_true", help="require a serving Deployment to roll (an error without one)")
    mode.add_argument("--no-rollout", action="store_true", help="only move the alias; do not look at the cluster")
    roll.add_argument("--rollout-timeout", default="30m", metavar="T",
                      help="roll back when the new pods are not all ready after T (seconds or 90s/15m/2h; default 30m), "
                      "or sooner when the Deployment reports ProgressDeadlineExceeded")
    roll.add_argument("--rollout-interval", type=float, default=2.0, metavar="S", help=argparse.SUPPRESS)
    roll.add_argument("-n", "--namespace", metavar="NS", help="namespace of the serving Deployment (default: "
                      "$LLMPIPE_NAMESPACE, the kubeconfig context's, llm-pipeline)")
    roll.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    roll.add_argument("--context", metavar="NAME", help="kubeconfig context (default: the current one)")

    lin = sub.add_parser(
        "lineage",
        help="print the chain from a registered model back to the raw data",
        description="Print every artifact a registered model version came from (model -> training stages -> "
        "shards -> tokenizer -> clean -> raw -> sources), with fingerprints, config hashes and MLflow runs.",
        epilog="examples:\n  llmpipe lineage models:/llm-pipeline@champion --root runs/demo\n"
        "  llmpipe lineage models:/llm-pipeline/3 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lin.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    lin.add_argument("--root", metavar="URI", help="run root whose embedded MLflow store to use when $MLFLOW_TRACKING_URI is unset")
    lin.add_argument("--json", action="store_true", help="print the chain as JSON")

    summ = sub.add_parser("summary", help="one report of a whole pipeline run (what `make demo` prints at the end)")
    summ.add_argument("--root", metavar="URI", help=f"run root (default: $LLMPIPE_ROOT or {DEFAULT_ROOT})")
    ver = sub.add_parser("verify", help="check every committed artifact of a run root against its manifest (files "
                                        "present, sizes, sha256); exit 1 and one line per damaged file",
                         description="Stages check their inputs when they start (sizes always, sha256 for inputs up "
                                     "to 256 MiB; LLMPIPE_VERIFY=full|size changes that). This reads every file of "
                                     "every committed artifact under the root.")
    ver.add_argument("--root", metavar="URI", help=f"run root (default: $LLMPIPE_ROOT or {DEFAULT_ROOT})")
    ver.add_argument("--sizes-only", action="store_true", help="skip the sha256 (fast on a large root)")

    from pipeline.serving.cli import add_parser as add_serve_parser  # `llmpipe serve`

    add_serve_parser(sub)
    from pipeline.publish import add_parser as add_publish_parser  # `llmpipe publish`: a version to the HF Hub

    add_publish_parser(sub)
    from pipeline.k8s.cli import add_parser as add_k8s_parser  # `llmpipe k8s submit|wait|logs|status`

    add_k8s_parser(sub)
    from pipeline.fabric import add_parser as add_fabric_parser  # `llmpipe fabric-check`: all-reduce bandwidth

    add_fabric_parser(sub)
    return parser


def _load(stage: str, path: str | None, overrides: list[str]) -> Any:
    from pipeline.stages import load_config

    return load_config(stage, path, overrides)


TOPOLOGY_FLAGS = ("nnodes", "node_rank", "nproc_per_node", "master_addr", "master_port")


def _launch(args: argparse.Namespace) -> int:
    """Hand a training stage to the torchrun launcher, with the same arguments."""
    from pipeline.training import launcher

    argv = [args.stage]
    for flag, value in (("--config", args.config), ("--root", args.root)):
        if value:
            argv += [flag, value]
    for assignment in args.overrides:
        argv += ["--set", assignment]
    argv += [f for f, on in (("--force", args.force), ("--no-progress", args.no_progress)) if on]
    for name in TOPOLOGY_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return launcher.main(argv)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline import runner
    from pipeline.stages import get_stage
    from pipeline.storage import Storage

    if get_stage(args.stage).distributed:
        wants_launcher = any(getattr(args, n) is not None for n in TOPOLOGY_FLAGS) or any(
            k.startswith("PET_") for k in os.environ
        )
        if wants_launcher and "LOCAL_RANK" not in os.environ:
            return _launch(args)
    elif any(getattr(args, n) is not None for n in TOPOLOGY_FLAGS):
        raise PipelineError(f"{', '.join('--' + n.replace('_', '-') for n in TOPOLOGY_FLAGS)} are for training stages; "
                            f"{args.stage} shards with --rank/--world-size")

    cfg = _load(args.stage, args.config, args.overrides)
    storage = Storage(_root(args))
    progress = not args.no_progress
    if args.merge or args.rank is not None or args.world_size is not None:
        world = args.world_size
        if world is None or world < 1:
            raise PipelineError("--rank and --merge need --world-size W (W >= 1)")
        if args.merge:
            outcome = runner.merge_parts(args.stage, cfg, storage, world, force=args.force, progress=progress,
                                         wait=args.wait)
        else:
            rank = args.rank
            if rank is None:
                env = os.environ.get("JOB_COMPLETION_INDEX")
                if env is None:
                    raise PipelineError("--world-size without --rank needs $JOB_COMPLETION_INDEX (set by Indexed Jobs)")
                rank = int(env)
            outcome = runner.run_part(args.stage, cfg, storage, rank, world, force=args.force, progress=progress,
                                      wait=args.wait)
            print(f"== {args.stage} rank {rank}/{world}: {outcome.status}")
            return 0
    else:
        outcome = runner.run_stage(args.stage, cfg, storage, force=args.force, progress=progress)
    print(runner.format_summary(outcome))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from pipeline import runner
    from pipeline.stages import get_stage
    from pipeline.storage import Storage

    stages = _stage_names()
    lo = stages.index(args.start) if args.start else 0
    hi = stages.index(args.stop) if args.stop else len(stages) - 1
    if lo > hi:
        raise PipelineError(f"--from {args.start} comes after --until {args.stop}")
    folder = Path(args.config_dir)
    if not folder.is_dir():
        raise PipelineError(f"--config-dir {folder} is not a folder")
    selected = stages[lo : hi + 1]
    steps: list[tuple[str, str, object]] = []  # (stage, label, config): the stage, then its variants
    for i, stage in enumerate(selected):  # validate every config before running anything
        path = folder / f"{stage}.yaml"
        if not path.exists():
            hint = f" (or stop before it with --until {selected[i - 1]})" if i else ""
            raise PipelineError(f"{path} is missing: every stage the pipeline runs needs its config{hint}")
        steps.append((stage, stage, _load(stage, str(path), [])))
        if get_stage(stage).renamable():  # e.g. clean-strict.yaml, pack-clean.yaml: the data of a second pretraining phase
            writes = {getattr(steps[-1][2], "output"): path.name}
            for vpath in sorted(folder.glob(f"{stage}-*.yaml")):
                cfg = _load(stage, str(vpath), [])
                if cfg.output in writes:
                    raise PipelineError(f"{writes[cfg.output]} and {vpath.name} in {folder} both write "
                                        f"'{cfg.output}/': give each {stage} config its own `output:`")
                writes[cfg.output] = vpath.name
                steps.append((stage, vpath.stem, cfg))
    from pipeline import tracking

    storage = Storage(_root(args))
    print(f"run root: {storage.uri}")
    timings = []
    name = f"pipeline {folder.name} {selected[0]}..{selected[-1]}"
    with tracking.pipeline_run(storage, name, {"llmpipe.config_dir": str(folder)}) as parent:
        for stage, label, cfg in steps:
            t0 = time.perf_counter()
            outcome = runner.run_stage(stage, cfg, storage, force=args.force, progress=not args.no_progress)
            print(runner.format_summary(outcome), flush=True)
            timings.append((label, outcome.status, time.perf_counter() - t0))
        parent.metrics({f"seconds.{label}": secs for label, _, secs in timings})
    print("== pipeline " + "=" * 48)
    for stage, status, secs in timings:
        print(f"  {stage:<10} {status:<11} {secs:8.1f}s")
    print(f"  {'total':<10} {'':<11} {sum(t for *_, t in timings):8.1f}s")
    if parent.run_id:
        print(f"  mlflow run {parent.run_id}: {tracking.ui_command(parent.uri or '')}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import config_hash
    from pipeline.stages import get_stage

    if args.schema:
        print(json.dumps(get_stage(args.stage).config.model_json_schema(), indent=2))
        return 0
    cfg = _load(args.stage, args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    print(f"# config hash: {config_hash(cfg)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline import runner
    from pipeline.stages import get_stage
    from pipeline.storage import Storage

    storage = Storage(_root(args), create=False)
    name = args.output or get_stage(args.stage).OUTPUT
    manifest = storage.manifest(name)
    if manifest is None:
        raise PipelineError(f"no committed '{name}/' under {storage.uri}: run `llmpipe run {args.stage}` first")
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
        return 0
    print(runner.format_summary(runner.Outcome(args.stage, "committed", manifest)))
    print(f"  {'output'}  {storage.url(name)}  ({len(manifest.get('files', []))} files)")
    print(f"  {'finished'}  {manifest.get('ended_at')}  code {manifest.get('code_version')}")
    for inp, ref in manifest.get("inputs", {}).items():
        print(f"  {'input'}  {inp}  {ref['fingerprint'][:16]}")
    return 0


def cmd_stages(_: argparse.Namespace) -> int:
    from pipeline.stages import get_stage

    for name in _stage_names():
        stage = get_stage(name)
        reads = ", ".join(f"{i}/" for i in stage.INPUTS) or "sources in its config"
        kind = "sharded" if stage.sharded else "torchrun" if stage.distributed else "single"
        renamable = " (or its config's output:)" if stage.renamable() else ""
        print(f"{name:<10} {kind:<8} reads {reads:<28} writes {stage.OUTPUT}/{renamable}")
    return 0


def _tracking_client(args: argparse.Namespace) -> Any:
    from pipeline import tracking
    from pipeline.storage import Storage

    uri = tracking.resolve_uri(Storage(_root(args), create=False) if not os.environ.get("MLFLOW_TRACKING_URI") else None)
    if not uri:
        raise PipelineError("no MLflow to talk to: set MLFLOW_TRACKING_URI, or --root a local run root (embedded store)")
    if tracking.sqlite_path(uri) and not os.path.exists(tracking.sqlite_path(uri)):  # type: ignore[arg-type]
        raise PipelineError(f"no MLflow store at {uri}: run the pipeline through `register` on that root first "
                            "(or set MLFLOW_TRACKING_URI)")
    why = tracking.reachable(uri)
    if why:
        raise PipelineError(why)
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)  # promote / models: this store's registry, whatever the process set before


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline import registry

    cfg = _load("register", args.config, args.overrides)  # its `name` and `promote` section
    client = _tracking_client(args)
    name = args.name or cfg.name
    plan = None
    if not args.no_rollout:  # the serving Deployments are looked up before anything moves
        from pipeline.k8s.serving import plan_for_promote

        plan = plan_for_promote(args, name, cfg.promote.to_alias, out=sys.stderr if args.json else sys.stdout)
    result = registry.promote(client, name, cfg.promote, dry_run=args.dry_run)
    print(json.dumps(result, indent=2) if args.json else registry.format_decision(result), flush=True)
    if result["decision"] == "rejected":
        return 3
    if plan is None:
        return 0
    from pipeline.k8s.serving import follow

    return follow(client, plan, result, dry_run=args.dry_run)


def cmd_lineage(args: argparse.Namespace) -> int:
    from pipeline import registry

    client = _tracking_client(args)
    info = registry.lineage(client, args.model_uri)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else registry.format_lineage(info))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.storage import MANIFEST, Artifact, Storage

    storage = Storage(_root(args), create=False)
    from pipeline.runner import RESERVED

    names = sorted(n for n in (posixpath.relpath(posixpath.dirname(p), storage.root) for p in storage.fs.find(storage.root)
                               if posixpath.basename(p) == MANIFEST and ".tmp-" not in p)
                   if n.split("/", 1)[0] not in RESERVED)  # MLflow's copies of manifests are not artifacts
    damaged = 0
    for name in names:
        art = Artifact(storage, name, storage.manifest(name) or {})
        problems = art.verify(checksums=not args.sizes_only)
        damaged += len(problems)
        print(f"{'ok' if not problems else 'DAMAGED':<8} {name}/ ({len(art.files())} files, {art.size_bytes:,} bytes)")
        for line in problems:
            print(f"           {line}")
    print(f"{len(names)} artifacts, {damaged} damaged file(s)" + (" (sizes only)" if args.sizes_only else ""))
    return 1 if damaged else 0


def cmd_summary(args: argparse.Namespace) -> int:
    from pipeline import summary
    from pipeline.storage import Storage

    print(summary.render(Storage(_root(args), create=False)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.serving.cli import main as serve_main

    return serve_main(args, _tracking_client)


def cmd_publish(args: argparse.Namespace) -> int:
    from pipeline import publish

    return publish.main(args, _tracking_client(args))


def cmd_fabric_check(args: argparse.Namespace) -> int:
    from pipeline.fabric import main as fabric_main

    return fabric_main(args)


def cmd_k8s(args: argparse.Namespace) -> int:
    from pipeline.k8s.cli import main as k8s_main

    return k8s_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    handlers = {"run": cmd_run, "pipeline": cmd_pipeline, "config": cmd_config, "show": cmd_show, "stages": cmd_stages,
                "promote": cmd_promote, "lineage": cmd_lineage, "summary": cmd_summary, "verify": cmd_verify,
                "k8s": cmd_k8s, "publish": cmd_publish, "serve": cmd_serve,
                "fabric-check": cmd_fabric_check}
    try:
        return handlers[args.command](args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was committed for the stage in progress", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmpipe config ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a filesystem error at the edge (read-only root, --root naming a file, a full disk)
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 1


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the path(s) it names and the system's reason."""
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
