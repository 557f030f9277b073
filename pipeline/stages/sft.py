"""sft: instruction data + ``models/pretrain/`` -> ``models/sft/`` (TRL SFTTrainer).

Data: Alpaca records (``instruction`` / ``input`` / ``output``) and chat records (``messages``)
from local .jsonl/.json/.parquet files, folders of them, or Hugging Face datasets (a
``save_to_disk`` folder, or a hub name where the hub is reachable). Every record becomes a
conversation rendered by the tokenizer's ChatML template; the loss is on assistant tokens only
(each assistant turn's content and its ``<|im_end|>``). Full fine-tuning or LoRA (merged into a
full model on export; the adapter is kept under ``adapter/``). Distributed through
:mod:`pipeline.training.launcher` with the shipped DeepSpeed configs, like pretrain. The work is
done by :func:`pipeline.training.posttrain.trainers.train_sft`.
"""

from __future__ import annotations

from typing import Any

from pipeline.stage import StageContext
from pipeline.stages._posttrain import PostTrainStage
from pipeline.storage import OutputDir
from pipeline.training.config import SFTConfig


class SFTStage(PostTrainStage):
    name = "sft"
    config = SFTConfig
    OUTPUT = "models/sft"
    INPUTS = ("models/pretrain",)  # the default; `inputs(cfg)` follows cfg.model / cfg.tokenizer

    def run(self, cfg: SFTConfig, ctx: StageContext, out: OutputDir | None) -> dict[str, Any]:
        from pipeline.training.posttrain.trainers import train_sft

        return train_sft(cfg, ctx, out)

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [
            ("examples (train / eval)", f"{m.get('train_examples')} / {m.get('eval_examples')}"),
            ("steps", m.get("steps")),
            ("mode", m.get("mode")),
            ("world size / zero", f"{m.get('world_size')} / {m.get('zero_stage')}"),
            ("final train loss", m.get("train_loss")),
            ("held-out loss before", m.get("eval_loss_before")),
            ("held-out loss after", m.get("eval_loss_after")),
            ("generations stopped at EOS", m.get("generations_stopped")),
        ]
        return [(k, v) for k, v in rows if v is not None]


STAGE = SFTStage()
