"""The three post-training stages on one rank: :func:`train_sft`, :func:`train_dpo`, :func:`train_reward`.

Each reads its data (:mod:`.data`), opens a :class:`PostTrainRun` (every check before any weights load, the
resume point, the DeepSpeed process group, the TrainingArguments fields, the export: :mod:`pipeline.training.common`,
as pretrain), builds its TRL trainer, measures before and after training (:mod:`.measures`) and exports the model.
Rank 0 gets the output folder, the others ``None``.

Checkpoints are pretrain's (:mod:`pipeline.training.checkpoint`): every ``checkpoint_every`` steps and at the last
step, the TRL trainer (with :class:`~pipeline.training.checkpoint.CheckpointedTrainer` in front) writes
``<checkpoint root>/step-N/`` (weights or the LoRA adapter, optimizer, scheduler, RNG, trainer_state.json), committed
with a COMPLETE marker. A restarted run (``resume``) trains on from the newest complete one with
``trainer.train(resume_from_checkpoint=...)``: the Trainer restores the step, the optimizer and the RNG, and its
seeded sampler (``data_seed``) skips the batches the checkpoint already saw, so the run ends where an uninterrupted
one would. The measurements "before" are of the starting model either way (the checkpoint loads inside ``train``).
On a cluster each start is counted against the restart budget (:mod:`pipeline.training.restarts`).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
import warnings
from typing import Any

import datasets
import torch
import transformers
import trl
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig, TrainerCallback

from pipeline import tracking
from pipeline.errors import InputError
from pipeline.training.checkpoint import CheckpointedTrainer, CheckpointManager
from pipeline.training.common import (
    DecayGroups,
    Export,
    barrier,
    load_deepspeed_config,
    quiet_libraries,
    quiet_trainer_logs,
    resolve_precision,
    start_deepspeed,
    training_arguments,
)
from pipeline.training.posttrain.data import data_fingerprints, load_train_eval
from pipeline.training.posttrain.measures import (
    completion_logps,
    generate_samples,
    heldout_loss,
    pair_stats,
    reward_scores,
)
from pipeline.training.posttrain.templates import (
    assistant_alignment,
    check_max_length,
    model_folder,
    prepare_tokenizer,
    stop_token_ids,
)
from pipeline.training.restarts import count_start

GENERATIONS_FILE = "generations.json"
METRICS_FILE = "train_metrics.jsonl"
LOG_KEYS = ("loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins", "accuracy", "margin",
            "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_accuracy")


# ------------------------------------------------------------------------------- set-up


def trainer_kwargs(cfg: Any, ctx: Any, checkpoints: CheckpointManager, precision: str, ds_cfg: dict | None,
                   has_eval: bool) -> dict:
    """TrainingArguments fields of the three TRL configs: the shared ones, the checkpoints', and post-training's own."""
    return training_arguments(
        cfg, ctx, precision=precision, ds_cfg=ds_cfg, checkpoints=checkpoints.trainer_arguments(),
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # below 1: a fraction of the steps (TrainingArguments.get_warmup_steps)
        eval_strategy="steps" if (cfg.eval_every and has_eval) else "no",
        eval_steps=cfg.eval_every or None,
        data_seed=cfg.seed,
        dataset_num_proc=None,
    )


def lora_config(cfg: Any, task_type: str) -> LoraConfig | None:
    if cfg.lora is None:
        return None
    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, task_type=task_type,
                      target_modules=lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules))


def _final_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return float(losses[-1]) if losses else None


class PostTrainRun:
    """What the three trainers share around the TRL trainer: a scratch folder, the checks, the checkpoints and the
    resume point (:attr:`resume_from`, :attr:`start_step`), the process group, the TrainingArguments fields and the
    export. A context manager: the scratch folder goes on exit."""

    def __init__(self, cfg: Any, ctx: Any, out: Any, name: str):
        quiet_libraries(transformers.logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"trl.*")
        self.cfg, self.ctx, self.out, self.name = cfg, ctx, out, name
        self.main = ctx.rank == 0
        self._scratch = tempfile.TemporaryDirectory(prefix=f"llmpipe-{name}-r{ctx.rank}-", ignore_cleanup_errors=True)
        self.tmp = self._scratch.name
        try:
            self.precision = resolve_precision(cfg.precision)
            self.ds_cfg = load_deepspeed_config(cfg)
            # -- every check before any weights are loaded
            self.model_dir, self.tok_dir = model_folder(ctx, cfg, self.tmp)
            self.model_config = check_max_length(cfg, self.model_dir)
            self.tok = prepare_tokenizer(self.tok_dir, cfg.chat_template)
            if len(self.tok) > self.model_config.vocab_size:
                raise InputError(f"the tokenizer has {len(self.tok)} tokens but the model's vocab_size is "
                                 f"{self.model_config.vocab_size}")
            # -- where checkpoints go, and the newest complete one to go on from
            self.checkpoints = CheckpointManager.for_stage(name, cfg, ctx.storage, main=self.main)
            found = self.checkpoints.resume() if cfg.resume else None
            barrier()
            self.start_step, self.resume_from = (found.step, str(found.path)) if found else (0, None)
            count_start(name, self.checkpoints.root, self.start_step, main=self.main, log=ctx.log)
        except BaseException:
            self._scratch.cleanup()
            raise
        self.synced = cfg.zero_stage == 3 and ctx.world > 1
        self.export = Export(out, self.tmp, main=self.main)

    def __enter__(self) -> "PostTrainRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._scratch.cleanup()

    def arguments(self, has_eval: bool) -> dict[str, Any]:
        """DeepSpeed started (when zero_stage > 0), then the TrainingArguments fields: before any
        ``from_pretrained``, so that ZeRO-3 partitions the weights as they load."""
        start_deepspeed(self.ds_cfg, self.ctx.world)
        return trainer_kwargs(self.cfg, self.ctx, self.checkpoints, self.precision, self.ds_cfg, has_eval)

    def train(self, trainer: Any) -> None:
        """``trainer.train()``, from the resume point when there is one. A checkpoint that already reaches max_steps
        (a run killed before its export) is loaded and trained no further: its weights are the model."""
        if self.resume_from:
            self.log(f"{self.name}: resuming from step {self.start_step} ({self.resume_from})")
        trainer.add_callback(_StopAtEnd())
        try:
            trainer.train(resume_from_checkpoint=self.resume_from)
        except _AtEnd:
            self.log(f"{self.name}: checkpoint at step {self.start_step} already reaches max_steps: exporting it")

    def quiet(self, trainer: Any) -> Any:
        """Replace the Trainer's raw dict printing by one line per log on rank 0 (through ctx.log); step metrics to
        the stage's MLflow run, when one is active."""
        quiet_trainer_logs(trainer)
        trainer.add_callback(_LineLog(self))
        trainer.add_callback(tracking.hf_callback())
        return trainer

    def log(self, message: str) -> None:
        if self.main:
            self.ctx.log(message)

    def metrics(self, trainer: Any, n_train: int, n_eval: int) -> dict[str, Any]:
        return {
            "train_examples": n_train,
            "eval_examples": n_eval,
            "steps": trainer.state.global_step,
            "world_size": self.ctx.world,
            "zero_stage": self.cfg.zero_stage,
            "precision": self.precision,
            "mode": "lora" if self.cfg.lora is not None else "full",
            "train_loss": _final_loss(trainer.state.log_history),
            "resumed_from_step": self.start_step if self.resume_from else None,
            "data_sha256": data_fingerprints([*self.cfg.data, *self.cfg.eval_data]),
        }

    def save(self, trainer: Any, files: dict[str, Any], *, causal: bool = True) -> str:
        """Export the full model (LoRA merged, adapter under adapter/), its generation config (a causal LM: stops at
        <|im_end|> and EOS), tokenizer and ``files``; rank 0 writes."""
        self.export.save_weights(trainer, lora=self.cfg.lora is not None)
        if self.export.writes and causal:
            write_generation_config(self.export.dir, self.tok)
        self.export.finish(self.tok, files)
        return self.export.dir


class _Checkpointed(DecayGroups, CheckpointedTrainer):
    """The weight-decay groups of :class:`~pipeline.training.common.DecayGroups` (with and without offload alike);
    checkpoints through the run's CheckpointManager, without the model card TRL writes into ``output_dir`` (the
    checkpoint root, which holds only checkpoints) at every save."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        pass


class SFTTrainer(_Checkpointed, trl.SFTTrainer):
    """TRL's SFTTrainer, checkpointed."""


class DPOTrainer(_Checkpointed, trl.DPOTrainer):
    """TRL's DPOTrainer, checkpointed."""


class RewardTrainer(_Checkpointed, trl.RewardTrainer):
    """TRL's RewardTrainer, checkpointed."""


class _AtEnd(Exception):
    """Raised by :class:`_StopAtEnd`, caught by :meth:`PostTrainRun.train`."""


class _StopAtEnd(TrainerCallback):
    """Ends ``train()`` before a step that would go past max_steps. The Trainer resumed from a checkpoint at max_steps
    (its weights, optimizer and state loaded) runs one more step before it checks, when the checkpoint is not at the
    end of an epoch; an exception is the one way out of its loop before that step."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.max_steps and state.global_step >= state.max_steps:
            raise _AtEnd()


class _LineLog(TrainerCallback):
    def __init__(self, run: PostTrainRun):
        self.run = run

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not self.run.main or not logs:
            return
        parts = [f"{k.replace('learning_rate', 'lr')} {logs[k]:.4g}" for k in LOG_KEYS
                 if isinstance(logs.get(k), (int, float))]
        if parts:
            self.run.ctx.log(f"{self.run.name} step {state.global_step}: " + "  ".join(parts))


def write_generation_config(export: str, tok: Any) -> None:
    """generation_config.json that stops at <|im_end|> and EOS, pads with the pad token."""
    try:
        gc = GenerationConfig.from_pretrained(export)
    except OSError:
        gc = GenerationConfig()
    gc.eos_token_id = stop_token_ids(tok)
    gc.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        gc.bos_token_id = tok.bos_token_id
    gc.save_pretrained(export)


def _causal_lm(model_dir: str) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


# ------------------------------------------------------------------------------------- sft


def sft_trainer(cfg: Any, model: Any, tok: Any, train: list, held: list, args_kwargs: dict,
                checkpoints: CheckpointManager) -> SFTTrainer:
    """A TRL SFTTrainer on conversational examples with the loss on assistant tokens only."""
    # packing: transformers masks each packed example apart (masking_utils, TransformGetItemToIndex: torch >= 2.6)
    args = trl.SFTConfig(**args_kwargs, max_length=cfg.max_length, packing=cfg.packing, assistant_only_loss=True,
                         padding_free=False, eval_packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                      eval_dataset=datasets.Dataset.from_list(held) if held else None, processing_class=tok,
                      peft_config=lora_config(cfg, "CAUSAL_LM"), checkpoints=checkpoints)


def check_alignment(run: Any, train: list, limit: int = 256) -> int:
    """Warns (one line) when the chat template's training tokens are not what generation after the prompt produces
    (:func:`~pipeline.training.posttrain.templates.assistant_alignment`) on the first ``limit`` conversations;
    returns how many of them differ."""
    bad = [(i, why) for i, ex in enumerate(train[:limit])
           if (why := assistant_alignment(run.tok, ex["messages"], json.loads(ex["tools"]) if ex.get("tools") else None))]
    if bad:
        run.log(f"sft: warning: in {len(bad)} of {min(limit, len(train))} conversations the assistant tokens trained on "
                f"are not the tokens generation after the prompt produces (conversation {bad[0][0]}: {bad[0][1]}); "
                "retrain the tokenizer with a llama.cpp pre-tokenizer (pretokenizer: llama3) or fix chat_template")
    return len(bad)


def train_sft(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    skipped: Counter = Counter()
    train, held = load_train_eval(cfg, "sft", skipped)
    with PostTrainRun(cfg, ctx, out, "sft") as run:
        if skipped:
            run.log(f"sft: skipped {sum(skipped.values())} bad tool-use records: "
                    + ", ".join(f"{k} {v}" for k, v in skipped.most_common()))
        misaligned = check_alignment(run, train) if run.main else None
        kw = run.arguments(bool(held))
        model = _causal_lm(run.model_dir)
        run.log(f"sft: {len(train)} train / {len(held)} held-out conversations, {'LoRA' if cfg.lora else 'full'}, "
                f"world {ctx.world}, ZeRO {cfg.zero_stage}, {run.precision}")
        trainer = run.quiet(sft_trainer(cfg, model, run.tok, train, held, kw, run.checkpoints))
        eval_rows = [dict(r) for r in trainer.eval_dataset] if held else []
        measure = cfg.zero_stage != 3
        before = heldout_loss(trainer.model, eval_rows) if measure else None
        run.train(trainer)
        after = heldout_loss(trainer.model, eval_rows) if measure else None
        gens = generate_samples(trainer.model, run.tok, cfg.generation, synced=run.synced) if (run.main or run.synced) else []
        metrics = run.metrics(trainer, len(train), len(held))
        metrics.update(eval_loss_before=before, eval_loss_after=after, packing=cfg.packing, data_skipped=dict(skipped),
                       tool_conversations=sum(1 for e in train if e.get("tools")), misaligned_conversations=misaligned,
                       generations_stopped=sum(g["stopped"] for g in gens) if gens else None)
        if before is not None and after is not None:
            run.log(f"sft: held-out loss {before:.4f} -> {after:.4f}")
        run.save(trainer, {GENERATIONS_FILE: gens, METRICS_FILE: trainer.state.log_history})
        return metrics


# ------------------------------------------------------------------------------------- dpo


def _dpo_measure(run: PostTrainRun, model: Any, train: list, held: list) -> dict[str, list]:
    return {"eval": completion_logps(model, run.tok, held, run.cfg.max_length),
            "train": completion_logps(model, run.tok, train[:64], run.cfg.max_length)}


def train_dpo(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    train, held = load_train_eval(cfg, "preference")
    with PostTrainRun(cfg, ctx, out, "dpo") as run:
        args = trl.DPOConfig(**run.arguments(bool(held)), max_length=cfg.max_length, beta=cfg.beta,
                             loss_type=[cfg.loss_type])
        model = _causal_lm(run.model_dir)
        ref = None
        if cfg.lora is None:
            ref = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
            ref.requires_grad_(False).eval()
        run.log(f"dpo: {len(train)} train / {len(held)} held-out pairs, {'LoRA' if cfg.lora else 'full'}, "
                f"reference {'adapters disabled' if cfg.lora else 'frozen copy'}, beta {cfg.beta}")
        measure = cfg.zero_stage != 3
        before = _dpo_measure(run, model, train, held) if measure else None
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(train),
                             eval_dataset=datasets.Dataset.from_list(held) if held else None, processing_class=run.tok,
                             peft_config=lora_config(cfg, "CAUSAL_LM"), checkpoints=run.checkpoints)
        run.quiet(trainer)
        run.train(trainer)
        metrics = run.metrics(trainer, len(train), len(held))
        metrics.update(reference="adapters disabled" if cfg.lora else "frozen copy", beta=cfg.beta)
        if measure:
            after = _dpo_measure(run, trainer.model, train, held)
            for split in ("eval", "train"):
                acc_b, mar_b = pair_stats(before[split])  # type: ignore[index]
                acc_a, mar_a = pair_stats(after[split])
                # implicit reward r = beta * log(pi/pi_ref); the reference is the starting policy
                rewards = [(cfg.beta * (ca - cb), cfg.beta * (ra - rb))
                           for (cb, rb), (ca, ra) in zip(before[split], after[split])]  # type: ignore[index]
                r_acc, r_mar = pair_stats(rewards)
                metrics.update({f"{split}_logp_accuracy_before": acc_b, f"{split}_logp_accuracy_after": acc_a,
                                f"{split}_logp_margin_before": mar_b, f"{split}_logp_margin_after": mar_a,
                                f"{split}_reward_accuracy_before": 0.0 if rewards else None,
                                f"{split}_reward_margin_before": 0.0 if rewards else None,
                                f"{split}_reward_accuracy_after": r_acc, f"{split}_reward_margin_after": r_mar})
            run.log(f"dpo: held-out logp margin {metrics['eval_logp_margin_before']} -> {metrics['eval_logp_margin_after']}, "
                    f"reward accuracy {metrics['eval_reward_accuracy_after']}, margin {metrics['eval_reward_margin_after']}")
        gens = generate_samples(trainer.model, run.tok, cfg.generation, synced=run.synced) if (run.main or run.synced) else []
        run.save(trainer, {GENERATIONS_FILE: gens, METRICS_FILE: trainer.state.log_history})
        return metrics


# ---------------------------------------------------------------------------------- reward


def train_reward(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    train, held = load_train_eval(cfg, "preference")
    with PostTrainRun(cfg, ctx, out, "reward") as run:
        args = trl.RewardConfig(**run.arguments(bool(held)), max_length=cfg.max_length,
                                center_rewards_coefficient=cfg.center_rewards)
        transformers.set_seed(cfg.seed)  # the new score head is drawn from the seed: a rerun starts from the same one
        model = AutoModelForSequenceClassification.from_pretrained(run.model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = run.tok.pad_token_id
        model.config.use_cache = False
        run.log(f"reward: {len(train)} train / {len(held)} held-out pairs, {'LoRA' if cfg.lora else 'full'}")
        measure = cfg.zero_stage != 3
        ev_b = reward_scores(model, run.tok, held, cfg.max_length) if measure else []
        trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                                eval_dataset=datasets.Dataset.from_list(held) if held else None,
                                processing_class=run.tok, peft_config=lora_config(cfg, "SEQ_CLS"),
                                checkpoints=run.checkpoints)
        run.quiet(trainer)
        run.train(trainer)
        metrics = run.metrics(trainer, len(train), len(held))
        if measure:
            ev_a = reward_scores(trainer.model, run.tok, held, cfg.max_length)
            tr_a = reward_scores(trainer.model, run.tok, train[:64], cfg.max_length)
            (acc_b, mar_b), (acc_a, mar_a), (tacc, tmar) = pair_stats(ev_b), pair_stats(ev_a), pair_stats(tr_a)
            metrics.update(eval_accuracy_before=acc_b, eval_margin_before=mar_b, eval_accuracy_after=acc_a,
                           eval_margin_after=mar_a, train_accuracy_after=tacc, train_margin_after=tmar)
            run.log(f"reward: held-out accuracy {acc_b} -> {acc_a}, train accuracy {tacc}")
        run.save(trainer, {METRICS_FILE: trainer.state.log_history}, causal=False)
        return metrics
