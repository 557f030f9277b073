"""reward: preference data + ``models/sft/`` -> ``models/reward/`` (TRL RewardTrainer).

The causal LM checkpoint is loaded as ``AutoModelForSequenceClassification`` with one label (a
new scalar head on the last non-pad token) and trained on the chosen/rejected pairs
(Bradley-Terry loss). Metrics: pairwise accuracy (reward(chosen) > reward(rejected)) and mean
margin on the held-out pairs and on the training pairs, before and after. The work is done by
:func:`pipeline.training.posttrain.train_reward`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from pipeline.stages.sft import PostTrainConfig, external_inputs_of, inputs_of

NAME = "reward"
INPUTS = ["models/sft"]
OUTPUT = "models/reward"


class RewardConfig(PostTrainConfig):
    model: str = Field("models/sft", description="artifact holding the causal LM the reward model starts from")
    lr: float = Field(1e-5, gt=0)
    center_rewards: float | None = Field(None, ge=0, description="coefficient pulling rewards towards 0 (None: off)")
    EXEC_FIELDS: ClassVar[set[str]] = {"log_every", "eval_every"}


def inputs(cfg: RewardConfig) -> list[str]:
    return inputs_of(cfg)


def external_inputs(cfg: RewardConfig) -> dict[str, str]:
    return external_inputs_of(cfg)


def run(cfg: RewardConfig, ctx: Any, out: Any) -> dict[str, Any]:
    from pipeline.training.posttrain import train_reward

    return train_reward(cfg, ctx, out)


def summary(m: dict[str, Any]) -> list[tuple[str, Any]]:
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
