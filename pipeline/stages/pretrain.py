"""pretrain: ``shards/`` (one artifact per data phase) + ``models/init/`` -> ``models/pretrain/``.

Distributed: run it through :mod:`pipeline.training.launcher` (torchrun; a Kubeflow PyTorchJob on a
cluster). Every rank calls :func:`run`; rank 0 gets the output folder, the others ``out=None``.
Checkpoints go to ``checkpoints/pretrain/step-N/`` every ``checkpoint_every`` steps and a restart
resumes from the newest complete one (model, optimizer, scheduler, RNG and data position). The
work is done by :func:`pipeline.training.pretrain.train`.
"""

from __future__ import annotations

from typing import Any

from pipeline.stage import Stage, StageContext
from pipeline.storage import OutputDir
from pipeline.training.config import PretrainConfig


class PretrainStage(Stage):
    name = "pretrain"
    config = PretrainConfig
    OUTPUT = "models/pretrain"
    INPUTS = ("shards", "models/init", "tokenizer")  # the default; `inputs(cfg)` adds every phase's shards
    distributed = True

    def inputs(self, cfg: PretrainConfig) -> list[str]:
        """Artifacts this config reads: every phase's shards, the initial model and the tokenizer."""
        names: list[str] = []
        for name in [*(p.shards for p in cfg.phases), cfg.model, cfg.tokenizer]:
            if name not in names:
                names.append(name)
        return names

    def run(self, cfg: PretrainConfig, ctx: StageContext, out: OutputDir | None) -> dict[str, Any]:
        from pipeline.training.pretrain import train

        return train(cfg, ctx, out)

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [
            ("steps", m.get("steps")),
            ("tokens", m.get("tokens")),
            ("world size", f"{m.get('world_size')} (grad accum {m.get('grad_accum')}, micro batch {m.get('micro_batch_size')})"),
            ("zero / precision", f"{m.get('zero_stage')} / {m.get('precision')}"),
            ("final train loss", m.get("train_loss")),
            ("val loss", m.get("val_loss")),
            ("val perplexity", m.get("val_perplexity")),
            ("tokens/s", m.get("tokens_per_s")),
        ]
        langs = sorted(k[len("val_loss_"):] for k in m if k.startswith("val_loss_"))
        if langs:
            rows.append(("val loss per language", ", ".join(
                f"{lang} {m[f'val_loss_{lang}']:.4f}" + (f" ({m[f'val_bpb_{lang}']:.3f} bits/byte)"
                                                          if m.get(f"val_bpb_{lang}") is not None else "")
                for lang in langs)))
        for phase, ph in (m.get("phases") or {}).items():  # what each phase drew, per language and source
            for key, label in (("languages", "language"), ("sources", "source")):
                if ph.get(key):
                    rows.append((f"phase {phase} by {label}", ", ".join(
                        f"{name} {_count(v['tokens'])} tokens ({v['epochs']:.2f} epochs)" for name, v in ph[key].items())))
        if m.get("mfu") is not None:
            rows.append(("MFU", m["mfu"]))
        if m.get("data_wait_fraction") is not None:
            rows.append(("waiting for data", f"{m['data_wait_fraction']:.1%} of the step time ({m['data_wait_s']:.1f} s; "
                                             f"dataloader workers {m.get('dataloader_workers', '?')})"))
        if m.get("document_masking"):
            rows.append(("attention", "within documents (document_masking)"))
        kernels = [k for k, on in (("compile", m.get("compile")), ("liger", m.get("liger_kernels"))) if on]
        if m.get("attention") not in (None, "sdpa") or kernels:
            rows.append(("kernels", ", ".join([f"attention {m.get('attention')}", *kernels])))
        if m.get("resumed_from_step"):
            rows.append(("resumed from step", m["resumed_from_step"]))
        return [(k, v) for k, v in rows if v is not None]


def _count(n: float) -> str:
    """1234567 -> 1.23M (tokens in the summary)."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


STAGE = PretrainStage()
