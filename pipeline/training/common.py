"""What pretrain and post-training share around the HF Trainer: the machine, the process group, the
TrainingArguments both build, and the export of the final Hugging Face model folder.

* :func:`resolve_precision`, :func:`quiet_libraries`, :func:`quiet_trainer_logs`;
* distributed: :func:`barrier` and :func:`gather_objects` (no-ops in one process), :func:`free_port`,
  :func:`load_deepspeed_config` (the shipped ZeRO JSON or the configured one) and :func:`start_deepspeed`
  (DeepSpeed's process group; in one process without torchrun, a one-process group on a free port);
* inputs: :func:`local_copy` of an artifact, :func:`has_tokenizer`;
* :func:`training_arguments`: the TrainingArguments fields both build from their configs;
* the optimizer's weight-decay groups: :func:`decay_parameter_names`, :func:`optimizer_param_groups` and the
  :class:`DecayGroups` Trainer mixin, which gives them to the HF optimizer and to DeepSpeed's own (offload) alike;
* :class:`Export`: the model folder a training stage commits (weights gathered from ZeRO-3 partitions, LoRA
  merged, tokenizer, report files), uploaded at the end when the run root is remote.

Where checkpoints are written is :mod:`pipeline.training.checkpoint`'s business, not this module's. torch and
transformers are imported at the top: this module is imported only when a training stage runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pipeline.errors import ConfigError, PipelineError
from pipeline.training import deepspeed_config_path, free_port

# ------------------------------------------------------------------------------ machine and logs


def resolve_precision(requested: str, *, cuda: bool | None = None, bf16_ok: bool | None = None) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, fp16 on an older GPU, fp32 on CPU."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if bf16_ok is None:
        bf16_ok = bool(cuda and torch.cuda.is_bf16_supported())
    if requested == "auto":
        return "bf16" if cuda and bf16_ok else ("fp16" if cuda else "fp32")
    if requested in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"precision {requested} needs a CUDA device; this machine has none (use precision: fp32 or auto)")
    if requested == "bf16" and not bf16_ok:
        raise ConfigError("precision bf16 is not supported by this GPU (use fp16 or auto)")
    return requested


def quiet_libraries(verbosity: int) -> None:
    """transformers' logging at ``verbosity`` (``transformers.logging.WARNING``, ...); no FutureWarnings from
    torch.distributed."""
    transformers.logging.set_verbosity(verbosity)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")


class _BarOnly(ProgressCallback):
    """The progress bar without the raw log dict it prints above itself."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        pass


def quiet_trainer_logs(trainer: Any) -> None:
    """Drop the Trainer's raw ``{'loss': ...}`` dicts (PrinterCallback, and ProgressCallback's copy above its bar)."""
    trainer.remove_callback(PrinterCallback)
    if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_BarOnly())


# ------------------------------------------------------------------------------ distributed


def _dist() -> Any:
    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def load_deepspeed_config(cfg: Any) -> dict[str, Any] | None:
    """The DeepSpeed JSON of ``cfg`` (``deepspeed_config``, else the shipped one for ``zero_stage`` / ``offload``);
    None for zero_stage 0 (no DeepSpeed)."""
    if cfg.zero_stage == 0:
        return None
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else deepspeed_config_path(cfg.zero_stage, cfg.offload)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed_config {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed_config {path} is not valid JSON: {exc}") from None
    stage = ds.get("zero_optimization", {}).get("stage")
    if cfg.deepspeed_config and stage is not None and stage != cfg.zero_stage:
        raise ConfigError(f"deepspeed_config {path} has ZeRO stage {stage} but zero_stage is {cfg.zero_stage}")
    return ds


def start_deepspeed(ds_cfg: dict[str, Any] | None, world: int) -> None:
    """DeepSpeed's process group, before TrainingArguments and ZeRO-3's ``zero.Init`` (inside ``from_pretrained``)
    read the world size. In this very process without torchrun (``llmpipe run``): a one-process group."""
    if ds_cfg is None:
        return
    if "LOCAL_RANK" not in os.environ and world == 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    if "LOCAL_RANK" in os.environ:
        # imported here, not at the top: only runs with ZeRO need it, and importing it takes seconds
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


# ------------------------------------------------------------------------------ inputs


def local_copy(art: Any, tmp: str) -> str:
    """An artifact as a local folder under ``tmp`` (itself when the run root is local)."""
    return art.download(os.path.join(tmp, art.name.replace("/", "_")))


def has_tokenizer(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


# ------------------------------------------------------------------------------ TrainingArguments


def _checkpointing_arguments(on: bool) -> dict[str, Any]:
    """Activation checkpointing in TrainingArguments: ``activation_checkpointing[_kwargs]`` in newer 5.x, where the
    ``gradient_checkpointing`` names are deprecated aliases; 5.17 (our floor) has only those."""
    name = "activation_checkpointing" if "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def training_arguments(cfg: Any, ctx: Any, *, precision: str, ds_cfg: dict[str, Any] | None,
                       checkpoints: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The TrainingArguments fields pretrain and the three post-training stages set alike, from the fields their
    configs share (micro_batch_size, lr, weight_decay, max_grad_norm, log_every, gradient_checkpointing, seed).

    ``checkpoints``: where the Trainer writes and whether it saves, from :mod:`pipeline.training.checkpoint`
    (``CheckpointManager.trainer_arguments``); ``fields``: the stage's own."""
    cuda = torch.cuda.is_available()
    return dict(
        **_checkpointing_arguments(cfg.gradient_checkpointing),
        **checkpoints,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.log_every,
        logging_first_step=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        deepspeed=ds_cfg,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=not ctx.progress,
        ddp_backend="gloo" if (not cuda and "LOCAL_RANK" in os.environ) else None,
        use_cpu=not cuda,
        **fields,
    )


# ------------------------------------------------------------------------------ optimizer

# parameter names the HF Trainer never decays (Trainer.get_decay_parameter_names); we keep them and add module types
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm / GroupNorm, torch's or a model's own (LlamaRMSNorm, Qwen2RMSNorm, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def decay_parameter_names(model: nn.Module) -> list[str]:
    """The names (as ``model.named_parameters()`` gives them) of the parameters weight decay applies to: every one
    except norm weights, biases and embeddings (``nn.Embedding`` tables, and an LM head tied to one, which is the
    same tensor). Excluding embeddings is our choice (the HF Trainer decays them); see docs/ARCHITECTURE.md."""
    skip: set[int] = set()
    for module in model.modules():
        whole = _is_norm(module) or isinstance(module, nn.Embedding)
        for pname, p in module.named_parameters(recurse=False):
            if whole or pname == "bias" or pname.endswith("_bias"):
                skip.add(id(p))
    return [n for n, p in model.named_parameters() if id(p) not in skip and not _NO_DECAY_NAMES.search(n.lower())]


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: ``weight_decay`` on :func:`decay_parameter_names`, 0.0 on the rest
    (an empty group left out)."""
    decay = set(decay_parameter_names(model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class DecayGroups:
    """Mixin for an HF ``Trainer`` subclass: the same weight-decay groups whoever builds the optimizer.

    * no ``optimizer`` block in the DeepSpeed config (or no DeepSpeed): the Trainer's own ``create_optimizer``
      groups by :meth:`get_decay_parameter_names`, which is ours;
    * an ``optimizer`` block (the shipped ``zero*-offload.json``: DeepSpeedCPUAdam): transformers' ``deepspeed_init``
      hands accelerate a ``DummyOptim`` over one flat list of every parameter, and DeepSpeed's
      ``_configure_basic_optimizer`` builds its optimizer from that list with the block's ``weight_decay`` on all of
      them, norms included. The Trainer calls ``create_optimizer`` right after ``deepspeed_init`` (before
      ``accelerator.prepare``), and a ``DummyOptim`` is not None there, so the Trainer's version does nothing; ours
      replaces the ``DummyOptim``'s params by :func:`optimizer_param_groups`, which accelerate passes to
      ``deepspeed.initialize(model_parameters=...)``: a group's ``weight_decay`` overrides the block's."""

    args: Any
    model: Any
    optimizer: Any

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def create_optimizer(self, model: Any = None) -> Any:
        from accelerate.utils import DummyOptim

        if isinstance(self.optimizer, DummyOptim):
            self.optimizer.params = optimizer_param_groups(self.model if model is None else model,
                                                           self.args.weight_decay)
            return self.optimizer
        return super().create_optimizer(model)  # type: ignore[misc]


# ------------------------------------------------------------------------------ export


class Export:
    """The model folder a training stage commits: ``out``'s own folder when the run root is local (rank 0 writes
    it in place), else ``<tmp>/export``, uploaded by :meth:`finish`. Every rank calls :meth:`save_weights` and
    :meth:`finish` (both end with a barrier); rank 0 (the one with ``out``) writes."""

    def __init__(self, out: Any, tmp: str, *, main: bool):
        self.out, self.main = out, main
        self.dir = out.path() if (out is not None and out.storage.is_local) else os.path.join(tmp, "export")

    @property
    def writes(self) -> bool:
        """Whether this rank writes the folder's files (rank 0, which has the output)."""
        return self.main and self.out is not None

    def save_weights(self, trainer: Any, *, lora: bool = False) -> None:
        """The full HF weights: ``trainer.save_model`` (collective under ZeRO-3, which gathers the partitions; only
        rank 0 writes); with LoRA, rank 0 saves the adapter under ``adapter/`` and the merged model beside it."""
        if lora:
            if self.main:
                model = trainer.accelerator.unwrap_model(trainer.model)
                model.save_pretrained(os.path.join(self.dir, "adapter"))
                model.merge_and_unload().save_pretrained(self.dir, safe_serialization=True)
        else:
            trainer.save_model(self.dir)
        barrier()

    def finish(self, tokenizer: Any, files: dict[str, Any], copies: dict[str, Path] | None = None) -> None:
        """Rank 0: the tokenizer, ``files`` (name -> records: ``.jsonl`` one per line, else indented JSON) and
        ``copies`` (name -> a local file, when it exists) beside the weights; PipelineError when no weights were
        written; the upload when the run root is remote."""
        if self.writes:
            try:
                os.remove(os.path.join(self.dir, "training_args.bin"))
            except OSError:
                pass
            tokenizer.save_pretrained(self.dir)
            for fname, payload in files.items():
                with open(os.path.join(self.dir, fname), "w", encoding="utf-8") as fh:
                    if fname.endswith(".jsonl"):
                        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in payload)
                    else:
                        json.dump(payload, fh, indent=2, ensure_ascii=False)
            for fname, src in (copies or {}).items():
                if src.exists():
                    shutil.copyfile(src, os.path.join(self.dir, fname))
            if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(self.dir)):
                raise PipelineError(f"no model weights were exported to {self.dir}")
            if not self.out.storage.is_local:
                self.out.put_local(self.dir)
        barrier()
