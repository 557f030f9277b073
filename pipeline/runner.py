"""Runs one stage under the stage contract of DESIGN.md.

A stage module exposes ``NAME``, ``INPUTS`` (artifact names it reads) and either

* ``run(cfg, ctx, out) -> metrics`` for single-task stages, or
* ``run_part(cfg, ctx, out) -> metrics`` and ``merge(cfg, ctx, out, parts) -> metrics`` for
  stages sharded by rank / world size (``ctx.rank``, ``ctx.world``): every rank commits its own
  part under ``<stage>.parts/``, then one merge step commits ``<stage>/``.

and optionally ``summary(metrics) -> list[(label, value)]`` for the one-screen summary.
The runner owns everything else: input lookup, the up-to-date check, the manifest, the atomic
commit, timings, and local worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import importlib.metadata
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from tqdm.auto import tqdm

import pipeline
from pipeline.config import StrictModel, config_hash
from pipeline.errors import InputError, PipelineError
from pipeline.storage import Artifact, Storage

VERSION_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "fasttext", "datasketch", "pyarrow", "fsspec", "numpy")


@dataclass
class StageContext:
    storage: Storage
    inputs: dict[str, Artifact]
    progress: bool = True
    rank: int = 0
    world: int = 1
    notes: list[str] = field(default_factory=list)

    def bar(self, iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
        """A progress bar; quiet when progress is off, sparse when stderr is not a terminal."""
        kwargs.setdefault("dynamic_ncols", True)
        if self.world > 1:
            kwargs.setdefault("position", self.rank)
            kwargs["desc"] = f"[{self.rank}/{self.world}] {kwargs.get('desc', '')}".rstrip()
        if not sys.stderr.isatty():
            kwargs.setdefault("mininterval", 10.0)
        return tqdm(iterable, disable=not self.progress, leave=self.world == 1, **kwargs)

    def log(self, message: str) -> None:
        prefix = f"[{self.rank}/{self.world}] " if self.world > 1 else ""
        print(f"{prefix}{message}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    stage: str
    status: str  # "done" | "up to date"
    manifest: dict[str, Any]
    seconds: float | None = None  # wall time of the whole stage (all ranks and the merge)


def get_stage(name: str) -> ModuleType:
    from pipeline.stages import STAGES

    if name not in STAGES:
        raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]()


def stage_output(module: ModuleType, cfg: StrictModel | None = None) -> str:
    """The artifact a stage writes: ``module.output(cfg)`` where the stage lets its config name it, else OUTPUT."""
    if cfg is not None and hasattr(module, "output"):
        return module.output(cfg)
    return module.OUTPUT


def output_name(stage: str, cfg: StrictModel | None = None) -> str:
    return stage_output(get_stage(stage), cfg)


def parts_dir(stage: str, world: int, cfg: StrictModel | None = None) -> str:
    return f"{output_name(stage, cfg)}.parts/w{world:03d}"


def part_name(stage: str, rank: int, world: int, cfg: StrictModel | None = None) -> str:
    return f"{parts_dir(stage, world, cfg)}/rank-{rank:05d}"


def _code_version() -> str:
    if os.environ.get("LLMPIPE_CODE_VERSION"):
        return os.environ["LLMPIPE_CODE_VERSION"]
    repo = Path(pipeline.__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            sha = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            if sha:
                return f"{pipeline.__version__}+g{sha}{'.dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass
    return pipeline.__version__


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "pipeline": pipeline.__version__}
    for pkg in VERSION_PACKAGES:
        try:
            found[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def is_current(manifest: dict[str, Any] | None, chash: str, inputs: dict[str, Any]) -> bool:
    """Same config and the same input fingerprints (where the inputs live does not matter)."""
    if not manifest or manifest.get("config_hash") != chash:
        return False
    had = {k: v.get("fingerprint") for k, v in (manifest.get("inputs") or {}).items()}
    return had == {k: v["fingerprint"] for k, v in inputs.items()}


def execute(
    module: ModuleType, fn: str, cfg: StrictModel, storage: Storage, name: str, ctx: StageContext, extra: dict[str, Any], *args: Any
) -> dict[str, Any]:
    """Run ``module.fn`` into a fresh output named ``name`` and commit it with its manifest."""
    from pipeline import tracking

    chash = config_hash(cfg)
    inputs = input_refs(ctx.inputs, module, cfg)
    track = name == stage_output(module, cfg)  # the stage's output, not one rank's part: one MLflow run per stage
    run_cm = tracking.stage_run(module.NAME, storage, cfg.model_dump(mode="json"), chash) if track else contextlib.nullcontext()
    with run_cm as tracker, _accelerate_env():
        manifest = _execute(module, fn, cfg, storage, name, ctx, extra, args, chash, inputs, tracker)
        if tracker is not None:
            tracking.finish_stage(tracker, module, storage, name, manifest)
    return manifest


@contextlib.contextmanager
def _accelerate_env() -> Iterable[None]:
    """Stages leave no ACCELERATE_* variables behind: transformers sets ACCELERATE_USE_DEEPSPEED=true
    for a DeepSpeed run and never unsets it, which would put the next stage of the same process
    (`llmpipe pipeline`: pretrain with ZeRO-2, then sft with zero_stage 0) under DeepSpeed too."""
    before = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in before]:
            del os.environ[k]
        os.environ.update(before)


def _execute(module: ModuleType, fn: str, cfg: StrictModel, storage: Storage, name: str, ctx: StageContext,
             extra: dict[str, Any], args: tuple[Any, ...], chash: str, inputs: dict[str, Any], tracker: Any) -> dict[str, Any]:
    started, t0 = _now(), time.perf_counter()
    out = storage.begin(name)
    try:
        metrics = getattr(module, fn)(cfg, ctx, out, *args) or {}
    except BaseException:
        out.abort()
        raise
    manifest = {
        "stage": module.NAME,
        "format": 1,
        "config": cfg.model_dump(mode="json"),
        "config_hash": chash,
        "inputs": inputs,
        "metrics": metrics,
        "versions": _versions(),
        "code_version": _code_version(),
        "started_at": started,
        "ended_at": _now(),
        "duration_s": round(time.perf_counter() - t0, 3),
        "mlflow_run_id": tracker.run_id if tracker is not None and tracker.on else None,
        **extra,
    }
    return out.commit(manifest)


def input_refs(inputs: dict[str, Artifact], module: ModuleType | None = None, cfg: StrictModel | None = None) -> dict[str, Any]:
    """What the manifest records of each input: its fingerprint (lineage) and where it was.

    Files a stage reads from outside the run root (SFT / DPO data files named in its config) come
    from ``module.external_inputs(cfg)`` as ``external:<path>`` entries, so editing such a file makes
    the stage stale like a changed artifact does.
    """
    refs = {k: {"fingerprint": a.fingerprint, "uri": a.url()} for k, a in inputs.items()}
    if module is not None and cfg is not None and hasattr(module, "external_inputs"):
        for label, fp in module.external_inputs(cfg).items():
            refs[f"external:{label}"] = {"fingerprint": fp, "uri": label}
    return refs


def resolve_inputs(module: ModuleType, storage: Storage, cfg: StrictModel | None = None) -> dict[str, Artifact]:
    """The committed artifacts a stage reads: ``module.inputs(cfg)`` when it has one, else ``INPUTS``."""
    from pipeline.stages import PRODUCER

    found = {}
    names = module.inputs(cfg) if cfg is not None and hasattr(module, "inputs") else module.INPUTS
    for name in names:
        manifest = storage.manifest(name)
        if manifest is None:
            producer = PRODUCER.get(name)
            hint = (f"run `llmpipe run {producer}` first (or `llmpipe pipeline`)" if producer else
                    f"run the stage whose config has `output: {name}` first (clean and pack take one), or check "
                    "the spelling")
            raise InputError(
                f"stage {module.NAME} needs '{name}/' under {storage.uri}, which has no committed output yet: {hint}"
            )
        found[name] = Artifact(storage, name, manifest)
    return found


def run_part(
    stage: str, cfg: StrictModel, storage: Storage, rank: int, world: int, *, force: bool = False, progress: bool = True
) -> Outcome:
    """One rank's share of a sharded stage (an Indexed Job pod, or a local worker process)."""
    module = get_stage(stage)
    if not hasattr(module, "run_part"):
        raise PipelineError(f"stage {stage!r} is not sharded: run it without --rank")
    if not 0 <= rank < world:
        raise PipelineError(f"--rank {rank} is outside 0..{world - 1} for --world-size {world}")
    ctx = StageContext(storage, resolve_inputs(module, storage, cfg), progress=progress, rank=rank, world=world)
    name = part_name(stage, rank, world, cfg)
    inputs = input_refs(ctx.inputs, module, cfg)
    existing = storage.manifest(name)
    if not force and is_current(existing, config_hash(cfg), inputs):
        return Outcome(stage, "up to date", existing)  # type: ignore[arg-type]
    manifest = execute(module, "run_part", cfg, storage, name, ctx, {"rank": rank, "world_size": world})
    return Outcome(stage, "done", manifest)


def merge_parts(
    stage: str, cfg: StrictModel, storage: Storage, world: int, *, force: bool = False, progress: bool = True, wait: float = 0.0
) -> Outcome:
    """The single step after all ranks of a sharded stage have committed their parts.

    ``wait`` > 0 (seconds): a merge Job started beside the Indexed Job polls until every rank's
    part is committed, then merges; it fails with the missing ranks when the time is up.
    """
    module = get_stage(stage)
    ctx = StageContext(storage, resolve_inputs(module, storage, cfg), progress=progress)
    chash = config_hash(cfg)
    inputs = input_refs(ctx.inputs, module, cfg)
    output = stage_output(module, cfg)
    existing = storage.manifest(output)
    if not force and is_current(existing, chash, inputs) and existing.get("world_size") == world:  # type: ignore[union-attr]
        return Outcome(stage, "up to date", existing)  # type: ignore[arg-type]  # a retried merge Job
    deadline = time.monotonic() + max(0.0, wait)
    last_report = 0.0
    while True:
        parts, missing = _committed_parts(stage, cfg, storage, world, chash, inputs)
        now = time.monotonic()
        if not missing or now >= deadline:
            break
        if now - last_report >= 60 or not last_report:
            print(f"{stage} merge: {world - len(missing)}/{world} parts committed; waiting "
                  f"(up to {deadline - now:.0f}s more)", file=sys.stderr, flush=True)
            last_report = now
        time.sleep(min(_WAIT_POLL_S, max(0.1, deadline - now)))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(
            f"cannot merge {stage}: rank(s) {shown} of {world} have no finished part for this config and input "
            f"(run `llmpipe run {stage} --rank R --world-size {world}` for each)"
        )
    extra = {"world_size": world, "parts": [p.fingerprint for p in parts],
             "parts_duration_s": max((float(p.manifest.get("duration_s") or 0) for p in parts), default=0.0)}
    manifest = execute(module, "merge", cfg, storage, output, ctx, extra, parts)
    storage.remove(parts_dir(stage, world, cfg))
    if storage.is_local:  # object stores have no empty folders to leave behind
        try:
            os.rmdir(storage.path(f"{output}.parts"))
        except OSError:
            pass
    return Outcome(stage, "done", manifest)


_WAIT_POLL_S = 5.0


def _committed_parts(stage: str, cfg: StrictModel, storage: Storage, world: int, chash: str,
                     inputs: dict[str, Any]) -> tuple[list[Artifact], list[int]]:
    parts: list[Artifact] = []
    missing = []
    for rank in range(world):
        manifest = storage.manifest(part_name(stage, rank, world, cfg))
        if not is_current(manifest, chash, inputs):
            missing.append(rank)
        else:
            parts.append(Artifact(storage, part_name(stage, rank, world, cfg), manifest))  # type: ignore[arg-type]
    return parts, missing


def _part_worker(stage: str, cfg_json: dict[str, Any], uri: str, opts: dict[str, Any], rank: int, world: int, force: bool, progress: bool) -> str:
    from pipeline.config import config_class

    cfg = config_class(stage).model_validate(cfg_json)
    return run_part(stage, cfg, Storage(uri, opts), rank, world, force=force, progress=progress).status


def run_stage(stage: str, cfg: StrictModel, storage: Storage, *, force: bool = False, progress: bool = True) -> Outcome:
    """The whole stage locally: for sharded stages, ``cfg.workers`` processes then the merge."""
    t0 = time.perf_counter()
    outcome = _run_stage(stage, cfg, storage, force=force, progress=progress)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _run_stage(stage: str, cfg: StrictModel, storage: Storage, *, force: bool, progress: bool) -> Outcome:
    module = get_stage(stage)
    inputs_art = resolve_inputs(module, storage, cfg)
    inputs = input_refs(inputs_art, module, cfg)
    output = stage_output(module, cfg)
    existing = storage.manifest(output)
    if not force and is_current(existing, config_hash(cfg), inputs):
        from pipeline import tracking

        tracking.note_up_to_date(stage, storage, existing)  # type: ignore[arg-type]
        return Outcome(stage, "up to date", existing)  # type: ignore[arg-type]
    if not hasattr(module, "run_part"):
        ctx = StageContext(storage, inputs_art, progress=progress)
        return Outcome(stage, "done", execute(module, "run", cfg, storage, output, ctx, {}))
    world = int(getattr(cfg, "workers", 1))
    if world == 1:
        run_part(stage, cfg, storage, 0, 1, force=force, progress=progress)
    else:
        payload = cfg.model_dump(mode="json")
        with cf.ProcessPoolExecutor(max_workers=world, mp_context=mp.get_context("spawn")) as pool:
            futures = [
                pool.submit(_part_worker, stage, payload, storage.uri, storage.storage_options, r, world, force, progress)
                for r in range(world)
            ]
            for fut in cf.as_completed(futures):
                fut.result()
    return merge_parts(stage, cfg, storage, world, force=force, progress=progress)


def format_summary(outcome: Outcome) -> str:
    """The one-screen summary printed after a stage."""
    module = get_stage(outcome.stage)
    m = outcome.manifest
    metrics = m.get("metrics", {})
    renamed = (m.get("config") or {}).get("output")
    head = f"== {outcome.stage}" + (f" -> {renamed}/" if renamed and renamed != module.OUTPUT else "") + f": {outcome.status}"
    if outcome.status == "done":
        head += f" in {outcome.seconds if outcome.seconds is not None else m.get('duration_s', 0):.1f}s"
    lines = [head + " " + "=" * max(0, 60 - len(head))]
    rows = module.summary(metrics) if hasattr(module, "summary") else [
        (k, v) for k, v in metrics.items() if isinstance(v, (int, float, str))
    ]
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:,.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"  {key.ljust(width)}  {value}")
    return "\n".join(lines)
