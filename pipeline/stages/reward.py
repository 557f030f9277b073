"""reward: preference data + ``models/sft/`` -> ``models/reward/`` (TRL RewardTrainer).

The causal LM checkpoint is loaded as ``AutoModelForSequenceClassification`` with one label (a
new scalar head on the last non-pad token) and trained on the chosen/rejected pairs
(Bradley-Terry loss). Metrics: pairwise accuracy (reward(chosen) > reward(rejected)) and mean
margin on the held-out pairs and on the training pairs, before and after. The work is done by
:func:`pipeline.training.posttrain.trainers.train_reward`.
"""

from __future__ import annotations

from typing import Any

from pipeline.stage import StageContext
from pipeline.stages._posttrain import PostTrainStage
from pipeline.storage import OutputDir
from pipeline.training.config import RewardConfig


class RewardStage(PostTrainStage):
    name = "reward"
    config = RewardConfig
    OUTPUT = "models/reward"
    INPUTS = ("models/sft",)

    def run(self, cfg: RewardConfig, ctx: StageContext, out: OutputDir | None) -> dict[str, Any]:
        from pipeline.training.posttrain.trainers import train_reward

        return train_reward(cfg, ctx, out)

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [
            ("pairs (train / eval)", f"{m.get('train_examples')} / {m.get('eval_examples')}"),
            ("steps", m.get("steps")),
            ("mode", m.get("mode")),
            ("final train loss", m.get("train_loss")),
            ("eval accuracy before -> after", f"{m.get('eval_accuracy_before')} -> {m.get('eval_accuracy_after')}"),
            ("train accuracy after", m.get("train_accuracy_after")),
            ("eval margin after", m.get("eval_margin_after")),
        ]
        return [(k, v) for k, v in rows if v is not None]


STAGE = RewardStage()
