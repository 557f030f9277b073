"""dpo: preference data + ``models/sft/`` -> ``models/dpo/`` (TRL DPOTrainer).

Records hold ``prompt`` (a string or chat messages), ``chosen`` and ``rejected`` (strings or one
assistant message). The reference model is a frozen copy of the starting model, or -- with LoRA
-- the same model with its adapters disabled. Before and after training the stage measures, on
the held-out pairs and on (up to 64 of) the training pairs, the policy's log-probability margin
chosen - rejected and the DPO implicit reward margin / accuracy
``beta * (log pi/pi_ref (chosen) - log pi/pi_ref (rejected))`` (0 before training by definition).
The work is done by :func:`pipeline.training.posttrain.trainers.train_dpo`.
"""

from __future__ import annotations

from typing import Any

from pipeline.stage import StageContext
from pipeline.stages._posttrain import PostTrainStage
from pipeline.storage import OutputDir
from pipeline.training.config import DPOConfig


def _arrow(m: dict[str, Any], key: str) -> str | None:
    a, b = m.get(f"{key}_before"), m.get(f"{key}_after")
    return None if a is None or b is None else f"{a:.4g} -> {b:.4g}"


class DPOStage(PostTrainStage):
    name = "dpo"
    config = DPOConfig
    OUTPUT = "models/dpo"
    INPUTS = ("models/sft",)

    def run(self, cfg: DPOConfig, ctx: StageContext, out: OutputDir | None) -> dict[str, Any]:
        from pipeline.training.posttrain.trainers import train_dpo

        return train_dpo(cfg, ctx, out)

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [
            ("pairs (train / eval)", f"{m.get('train_examples')} / {m.get('eval_examples')}"),
            ("steps", m.get("steps")),
            ("mode / reference", f"{m.get('mode')} / {m.get('reference')}"),
            ("final train loss", m.get("train_loss")),
            ("logp margin before -> after", _arrow(m, "eval_logp_margin")),
            ("reward accuracy (eval)", m.get("eval_reward_accuracy_after")),
            ("reward margin (eval)", m.get("eval_reward_margin_after")),
            ("reward accuracy (train)", m.get("train_reward_accuracy_after")),
        ]
        return [(k, v) for k, v in rows if v is not None]


STAGE = DPOStage()
