"""Training checkpoints: where they are written, which is the latest complete one, how one is saved, committed and
pruned, and what a resume reads back. No other module names these folders. One component for every training stage:
pretrain, sft, dpo and reward.

**Where.** A stage writes under ``<run root>/checkpoints/<stage>/``, or under its config's ``checkpoint_dir`` when set
(a local or mounted folder that every rank sees; a remote run root needs one: :func:`checkpoint_root`)::

    step-N/                 a complete checkpoint, the only kind ever resumed from:
        checkpoint files    what the HF Trainer writes (weights -- a LoRA run's adapter only --, optimizer /
                            scheduler / RNG state, trainer_state.json; DeepSpeed's ZeRO shards from every rank)
        data_state.json     the hash of the config that wrote it, and the data position after step N: pretrain's
                            phase, samples of it consumed and sampler state; post-training has no position of its
                            own (the Trainer's trainer_state.json and seeded sampler are the position: it skips the
                            batches already seen), so only the step
        COMPLETE            written and fsynced last: the folder is whole
    .tmp-step-N/            staging while step N is written (the Trainer's ``checkpoint-N/`` inside it);
                            renamed to step-N/ once complete, deleted by the next resume if a run died
    restarts.json           the restart budget's record (:mod:`pipeline.training.restarts`), on a cluster
    metrics.jsonl, generations.jsonl    pretrain's logs, kept beside the checkpoints

**Verbs** of :class:`CheckpointManager` (made by :meth:`~CheckpointManager.for_stage`):
:meth:`~CheckpointManager.latest` (newest complete checkpoint), :meth:`~CheckpointManager.saving` (stage, let every
rank write, commit), :meth:`~CheckpointManager.commit` (data state, COMPLETE marker, atomic rename),
:meth:`~CheckpointManager.prune` (keep the newest ``keep``), :meth:`~CheckpointManager.resume` (the newest complete
checkpoint and its data state, checked against the config).

**The Trainer side** is :class:`CheckpointedTrainer`, a mixin in front of an HF Trainer class (pretrain's own, TRL's
three): the Trainer writes ``checkpoint-N/`` into the staging folder, inside :meth:`CheckpointManager.saving`, so that
only complete checkpoints are ever found; a resume is ``trainer.train(resume_from_checkpoint=<step-N/>)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pipeline.config import config_hash
from pipeline.errors import ConfigError, PipelineError
from pipeline.storage import hold_lock
from pipeline.training.common import barrier

COMPLETE = "COMPLETE"
DATA_STATE = "data_state.json"
STEP_RE = re.compile(r"^step-(\d+)$")
STAGING_PREFIX = ".tmp-step-"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def checkpoint_root(cfg: Any, storage: Any, stage: str = "pretrain") -> Path:
    """The folder of a training stage's checkpoints: the config's ``checkpoint_dir``, else
    ``<run root>/checkpoints/<stage>``; ConfigError when that is not a filesystem."""
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir).absolute()
    if not storage.is_local:
        raise ConfigError(
            f"run root {storage.uri} is not a filesystem: DeepSpeed checkpoints need one shared by all ranks (a PVC); "
            "set checkpoint_dir to a mounted folder"
        )
    return Path(storage.path("checkpoints", stage))


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N/`` with a COMPLETE marker) under ``root``, oldest first."""
    found = []
    base = Path(root)
    if not base.is_dir():
        return []
    for entry in base.iterdir():
        m = STEP_RE.match(entry.name)
        if m and entry.is_dir() and (entry / COMPLETE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``root`` as ``(step, folder)``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to resume from: its step, folder and data state (``data_state.json``)."""

    step: int
    path: Path
    data_state: dict[str, Any]

    @property
    def has_hf_weights(self) -> bool:
        """Whether the folder holds Hugging Face weights that can be exported as they are."""
        return any((self.path / f).is_file() for f in HF_WEIGHTS)


class CheckpointManager:
    """The checkpoints of one training stage's run under :attr:`root` (see the module docstring for the layout).

    ``every``: steps between checkpoints (0: none); ``keep``: complete checkpoints kept; ``config_hash``: stored in
    each one's data state, and a resume from a checkpoint of another config is refused; ``main``: whether this rank
    (rank 0) does the file operations; ``stage``: the stage's name, for messages. Saving is collective: every rank
    calls :meth:`saving`."""

    def __init__(self, root: Path, *, every: int, keep: int, config_hash: str, main: bool, stage: str = "pretrain"):
        self.root, self.every, self.keep, self.config_hash, self.main = Path(root), every, keep, config_hash, main
        self.stage = stage

    _lock: Any = None  # the open lock file of the checkpoint folder (rank 0), held while the process lives

    @classmethod
    def for_stage(cls, stage: str, cfg: Any, storage: Any, *, main: bool) -> "CheckpointManager":
        """The manager of ``stage`` from its config's ``checkpoint_dir``, ``checkpoint_every`` and
        ``keep_checkpoints`` (pretrain's and post-training's configs have the same four keys, with ``resume``)."""
        manager = cls(checkpoint_root(cfg, storage, stage), every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                      config_hash=config_hash(cfg), main=main, stage=stage)
        if main:  # one writer per checkpoint folder, also across run roots that share a checkpoint_dir
            manager._lock = hold_lock(str(manager.root / ".lock"), f"checkpoint folder {manager.root}")
        return manager

    # -- where
    def step_dir(self, step: int) -> Path:
        """Where checkpoint ``step`` lives once complete."""
        return self.root / f"step-{step}"

    def staging_dir(self, step: int) -> Path:
        """Where checkpoint ``step`` is written before it is complete."""
        return self.root / f"{STAGING_PREFIX}{step}"

    def trainer_arguments(self) -> dict[str, Any]:
        """TrainingArguments fields: the Trainer's output folder is :attr:`root`, a checkpoint every ``every`` steps
        (and, the Trainer's own rule, one at the last step), none when ``every`` is 0."""
        if not self.every:
            return {"output_dir": str(self.root), "save_strategy": "no"}
        return {"output_dir": str(self.root), "save_strategy": "steps", "save_steps": self.every}

    # -- read
    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.root)

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint as ``(step, folder)``, or None."""
        return latest_checkpoint(self.root)

    def resume(self) -> ResumePoint | None:
        """The newest complete checkpoint with its data state, or None; rank 0 deletes staging folders left by a run
        that died while saving. PipelineError when the checkpoint was written by another config."""
        found = self.latest()
        if self.main:
            self.clear_staging()
        if found is None:
            return None
        step, path = found
        state = json.loads((path / DATA_STATE).read_text())
        if state.get("config_hash") != self.config_hash:
            raise PipelineError(
                f"checkpoint {path} was written by a different {self.stage} config; delete {self.root} "
                "(or point checkpoint_dir elsewhere, or set resume: false) to start over"
            )
        return ResumePoint(step, path, state)

    # -- write
    @contextlib.contextmanager
    def saving(self, step: int, data_state: Callable[[], dict[str, Any]], written: str) -> Iterator[Path]:
        """Save checkpoint ``step``, collectively: rank 0 empties the staging folder, which this yields; every rank
        writes its part into it (the block), the folder ``written`` inside it being the checkpoint; rank 0 then
        commits it with ``data_state()``. An error in the block propagates and commits nothing."""
        staging = self.staging_dir(step)
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        yield staging
        barrier()
        if self.main:
            self.commit(step, staging / written, data_state())
            shutil.rmtree(staging, ignore_errors=True)
            self.prune()
        barrier()

    def commit(self, step: int, folder: Path, data_state: dict[str, Any]) -> Path:
        """Make ``folder`` (fully written) checkpoint ``step``: its data state, then the COMPLETE marker (fsynced),
        then an atomic rename to ``step-N/`` (replacing the one an earlier run wrote at the same step)."""
        (folder / DATA_STATE).write_text(json.dumps({**data_state, "config_hash": self.config_hash}, indent=2) + "\n")
        with open(folder / COMPLETE, "w") as fh:
            fh.write(json.dumps({"step": step, "time": time.time()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        final = self.step_dir(step)
        if final.exists():  # a rerun reached the same step again: replace it
            aside = self.root / f".old-step-{step}-{time.time_ns()}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(folder, final)
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete checkpoints."""
        for _, old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def clear_staging(self) -> None:
        """Delete staging folders (``.tmp-step-*``): a run died while writing them."""
        for stale in self.root.glob(f"{STAGING_PREFIX}*") if self.root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)


class CheckpointedTrainer:
    """Mixin for an HF ``Trainer`` subclass (``class T(CheckpointedTrainer, Trainer)``): its checkpoints go through
    :attr:`checkpoints` (a :class:`CheckpointManager`). The Trainer's ``_save_checkpoint`` runs inside
    :meth:`CheckpointManager.saving` and writes ``checkpoint-N/`` into the staging folder (``_get_output_dir``), which
    is then committed as ``step-N/``. :meth:`checkpoint_data_state` is what goes into ``data_state.json``."""

    checkpoints: CheckpointManager
    state: Any  # the Trainer's TrainerState

    def __init__(self, *args: Any, checkpoints: CheckpointManager, **kwargs: Any):
        self.checkpoints = checkpoints
        super().__init__(*args, **kwargs)

    def checkpoint_data_state(self, step: int) -> dict[str, Any]:
        """The data position after ``step`` (pretrain's stream position); by default the step and the epoch."""
        return {"step": step, "epoch": self.state.epoch}

    def _get_output_dir(self, trial: Any) -> str:
        # the folder HF's _save_checkpoint writes checkpoint-N/ into: this step's staging folder
        return str(self.checkpoints.staging_dir(self.state.global_step))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        step = self.state.global_step
        with self.checkpoints.saving(step, lambda: self.checkpoint_data_state(step),
                                     written=f"{PREFIX_CHECKPOINT_DIR}-{step}"):
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
