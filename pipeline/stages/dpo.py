"""dpo: preference data + ``models/sft/`` -> ``models/dpo/`` (TRL DPOTrainer).

Records hold ``prompt`` (a string or chat messages), ``chosen`` and ``rejected`` (strings or one
assistant message). The reference model is a frozen copy of the starting model, or -- with LoRA
-- the same model with its adapters disabled. Before and after training the stage measures, on
the held-out pairs and on (up to 64 of) the training pairs, the policy's log-probability margin
chosen - rejected and the DPO implicit reward margin / accuracy
``beta * (log pi/pi_ref (chosen) - log pi/pi_ref (rejected))`` (0 before training by definition).
The work is done by :func:`pipeline.training.posttrain.train_dpo`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.stages.sft import PostTrainConfig, SampleGeneration, external_inputs_of, inputs_of

NAME = "dpo"
INPUTS = ["models/sft"]
OUTPUT = "models/dpo"


class DPOConfig(PostTrainConfig):
    model: str = Field("models/sft", description="artifact holding the starting (SFT) checkpoint")
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the pull towards the reference")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    lr: float = Field(5e-7, gt=0)
    generation: SampleGeneration = Field(default_factory=SampleGeneration)
    EXEC_FIELDS: ClassVar[set[str]] = {"log_every", "eval_every", "generation"}


def inputs(cfg: DPOConfig) -> list[str]:
    return inputs_of(cfg)


def external_inputs(cfg: DPOConfig) -> dict[str, str]:
    return external_inputs_of(cfg)


def run(cfg: DPOConfig, ctx: Any, out: Any) -> dict[str, Any]:
    from pipeline.training.posttrain import train_dpo

    return train_dpo(cfg, ctx, out)


def summary(m: dict[str, Any]) -> list[tuple[str, Any]]:
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


def _arrow(m: dict[str, Any], key: str) -> str | None:
    a, b = m.get(f"{key}_before"), m.get(f"{key}_after")
    return None if a is None or b is None else f"{a:.4g} -> {b:.4g}"
