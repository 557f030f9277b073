"""What a stage is: the one shape every stage of the pipeline has.

A stage lives in ``pipeline/stages/<name>.py`` as a subclass of :class:`Stage` (one task) or
:class:`ShardedStage` (ranks, then a merge), exposed as the module's ``STAGE``, its name listed in
``pipeline.stages.ORDER``. It declares:

* ``name`` and ``config`` (its pydantic config class), ``OUTPUT`` (the artifact it writes) and
  ``INPUTS`` (the artifacts it reads); ``inputs(cfg)`` when the config decides what it reads; a
  config with an ``output`` field renames the output (the stage can then run again as a variant);
* ``run(cfg, ctx, out) -> metrics`` -- or, sharded, ``run_part(cfg, ctx, out) -> metrics`` for one
  rank's share (``ctx.rank``, ``ctx.world``) and ``merge(cfg, ctx, out, parts) -> metrics``;
* optionally ``summary(metrics)`` (the one-screen summary), ``external_inputs(cfg)`` (files outside
  the run root it reads, with their fingerprints), ``ARTIFACTS`` (report globs logged to MLflow) and
  ``distributed = True`` for stages that run under torchrun.

A stage module stays light to import (`llmpipe config`, `llmpipe stages` and the pipeline's config
validation import every stage): torch, transformers, mlflow and the like are imported inside ``run``.
The runner (:mod:`pipeline.runner`) owns everything else: input lookup, the up-to-date check, the
manifest, the atomic commit, timings, tracking and local worker processes. This module imports
nothing above the core (config, storage), so stages, the runner and the CLI all build on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from tqdm.auto import tqdm

from pipeline.config import StrictModel
from pipeline.storage import Artifact, OutputDir


@dataclass
class StageContext:
    """What a stage gets besides its config: the run root, its committed inputs, its rank."""

    storage: Any  # pipeline.storage.Storage
    inputs: dict[str, Artifact]
    progress: bool = True
    rank: int = 0
    world: int = 1
    notes: list[str] = field(default_factory=list)
    steps: dict[str, list[Artifact]] = field(default_factory=dict)
    """In a multi-step sharded stage: the committed parts of the steps before this one, by step name, in
    rank order (one part for a ``single`` step)."""

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


Rows = list[tuple[str, Any]]


class Stage:
    """One task: ``run`` reads ``ctx.inputs`` and writes into ``out``; its return value is the metrics."""

    name: ClassVar[str]
    config: ClassVar[type[StrictModel]]
    OUTPUT: ClassVar[str]
    INPUTS: ClassVar[tuple[str, ...]] = ()
    ARTIFACTS: ClassVar[tuple[str, ...]] = ()  # report files (globs under the output) logged to MLflow
    distributed: ClassVar[bool] = False  # runs on every rank under torchrun; rank 0 gets `out`, the others None
    sharded: ClassVar[bool] = False

    def inputs(self, cfg: Any) -> list[str]:
        """The artifacts this config reads (default: ``INPUTS``)."""
        return list(self.INPUTS)

    def output(self, cfg: Any) -> str:
        """The artifact this config writes: the config's ``output`` field where it has one, else ``OUTPUT``."""
        return getattr(cfg, "output", None) or self.OUTPUT

    @classmethod
    def renamable(cls) -> bool:
        """Whether a config of this stage may name its output (``output:``), so the stage can run again as a variant."""
        return "output" in cls.config.model_fields

    def external_inputs(self, cfg: Any) -> dict[str, str]:
        """Files read from outside the run root -> their fingerprint (editing one makes the stage stale)."""
        return {}

    def run(self, cfg: Any, ctx: StageContext, out: OutputDir | None) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, metrics: dict[str, Any]) -> Rows:
        """Rows of the one-screen summary printed after the stage (default: its scalar metrics)."""
        return [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str))]


@dataclass(frozen=True)
class Step:
    """One step of a multi-step sharded stage: ``step_<name>(cfg, ctx, out)`` runs on every rank, or on
    rank 0 alone when ``single``. A step starts when every part of the step before it is committed."""

    name: str
    single: bool = False


class ShardedStage(Stage):
    """Ranks, then one merge: every rank commits its own part under ``<output>.parts/``, then ``merge``
    commits ``<output>/`` from all of them. Locally ``cfg.workers`` processes; on a cluster an
    Indexed Job (one pod per rank) and a merge Job.

    A stage whose work needs data from every rank between two passes (clean's deduplication) lists
    ``STEPS``: each rank runs them in order, waiting at each step for all parts of the one before (a
    barrier on committed parts in the shared storage), and ``merge`` gets the last step's parts (the
    earlier ones in ``ctx.steps``). The default is one step, ``run_part``."""

    sharded: ClassVar[bool] = True
    STEPS: ClassVar[tuple[Step, ...]] = ()

    def run_step(self, step: Step, cfg: Any, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        return getattr(self, f"step_{step.name}")(cfg, ctx, out)

    def workers(self, cfg: Any) -> int:
        return int(getattr(cfg, "workers", 1))

    def run_part(self, cfg: Any, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        raise NotImplementedError

    def merge(self, cfg: Any, ctx: StageContext, out: OutputDir, parts: list[Artifact]) -> dict[str, Any]:
        raise NotImplementedError
