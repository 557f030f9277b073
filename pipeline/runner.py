"""Runs stages: the one place that decides "up to date, or execute and commit".

What a stage provides is in :mod:`pipeline.stage`. The runner owns everything else: input lookup,
the up-to-date check (:func:`_unless_current`, the one such check), the manifest, the atomic commit,
timings, tracking, and local worker processes for sharded stages.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import functools
import importlib.metadata
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pipeline
from pipeline import tracking
from pipeline.config import StrictModel, config_hash
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.stage import ShardedStage, Stage, StageContext
from pipeline.stages import get_stage, producer
from pipeline.storage import Artifact, Storage, hold_lock

VERSION_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "fasttext", "pyarrow", "fsspec", "numpy")


@dataclass
class Outcome:
    stage: str
    status: str  # "done" | "up to date"
    manifest: dict[str, Any]  # empty on a torchrun rank other than 0 (rank 0 commits: run_rank)
    seconds: float | None = None  # wall time of the whole stage (all ranks and the merge)


def parts_dir(stage: Stage, world: int, cfg: StrictModel | None = None) -> str:
    return f"{stage.output(cfg)}.parts/w{world:03d}"


def part_name(stage: Stage, rank: int, world: int, cfg: StrictModel | None = None, step: str | None = None) -> str:
    """Where one rank's part goes: ``<output>.parts/wNNN/rank-RRRRR``, or ``.../<step>/rank-RRRRR`` for a
    step of a multi-step stage."""
    if step is None:
        return f"{parts_dir(stage, world, cfg)}/rank-{rank:05d}"
    return f"{parts_dir(stage, world, cfg)}/{step}/rank-{rank:05d}"


def _last_step(stage: ShardedStage) -> str | None:
    return stage.STEPS[-1].name if stage.STEPS else None


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


def input_refs(inputs: dict[str, Artifact], stage: Stage | None = None, cfg: StrictModel | None = None) -> dict[str, Any]:
    """What the manifest records of each input: its fingerprint (lineage) and where it was.

    Files a stage reads from outside the run root (SFT / DPO data files named in its config) come
    from ``stage.external_inputs(cfg)`` as ``external:<path>`` entries, so editing such a file makes
    the stage stale like a changed artifact does.
    """
    refs = {k: {"fingerprint": a.fingerprint, "uri": a.url()} for k, a in inputs.items()}
    if stage is not None and cfg is not None:
        for label, fp in stage.external_inputs(cfg).items():
            refs[f"external:{label}"] = {"fingerprint": fp, "uri": label}
    return refs


def resolve_inputs(stage: Stage, storage: Storage, cfg: StrictModel | None = None) -> dict[str, Artifact]:
    """The committed artifacts a stage reads (``stage.inputs(cfg)``; ``INPUTS`` without a config)."""
    found = {}
    for name in stage.inputs(cfg) if cfg is not None else stage.INPUTS:
        manifest = storage.manifest(name)
        if manifest is None:
            made_by = producer(name)
            hint = (f"run `llmpipe run {made_by}` first (or `llmpipe pipeline`)" if made_by else
                    f"run the stage whose config has `output: {name}` first (clean and pack take one), or check "
                    "the spelling")
            raise InputError(
                f"stage {stage.name} needs '{name}/' under {storage.uri}, which has no committed output yet: {hint}"
            )
        found[name] = Artifact(storage, name, manifest)
        check_input(found[name])
    return found


VERIFY_BYTES = 256 << 20  # inputs up to this size are sha256-checked on every read; larger ones by size


def check_input(art: Artifact) -> None:
    """A committed input against its producer's manifest before a stage reads it: every file present with its size
    always, and its sha256 when the artifact is small (at most VERIFY_BYTES: cheap next to any stage's work) or
    LLMPIPE_VERIFY=full; LLMPIPE_VERIFY=size checks sizes only. `llmpipe verify` checks a whole run root in full.
    InputError naming the file and the expected / actual values otherwise."""
    mode = os.environ.get("LLMPIPE_VERIFY", "auto").strip().lower()
    checksums = mode == "full" or (mode != "size" and art.size_bytes <= VERIFY_BYTES)
    problems = art.verify(checksums)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"input '{art.name}/' does not match its manifest: {problems[0]}{more}; rerun "
                         f"`llmpipe run {art.manifest.get('stage', '<its stage>')} --force` to rebuild it, or "
                         "`llmpipe verify` to list everything damaged")


def _unless_current(stage: Stage, cfg: StrictModel, storage: Storage, name: str, inputs: dict[str, Artifact], *,
                    force: bool, produce: Callable[[], dict[str, Any]],
                    also: Callable[[dict[str, Any]], bool] = lambda manifest: True) -> Outcome:
    """The one "up to date? else execute" decision: ``name`` is up to date when its manifest has this
    config's hash and these inputs' fingerprints (and passes ``also``); otherwise ``produce()`` makes it
    and returns its manifest."""
    existing = check_output(stage, storage, name)
    if not force and is_current(existing, config_hash(cfg), input_refs(inputs, stage, cfg)) and also(existing):  # type: ignore[arg-type]
        return Outcome(stage.name, "up to date", existing)  # type: ignore[arg-type]
    return Outcome(stage.name, "done", produce())


RESERVED = {"mlflow": "the MLflow store", "checkpoints": "training checkpoints"}
LOCKS = ".locks"  # under the root; not a valid artifact name, so no output can collide with it


@contextlib.contextmanager
def output_lock(storage: Storage, name: str) -> Iterator[None]:
    """An exclusive lock on writing ``name`` for as long as the block runs: a POSIX record lock (``fcntl.lockf``) on
    ``<root>/.locks/<name>.lock``, which the kernel (or the NFS server, for a PVC) drops when the holder exits or is
    killed, so it cannot outlive a crash. A second writer of the same output gets one line naming the holder (pid,
    host, start, command) instead of deleting the first one's temporary folder or interleaving its checkpoints.
    Within one process the lock is re-entrant (POSIX record locks are per process). On S3 there is no lock: two
    writers of one output on S3 are the user's to avoid (docs/ARCHITECTURE.md)."""
    if not storage.is_local:
        yield
        return
    fh = hold_lock(os.path.join(storage.path(LOCKS), name.replace("/", "__") + ".lock"), f"'{name}/'")
    try:
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fh.close()  # closing the file releases the lock


def check_output(stage: Stage, storage: Storage, name: str) -> dict[str, Any] | None:
    """The committed manifest at ``name`` (or None), after making sure ``stage`` may write there, before anything is
    deleted: not a folder the platform owns (``mlflow/``, ``checkpoints/``), not another stage's artifact (its
    manifest names the stage that made it), not an existing folder that is no artifact (no manifest: user data, or a
    folder holding artifacts such as ``models/``). ConfigError naming what is there otherwise."""
    top = name.split("/", 1)[0]
    if top in RESERVED:
        raise ConfigError(f"{stage.name}: output {name!r} would replace {RESERVED[top]} ({storage.url(top)}); "
                          "choose another output name")
    existing = storage.manifest(name)
    if existing is not None:
        owner = existing.get("stage") if isinstance(existing, dict) else None
        if owner != stage.name:
            raise ConfigError(f"{stage.name}: output {name!r} is {owner or 'another'} stage's artifact "
                              f"({storage.url(name)}); writing there would replace it: choose another output name")
        return existing
    path = storage.path(name)
    if storage.fs.exists(path) and storage.fs.isdir(path) and storage.fs.ls(path, detail=False):
        raise ConfigError(f"{stage.name}: output {name!r} exists and is not an artifact (no manifest.json in "
                          f"{storage.url(name)}); writing there would replace it: choose another output name")
    return None


def execute(stage: Stage, fn: Callable[..., dict[str, Any] | None], cfg: StrictModel, storage: Storage, name: str,
            ctx: StageContext, extra: dict[str, Any], *args: Any) -> dict[str, Any]:
    """Run ``fn(cfg, ctx, out, *args)`` (a method of ``stage``) into a fresh output named ``name`` and
    commit it with its manifest."""
    chash = config_hash(cfg)
    inputs = input_refs(ctx.inputs, stage, cfg)
    track = name == stage.output(cfg)  # the stage's output, not one rank's part: one MLflow run per stage
    run_cm = tracking.stage_run(stage.name, storage, cfg.model_dump(mode="json"), chash) if track else contextlib.nullcontext()
    with output_lock(storage, name), run_cm as tracker, _accelerate_env():
        manifest = _execute(stage, fn, cfg, storage, name, ctx, extra, args, chash, inputs, tracker)
        if tracker is not None:
            tracking.finish_stage(tracker, stage.ARTIFACTS, storage, name, manifest)
    return manifest


@contextlib.contextmanager
def _accelerate_env() -> Iterator[None]:
    """Stages leave no ACCELERATE_* variables behind: accelerate's Accelerator sets ACCELERATE_USE_DEEPSPEED=true when
    given a DeepSpeed plugin and never unsets it (accelerate/accelerator.py, Accelerator.__init__; transformers 5's
    TrainingArguments unsets its own copy), which would put the next stage of the same process (`llmpipe pipeline`:
    pretrain with ZeRO-2, then sft with zero_stage 0) under DeepSpeed too."""
    before = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in before]:
            del os.environ[k]
        os.environ.update(before)


def _execute(stage: Stage, fn: Callable[..., dict[str, Any] | None], cfg: StrictModel, storage: Storage, name: str,
             ctx: StageContext, extra: dict[str, Any], args: tuple[Any, ...], chash: str, inputs: dict[str, Any],
             tracker: Any) -> dict[str, Any]:
    started, t0 = _now(), time.perf_counter()
    _reset_peak_rss()
    out = storage.begin(name)
    try:
        metrics = fn(cfg, ctx, out, *args) or {}
    except BaseException:
        out.abort()
        raise
    manifest = {
        "stage": stage.name,
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
        "peak_rss_mb": _peak_rss_mb(),
        "mlflow_run_id": tracker.run_id if tracker is not None and tracker.on else None,
        **extra,
    }
    return out.commit(manifest)


def _reset_peak_rss() -> None:
    """Start a new peak-memory measurement for this process (Linux: ``clear_refs`` 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process since :func:`_reset_peak_rss` (Linux ``VmHWM``), in MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def _sharded(name: str, why: str) -> ShardedStage:
    stage = get_stage(name)
    if not isinstance(stage, ShardedStage):
        raise PipelineError(f"stage {name!r} is not sharded: {why}")
    return stage


def run_part(
    stage: str, cfg: StrictModel, storage: Storage, rank: int, world: int, *, force: bool = False, progress: bool = True,
    wait: float = 0.0,
) -> Outcome:
    """One rank's share of a sharded stage (an Indexed Job pod, or a local worker process).

    A multi-step stage (``STEPS``) runs its steps in order; before each step the rank waits up to ``wait``
    seconds for every part of the step before (all ranks run at once: an Indexed Job with parallelism =
    completions, or the local workers). A retried rank finds its committed steps up to date and goes on."""
    st = _sharded(stage, "run it without --rank")
    if not 0 <= rank < world:
        raise PipelineError(f"--rank {rank} is outside 0..{world - 1} for --world-size {world}")
    inputs = resolve_inputs(st, storage, cfg)
    if not st.STEPS:
        ctx = StageContext(storage, inputs, progress=progress, rank=rank, world=world)
        name = part_name(st, rank, world, cfg)
        return _unless_current(st, cfg, storage, name, ctx.inputs, force=force, produce=lambda: execute(
            st, st.run_part, cfg, storage, name, ctx, {"rank": rank, "world_size": world}))
    earlier: dict[str, list[Artifact]] = {}
    outcome = Outcome(st.name, "up to date", {})
    for k, step in enumerate(st.STEPS):
        if k:
            before = st.STEPS[k - 1]
            earlier[before.name] = _await_parts(st, cfg, storage, world, before.name, 1 if before.single else world,
                                                inputs, wait, who=f"rank {rank}")
        if step.single and rank != 0:
            continue
        ctx = StageContext(storage, inputs, progress=progress, rank=rank, world=world, steps=dict(earlier))
        name = part_name(st, rank, world, cfg, step.name)
        run_step = functools.partial(st.run_step, step)
        extra = {"rank": rank, "world_size": world, "step": step.name}
        outcome = _unless_current(st, cfg, storage, name, inputs, force=force,
                                  produce=functools.partial(execute, st, run_step, cfg, storage, name, ctx, extra))
    return outcome


def _await_parts(stage: ShardedStage, cfg: StrictModel, storage: Storage, world: int, step: str | None, count: int,
                 inputs: dict[str, Artifact], wait: float, who: str) -> list[Artifact]:
    """The committed parts (ranks 0..count-1) of ``step``, polling up to ``wait`` seconds until all are there."""
    chash, refs = config_hash(cfg), input_refs(inputs, stage, cfg)
    start = time.monotonic()
    deadline = start + max(0.0, wait)
    last_report = start
    poll = 0.05  # quick at first (small corpora finish a step in moments), then every _WAIT_POLL_S
    what = f"step {step!r}" if step else "parts"
    while True:
        parts, missing = _committed_parts(stage, cfg, storage, world, chash, refs, step=step, count=count)
        now = time.monotonic()
        if not missing or now >= deadline:
            break
        if now - last_report >= 60:
            print(f"{stage.name} {who}: {count - len(missing)}/{count} parts of {what} committed; waiting "
                  f"(up to {deadline - now:.0f}s more)", file=sys.stderr, flush=True)
            last_report = now
        time.sleep(min(poll, max(0.01, deadline - now)))
        poll = min(_WAIT_POLL_S, poll * 2)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        if step and who != "merge":
            raise InputError(
                f"{stage.name} {who} cannot start the step after {step!r}: rank(s) {shown} of {world} have not committed "
                f"it{f' within {wait:.0f}s' if wait else ''}. The ranks of {stage.name} exchange data between steps, so all "
                f"{world} run at the same time (an Indexed Job with parallelism = completions, or `llmpipe run "
                f"{stage.name} --rank R --world-size {world} --wait SECONDS` for each R at once); look for Pending or "
                "failed pods"
            )
        raise InputError(
            f"cannot merge {stage.name}: rank(s) {shown} of {world} have no finished part for this config and input "
            f"(run `llmpipe run {stage.name} --rank R --world-size {world}` for each)"
        )
    return parts


def merge_parts(
    stage: str, cfg: StrictModel, storage: Storage, world: int, *, force: bool = False, progress: bool = True, wait: float = 0.0
) -> Outcome:
    """The single step after all ranks of a sharded stage have committed their parts.

    ``wait`` > 0 (seconds): a merge Job started beside the Indexed Job polls until every rank's
    part is committed, then merges; it fails with the missing ranks when the time is up.
    """
    st = _sharded(stage, "it has nothing to merge")
    ctx = StageContext(storage, resolve_inputs(st, storage, cfg), progress=progress)
    # a retried merge Job finds the output committed by the same number of ranks: up to date
    return _unless_current(st, cfg, storage, st.output(cfg), ctx.inputs, force=force,
                           also=lambda manifest: manifest.get("world_size") == world,
                           produce=lambda: _merge(st, cfg, storage, world, ctx, wait))


def _merge(stage: ShardedStage, cfg: StrictModel, storage: Storage, world: int, ctx: StageContext, wait: float) -> dict[str, Any]:
    output = stage.output(cfg)
    parts = _await_parts(stage, cfg, storage, world, _last_step(stage), world, ctx.inputs, wait, who="merge")
    for step in stage.STEPS[:-1]:
        ctx.steps[step.name] = _await_parts(stage, cfg, storage, world, step.name, 1 if step.single else world,
                                            ctx.inputs, 0.0, who="merge")
    per_step = [*ctx.steps.values(), parts]  # the ranks' wall time: the slowest part of each step, step after step
    extra = {"world_size": world, "parts": [p.fingerprint for p in parts],
             "parts_duration_s": round(sum(max((float(p.manifest.get("duration_s") or 0) for p in step), default=0.0)
                                           for step in per_step), 3),
             "parts_peak_rss_mb": max((float(p.manifest.get("peak_rss_mb") or 0) for step in per_step for p in step),
                                      default=None)}
    manifest = execute(stage, stage.merge, cfg, storage, output, ctx, extra, parts)
    storage.remove(parts_dir(stage, world, cfg))
    if storage.is_local:  # object stores have no empty folders to leave behind
        try:
            os.rmdir(storage.path(f"{output}.parts"))
        except OSError:
            pass
    return manifest


_WAIT_POLL_S = 5.0


def _committed_parts(stage: ShardedStage, cfg: StrictModel, storage: Storage, world: int, chash: str,
                     inputs: dict[str, Any], step: str | None = None, count: int | None = None,
                     ) -> tuple[list[Artifact], list[int]]:
    parts: list[Artifact] = []
    missing = []
    for rank in range(world if count is None else count):
        name = part_name(stage, rank, world, cfg, step)
        manifest = storage.manifest(name)
        if not is_current(manifest, chash, inputs):
            missing.append(rank)
        else:
            parts.append(Artifact(storage, name, manifest))  # type: ignore[arg-type]
    return parts, missing


def _part_worker(stage: str, cfg_json: dict[str, Any], uri: str, opts: dict[str, Any], rank: int, world: int, force: bool,
                 progress: bool) -> str:
    cfg = get_stage(stage).config.model_validate(cfg_json)
    # the workers run at once; a failed one stops the others (below), so the step barrier need not time out
    return run_part(stage, cfg, Storage(uri, opts), rank, world, force=force, progress=progress, wait=_LOCAL_WAIT_S).status


_LOCAL_WAIT_S = 7 * 24 * 3600.0


def run_stage(stage: str, cfg: StrictModel, storage: Storage, *, force: bool = False, progress: bool = True) -> Outcome:
    """The whole stage locally: for sharded stages, ``cfg.workers`` processes then the merge."""
    t0 = time.perf_counter()
    st = get_stage(stage)
    inputs = resolve_inputs(st, storage, cfg)
    outcome = _unless_current(st, cfg, storage, st.output(cfg), inputs, force=force,
                              produce=lambda: _produce(st, cfg, storage, inputs, force=force, progress=progress))
    if outcome.status == "up to date":
        tracking.note_up_to_date(stage, storage, outcome.manifest)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def die_with_parent(parent: int) -> None:
    """Worker initializer: the worker gets SIGKILL when the process that started it dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so an OOM kill of `llmpipe run` does not leave its workers and multiprocessing's
    resource tracker blocked for ever; a worker whose parent is already gone exits at once."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the pool's own broken-pipe handling is what remains
        pass
    if os.getppid() != parent:
        os._exit(1)


def _produce(stage: Stage, cfg: StrictModel, storage: Storage, inputs: dict[str, Artifact], *, force: bool,
             progress: bool) -> dict[str, Any]:
    if not isinstance(stage, ShardedStage):
        ctx = StageContext(storage, inputs, progress=progress)
        return execute(stage, stage.run, cfg, storage, stage.output(cfg), ctx, {})
    world = stage.workers(cfg)
    if world == 1:
        run_part(stage.name, cfg, storage, 0, 1, force=force, progress=progress)
    else:
        payload = cfg.model_dump(mode="json")
        with cf.ProcessPoolExecutor(max_workers=world, mp_context=mp.get_context("spawn"),
                                    initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [
                pool.submit(_part_worker, stage.name, payload, storage.uri, storage.storage_options, r, world, force, progress)
                for r in range(world)
            ]
            try:
                for fut in cf.as_completed(futures):
                    fut.result()
            except BaseException:
                # the other ranks may be waiting at a step barrier for the one that failed: stop them
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.kill()
                raise
    return merge_parts(stage.name, cfg, storage, world, force=force, progress=progress).manifest


def run_rank(stage: str, cfg: StrictModel, storage: Storage, rank: int, world: int, *, force: bool = False,
             progress: bool = True) -> Outcome:
    """One rank of a distributed (torchrun) stage: every rank runs the stage, rank 0 commits the output.
    The other ranks' outcome carries an empty manifest."""
    st = get_stage(stage)
    inputs = resolve_inputs(st, storage, cfg)
    ctx = StageContext(storage, inputs, progress=progress and rank == 0, rank=rank, world=world)

    def produce() -> dict[str, Any]:
        if rank == 0:
            return execute(st, st.run, cfg, storage, st.output(cfg), ctx, {"world_size": world})
        st.run(cfg, ctx, None)
        return {}

    return _unless_current(st, cfg, storage, st.output(cfg), inputs, force=force, produce=produce)


def format_summary(outcome: Outcome) -> str:
    """The one-screen summary printed after a stage."""
    stage = get_stage(outcome.stage)
    m = outcome.manifest
    metrics = m.get("metrics", {})
    renamed = (m.get("config") or {}).get("output")
    head = f"== {outcome.stage}" + (f" -> {renamed}/" if renamed and renamed != stage.OUTPUT else "") + f": {outcome.status}"
    if outcome.status == "done":
        head += f" in {outcome.seconds if outcome.seconds is not None else m.get('duration_s', 0):.1f}s"
    lines = [head + " " + "=" * max(0, 60 - len(head))]
    rows = stage.summary(metrics)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:,.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"  {key.ljust(width)}  {value}")
    return "\n".join(lines)
