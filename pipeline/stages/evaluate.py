"""evaluate: model folders (``models/pretrain``, ``models/sft``, ``models/dpo``, ...) + ``shards/`` +
``clean/`` -> ``eval/``: metrics per model and a side-by-side report.

For every model listed in the config (each with a label): perplexity on the validation shards;
tokens, perplexity and bits per byte on raw held-out text per language (the ``clean/`` documents
that pack routed to validation, and/or listed files); greedy and seeded sampled answers to a
prompt set; lm-evaluation-harness tasks (the shipped offline kk / ru / en multiple-choice set,
or standard task names on a cluster). Writes ``results.json``, ``report.md``, ``report.html``
(self-contained), plots (``*.png``) and per-model details under ``eval/<label>/``. Every input
is checked before a model is loaded: missing artifacts, a model whose tokenizer is not the one
the shards were packed with, unknown lm_eval task names, an empty prompt set. The work is done
by :func:`pipeline.evaluation.suite.evaluate`.

Manifest metrics (the contract MLflow tracking, ``register`` and ``promote`` read)::

    {"models": {"<label>": {"val_loss", "val_perplexity", "perplexity_<lang>", "bits_per_byte_<lang>",
                            "tokens_<lang>", "lm_eval_<task>_acc", "lm_eval_<task>_acc_norm", ...}},
     "report": "report.md", "model_count": N, "best_val_loss_model": "<label>"}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.stage import Stage, StageContext
from pipeline.storage import OutputDir

# files of the output that tracking uploads to MLflow as artefacts

DEFAULT_PROMPTS = [
    "Қазақстанның астанасы",
    "Сәлем! Қалың қалай?",
    "Москва — столица",
    "Расскажи коротко о себе.",
    "The capital of France is",
    "Write one sentence about the sea.",
]


class EvalModel(StrictModel):
    """One model to evaluate: an artifact holding an HF causal LM and its tokenizer."""

    path: str = Field(..., description="artifact under the run root, e.g. models/pretrain, models/sft, models/dpo")
    label: str | None = Field(None, description="its name in the report and the metrics (default: the last path part)")
    chat: bool | None = Field(None, description="prompts through the chat template; None: yes when the model came "
                                                "from sft or dpo (its manifest says) and the tokenizer has a template")

    @property
    def name(self) -> str:
        return self.label or self.path.rstrip("/").rsplit("/", 1)[-1]


class ShardPerplexity(StrictModel):
    """Token loss / perplexity on packed validation blocks."""

    artifact: str = Field("shards", description="the pack output to read")
    split: str = Field("val", description="split of the shards")
    max_blocks: int | None = Field(256, ge=1, description="blocks measured, spread evenly over the split (None: all)")


class HeldoutText(StrictModel):
    """Raw held-out text per language: perplexity and bits per byte under each model's own tokenizer."""

    from_run: bool = Field(True, description="use the clean/ documents that pack routed to validation (never trained on)")
    clean: str = Field("clean", description="the clean artifact read when from_run is true")
    languages: list[str] = Field(default_factory=lambda: ["kk", "ru", "en"], min_length=1)
    files: dict[str, list[str]] = Field(default_factory=dict, description="language -> .txt (blank-line separated "
                                                                          "documents) or .jsonl (text field) files")
    max_documents: int = Field(100, ge=1, description="documents per language (from the run and from files each)")


class PromptGeneration(StrictModel):
    """Answers to a prompt set, greedy and sampled with a fixed seed, side by side across models."""

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    prompts_file: str | None = Field(None, description=".txt (one prompt per line) or .jsonl (a prompt field) "
                                                       "file; its prompts come after `prompts`")
    system: str | None = Field(None, description="system message for chat-template prompts")
    max_new_tokens: int = Field(48, ge=1, le=4096)
    greedy: bool = True
    sampled: bool = True
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = Field(0, description="sampling seed (prompt i uses seed + i, the same for every model)")

    @model_validator(mode="after")
    def _check(self) -> "PromptGeneration":
        if not self.prompts and not self.prompts_file:
            raise ValueError("the prompt set is empty: list generation.prompts, give generation.prompts_file, "
                             "or set `generation: null` to skip generations")
        if not (self.greedy or self.sampled):
            raise ValueError("generation.greedy and generation.sampled are both false: set `generation: null` instead")
        return self


class LMEvalSettings(StrictModel):
    """lm-evaluation-harness tasks run on each model (HFLM, the configured device)."""

    tasks: list[str] = Field(default_factory=lambda: ["llmpipe_mc"], min_length=1,
                             description="task or group names: the shipped llmpipe_mc (llmpipe_mc_kk/_ru/_en) or "
                                         "lm_eval's standard ones (hellaswag, arc_easy, ...)")
    include_paths: list[str] = Field(default_factory=list, description="extra folders of task YAMLs")
    limit: float | None = Field(None, gt=0, description="documents per task: N (>= 1) or a fraction (< 1); None: all")
    num_fewshot: int | None = Field(None, ge=0, description="None: each task's own default")
    batch_size: int = Field(8, ge=1)
    chat: bool = Field(False, description="render task prompts with the chat template (apply_chat_template)")


class ToolUseEval(StrictModel):
    """Function calling on held-out tool-use conversations (chat models only): valid calls, right name, right
    arguments, right abstention, per language (pipeline/evaluation/tool_use.py)."""

    files: list[str] = Field(..., min_length=1, description="tool-use conversations (llmpipe:tools_eval: the shipped kk/ru/en set): chat records with tools (or "
                                                            "xlam / glaive / hermes records), with a lang field")
    max_items: int | None = Field(None, ge=1, description="conversations per file (None: all)")
    max_new_tokens: int = Field(96, ge=8, le=4096, description="room for the answer and its calls")


class ContinuationTask(StrictModel):
    """A generated lm-eval task per language from the run's validation documents (never trained on): a passage's
    opening and its true next words among endings from other documents (pipeline/evaluation/continuation.py)."""

    languages: list[str] = Field(default_factory=lambda: ["kk", "ru", "en"], min_length=1)
    from_run: bool = Field(True, description="use the clean/ documents that pack routed to validation")
    files: dict[str, list[str]] = Field(default_factory=dict, description="language -> held-out .txt (blank-line "
                                                                          "separated documents) or .jsonl files, "
                                                                          "never trained on")
    items_per_language: int = Field(600, ge=10, description="at most this many items per language (500+ gives a 95% "
                                                            "interval of about +-4 points)")
    max_documents: int = Field(5000, ge=4, description="validation documents read per language")
    context_chars: int = Field(240, ge=20, description="length of the opening, cut at a word boundary")
    continuation_chars: int = Field(120, ge=10, description="length of each ending, cut at a word boundary")
    choices: int = Field(4, ge=2, le=10)
    seed: int = 0


class EvaluateConfig(StrictModel):
    models: list[EvalModel] = Field(..., min_length=1, description="the models to compare, in report column order")
    perplexity: ShardPerplexity | None = Field(default_factory=ShardPerplexity, description="null: skip")
    heldout: HeldoutText | None = Field(default_factory=HeldoutText, description="null: skip")
    generation: PromptGeneration | None = Field(default_factory=PromptGeneration, description="null: skip")
    lm_eval: LMEvalSettings | None = Field(default_factory=LMEvalSettings, description="null: skip")
    tool_use: ToolUseEval | None = Field(None, description="function-calling evaluation; null: skip")
    continuation: ContinuationTask | None = Field(None, description="generated continuation-choice task per language, "
                                                                    "run with lm_eval's settings; null: skip")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass for perplexity")
    max_length: int | None = Field(1024, ge=16, description="context of the raw-text windows (capped by the model's "
                                                            "positions; None: the model's)")
    stride: int | None = Field(None, ge=1, description="how far the raw-text window advances over a document "
                                                       "longer than max_length: each window scores only its new "
                                                       "ids, each with at least max_length - stride ids of context "
                                                       "(the first window: what precedes them). None: max_length // 2; "
                                                       "max_length - 1 is the old one-token overlap (least context, "
                                                       "fewest forward passes); capped at max_length - 1")
    device: str = Field("auto", description="auto (cuda when visible), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on a GPU, else fp32")
    seed: int = 0
    plots: bool = True

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        labels = [m.name for m in self.models]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"model labels must be unique; {', '.join(dup)} appear more than once (set `label`)")
        bad = [x for x in labels if not x or "/" in x or x.startswith(".")]
        if bad:
            raise ValueError(f"model label(s) {bad} cannot be folder names under eval/")
        if self.heldout is not None and not self.heldout.from_run and not self.heldout.files:
            raise ValueError("heldout.from_run is false and heldout.files is empty: nothing to measure "
                             "(or set `heldout: null`)")
        if self.stride is not None and self.max_length is not None and self.stride >= self.max_length:
            raise ValueError(f"stride {self.stride} must be below max_length {self.max_length} (max_length - 1 "
                             "is the one-token overlap): a window must keep at least one id of context")
        if self.continuation is not None and not self.continuation.from_run and not self.continuation.files:
            raise ValueError("continuation.from_run is false and continuation.files is empty: no documents to build "
                             "items from")
        if self.continuation is not None and self.lm_eval is None:
            raise ValueError("continuation runs as lm-eval tasks: give lm_eval settings (e.g. lm_eval: {tasks: "
                             "[llmpipe_mc]}) or set continuation: null")
        if not any((self.perplexity, self.heldout, self.generation, self.lm_eval, self.tool_use)):
            raise ValueError("perplexity, heldout, generation, lm_eval and tool_use are all null: nothing to evaluate")
        return self


class EvaluateStage(Stage):
    name = "evaluate"
    config = EvaluateConfig
    OUTPUT = "eval"
    INPUTS = ("models/pretrain", "shards", "clean")  # the default; `inputs(cfg)` follows the config
    ARTIFACTS = ("report.md", "report.html", "results.json", "*.png")  # report files tracking logs to MLflow

    def inputs(self, cfg: EvaluateConfig) -> list[str]:
        """The model artifacts, the shards (validation perplexity, and which documents were held out) and clean/."""
        names: list[str] = [m.path for m in cfg.models]
        if cfg.perplexity is not None:
            names.append(cfg.perplexity.artifact)
        if (cfg.heldout is not None and cfg.heldout.from_run) or (cfg.continuation is not None
                                                                   and cfg.continuation.from_run):
            clean = cfg.heldout.clean if cfg.heldout is not None else "clean"
            names += ["shards" if cfg.perplexity is None else cfg.perplexity.artifact, clean]
        return list(dict.fromkeys(names))

    def run(self, cfg: EvaluateConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        from pipeline.evaluation.suite import evaluate

        return evaluate(cfg, ctx, out)

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = []
        for label, per in (m.get("models") or {}).items():
            parts = []
            if per.get("val_perplexity") is not None:
                parts.append(f"val ppl {per['val_perplexity']:,.4g}")
            bpb = {k[len("bits_per_byte_"):]: v for k, v in per.items() if k.startswith("bits_per_byte_")}
            if bpb:
                parts.append("bits/byte " + " ".join(f"{lang} {v:.3f}" for lang, v in bpb.items()))
            accs = {k[len("lm_eval_"):-len("_acc")]: v for k, v in per.items() if k.startswith("lm_eval_") and k.endswith("_acc")}
            if accs:
                top = min(accs, key=len)  # the group when there is one
                parts.append(f"{top} acc {accs[top]:.3f}")
            if per.get("tool_arguments") is not None:
                parts.append(f"tool calls: valid {per['tool_valid']:.2f}, args {per['tool_arguments']:.2f}, "
                             f"abstain {per['tool_abstain'] if per.get('tool_abstain') is not None else float('nan'):.2f}")
            rows.append((label, ", ".join(parts) or "-"))
        if m.get("best_val_loss_model"):
            rows.append(("lowest val loss", m["best_val_loss_model"]))
        rows.append(("report", f"eval/{m.get('report', 'report.md')} (+ report.html)"))
        return rows


STAGE = EvaluateStage()
