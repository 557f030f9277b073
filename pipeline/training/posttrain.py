"""Post-training library for the sft, dpo and reward stages (TRL trainers + our data, checks and export).

Pieces, top to bottom:

* data: read records from .jsonl/.json/.parquet files, folders of them or Hugging Face datasets,
  each with where it came from (``file:line``), and normalise them -- Alpaca and chat records to
  a list of messages, preference records to conversational ``prompt`` / ``chosen`` / ``rejected``;
  a missing or malformed field is an :class:`InputError` naming the file and line;
* the model folder: tokenizer and chat template checks (ChatML gets ``{% generation %}`` markers
  so that TRL's ``assistant_only_loss`` masks everything but the assistant turns), max length vs
  the model's positions -- all before any weights are loaded;
* measurements that do not depend on a trainer: held-out token loss, completion log-probs of
  preference pairs, reward-model scores, greedy generations that stop at ``<|im_end|>``/EOS;
* :func:`train_sft`, :func:`train_dpo`, :func:`train_reward`: one stage on one rank (rank 0 gets
  the output folder, the others ``None``), distributed the same way as pretrain.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.errors import ConfigError, InputError, PipelineError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GENERATIONS_FILE = "generations.json"
METRICS_FILE = "train_metrics.jsonl"

# ChatML exactly as pipeline.data.tokenization.chat_template renders it, with the assistant content and
# its <|im_end|> inside {% generation %} so that the assistant mask covers what the model must say.
CHATML_TRAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '" + IM_START + "assistant\\n' }}"
    "{% generation %}{{ message['content'] + '" + IM_END + "' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------- data


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(DATA_SUFFIXES))
        if not found:
            raise InputError(f"data folder {path} holds no {'/'.join(DATA_SUFFIXES)} files")
        return found
    return [path]


def _is_hf_disk_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_records(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of a data source; ``where`` is ``file:line`` or ``file[row]``."""
    if _is_hf_disk_dataset(path):
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"dataset {path} has no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        for i, rec in enumerate(ds):
            yield f"{path}[{split}][{i}]", rec
        return
    if not os.path.exists(path):
        if "/" in path and not path.startswith((".", "/")) and path.count("/") == 1:
            yield from _hub_records(path, split)
            return
        raise InputError(f"data file {path} does not exist")
    for file in _files(path):
        if file.endswith(".jsonl"):
            with open(file, encoding="utf-8") as fh:
                for n, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{file}:{n}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{file}:{n}: not valid JSON: {exc.msg}") from None
        elif file.endswith(".json"):
            try:
                data = json.loads(Path(file).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"{file}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise InputError(f"{file}: expected a JSON list of records (or {{\"data\": [...]}})")
            for i, rec in enumerate(data):
                yield f"{file}[{i}]", rec
        elif file.endswith(".parquet"):
            import pyarrow.parquet as pq

            for i, rec in enumerate(pq.read_table(file).to_pylist()):
                yield f"{file}[row {i}]", rec
        else:
            raise InputError(f"data file {file}: unsupported type (use {', '.join(DATA_SUFFIXES)} or a datasets folder)")


def _hub_records(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, ...
        raise InputError(f"data {name!r} is neither a local path nor a loadable Hugging Face dataset: {exc}") from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}][{i}]", rec


def detect_format(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "chat"
    if "chosen" in rec or "rejected" in rec:
        return "preference"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    return None


def _text(rec: dict, key: str, where: str, *, required: bool = True) -> str:
    value = rec.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise InputError(f"{where}: record has no {key!r} (fields: {', '.join(map(str, rec)) or 'none'})")
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def check_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"{where}: messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{where}: the conversation has no assistant turn to learn from")
    return out


def alpaca_to_messages(rec: dict, where: str) -> list[dict[str, str]]:
    instruction = _text(rec, "instruction", where)
    output = _text(rec, "output", where)
    extra = _text(rec, "input", where, required=False)
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    msgs = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) and rec["system"] else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def to_sft_example(rec: Any, where: str, fmt: str = "auto") -> dict[str, Any]:
    """A conversational SFT example ``{"messages": [...]}`` from an Alpaca or chat record."""
    kind = detect_format(rec) if fmt == "auto" else fmt
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if kind == "chat":
        if "messages" not in rec:
            raise InputError(f"{where}: chat record has no 'messages' (fields: {', '.join(rec) or 'none'})")
        return {"messages": check_messages(rec["messages"], where)}
    if kind == "alpaca":
        return {"messages": alpaca_to_messages(rec, where)}
    raise InputError(f"{where}: not an instruction record: expected 'messages' (chat) or 'instruction'/'input'/'output' "
                     f"(alpaca); fields: {', '.join(rec) or 'none'}")


def _turns(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: {key!r} is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    msgs = check_messages(value, f"{where} ({key})", need_assistant=True)
    if msgs[-1]["role"] != "assistant":
        raise InputError(f"{where}: {key!r} must end with an assistant message")
    return msgs


def to_preference_example(rec: Any, where: str) -> dict[str, Any]:
    """Conversational ``{"prompt": [...], "chosen": [...], "rejected": [...]}``."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if rec.get(k) in (None, "", [])]
    if missing:
        raise InputError(f"{where}: preference record has no {', '.join(map(repr, missing))} "
                         f"(needs prompt, chosen, rejected; fields: {', '.join(rec) or 'none'})")
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = check_messages(prompt, f"{where} (prompt)", need_assistant=False)
        if prompt_msgs[-1]["role"] == "assistant":
            raise InputError(f"{where}: the prompt must not end with an assistant message")
    return {"prompt": prompt_msgs, "chosen": _turns(rec["chosen"], where, "chosen"),
            "rejected": _turns(rec["rejected"], where, "rejected")}


def load_examples(sources: Iterable[Any], kind: str) -> list[dict[str, Any]]:
    """All examples of ``sources`` (config ``DataSource`` objects), ``kind`` = ``sft`` or ``preference``."""
    out: list[dict[str, Any]] = []
    for src in sources:
        n = 0
        for where, rec in read_records(src.path, src.split):
            if src.max_examples is not None and n >= src.max_examples:
                break
            if kind == "sft":
                if src.format == "preference":
                    raise ConfigError(f"data {src.path}: format 'preference' is for dpo/reward, not sft")
                out.append(to_sft_example(rec, where, src.format))
            else:
                if src.format in ("alpaca", "chat"):
                    raise ConfigError(f"data {src.path}: format {src.format!r} has no preference pairs")
                out.append(to_preference_example(rec, where))
            n += 1
        if n == 0:
            raise InputError(f"data {src.path} holds no records")
    if not out:
        raise InputError("the training data is empty")
    return out


def split_examples(examples: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, then the last ``fraction`` (at least 1 when fraction > 0)."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise InputError(f"only {len(examples)} example(s): too few to hold out {fraction:.0%} and still train")
    held = set(order[-n_eval:])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def data_fingerprints(sources: Iterable[Any]) -> dict[str, str | None]:
    """sha256 of every local data file (lineage in the metrics; None for a hub dataset)."""
    import fsspec

    from pipeline.storage import sha256_file

    fs = fsspec.filesystem("file")
    out: dict[str, str | None] = {}
    for src in sources:
        if not os.path.exists(src.path):
            out[src.path] = None
            continue
        files = sorted(f for f in glob.glob(os.path.join(src.path, "**", "*"), recursive=True) if os.path.isfile(f)) \
            if os.path.isdir(src.path) else [src.path]
        for f in files:
            out[f] = sha256_file(fs, f)
    return out


def load_train_eval(cfg: Any, kind: str) -> tuple[list, list]:
    examples = load_examples(cfg.data, kind)
    if cfg.eval_data:
        return examples, load_examples(cfg.eval_data, kind)
    return split_examples(examples, cfg.eval_fraction, cfg.seed)


# --------------------------------------------------------------------------- model folder checks


def is_chatml(template: str | None) -> bool:
    return bool(template) and IM_START in template and IM_END in template  # type: ignore[operator]


def prepare_tokenizer(tok_dir: str, chat_template: str = "auto") -> Any:
    """The tokenizer with a chat template that marks assistant tokens; InputError when it cannot have one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = tok.get_vocab()
    has_chat_tokens = IM_START in vocab and IM_END in vocab
    if chat_template != "auto":
        tok.chat_template = chat_template
    elif tok.chat_template is None or is_chatml(tok.chat_template):
        if not has_chat_tokens:
            raise InputError(
                f"the tokenizer in {tok_dir} has no chat template and no {IM_START} / {IM_END} tokens: train the tokenizer "
                "with the chat tokens (tokenizer stage, special_tokens.chat) or set chat_template in the config")
        tok.chat_template = CHATML_TRAIN_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def stop_token_ids(tok: Any) -> list[int]:
    """Token ids that end an assistant turn: <|im_end|> (when the tokenizer has it) and EOS."""
    ids = []
    vocab = tok.get_vocab()
    if IM_END in vocab:
        ids.append(vocab[IM_END])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def model_folder(ctx: Any, cfg: Any, tmp: str) -> tuple[str, str]:
    """(model dir, tokenizer dir) as local folders; InputError when the tokenizer is missing (the model itself is
    checked by :func:`check_max_length`)."""
    from pipeline.training.pretrain import has_tokenizer, local_copy

    model_dir = local_copy(ctx.inputs[cfg.model], tmp)
    if has_tokenizer(model_dir):
        return model_dir, model_dir
    if cfg.tokenizer:
        tok_dir = local_copy(ctx.inputs[cfg.tokenizer], tmp)
        if has_tokenizer(tok_dir):
            return model_dir, tok_dir
    raise InputError(f"{cfg.model}/ has no tokenizer (tokenizer.json / tokenizer_config.json) and no tokenizer "
                     "artifact is configured: set `tokenizer: tokenizer` or save the tokenizer with the model")


def check_max_length(cfg: Any, model_dir: str) -> Any:
    """The model's config (a causal LM, checked without loading weights) against max_length."""
    from pipeline.models.checkpoint import causal_lm_config

    mc = causal_lm_config(model_dir, f"{cfg.model}/")
    limit = getattr(mc, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise InputError(f"max_length {cfg.max_length} is beyond the model's max_position_embeddings {limit} "
                         f"({cfg.model}/config.json): lower max_length")
    return mc


# ----------------------------------------------------------------------------- measurements


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def heldout_loss(model: Any, rows: list[dict[str, Any]], batch: int = 8) -> float | None:
    """Mean token cross-entropy over the label tokens (!= -100) of tokenized rows (input_ids, labels)."""
    import torch

    if not rows:
        return None
    was = model.training
    model.eval()
    total, count = 0.0, 0
    dev = _device(model)
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                chunk = rows[i:i + batch]
                n = max(len(r["input_ids"]) for r in chunk)
                ids = torch.zeros((len(chunk), n), dtype=torch.long)
                labels = torch.full((len(chunk), n), -100, dtype=torch.long)
                mask = torch.zeros((len(chunk), n), dtype=torch.long)
                for j, r in enumerate(chunk):
                    k = len(r["input_ids"])
                    ids[j, :k] = torch.tensor(r["input_ids"])
                    labels[j, :k] = torch.tensor(r["labels"])
                    mask[j, :k] = 1
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
                tgt = labels[:, 1:].to(dev)
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=-100, reduction="sum")
                total += float(lp)
                count += int((tgt != -100).sum())
    finally:
        model.train(was)
    return total / count if count else None


def render_pair(tok: Any, ex: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt text ending with the assistant header, chosen text, rejected text) through the chat template."""
    prompt = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
    full_c = tok.apply_chat_template(ex["prompt"] + ex["chosen"], tokenize=False)
    full_r = tok.apply_chat_template(ex["prompt"] + ex["rejected"], tokenize=False)
    if not (full_c.startswith(prompt) and full_r.startswith(prompt)):
        raise InputError("the chat template does not render the prompt as a prefix of the full conversation")
    return prompt, full_c[len(prompt):], full_r[len(prompt):]


@contextlib.contextmanager
def _evaluating(model: Any) -> Iterator[None]:
    """Eval mode without gradients, restoring the model's training flag afterwards."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def completion_logps(model: Any, tok: Any, examples: list[dict[str, Any]], max_length: int) -> list[tuple[float, float]]:
    """Summed log-probability of the chosen and of the rejected completion given the prompt, per pair."""
    import torch

    out = []
    dev = _device(model)
    with _evaluating(model):
        for ex in examples:
            prompt, chosen, rejected = render_pair(tok, ex)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            pair = []
            for completion in (chosen, rejected):
                c_ids = tok(completion, add_special_tokens=False)["input_ids"]
                ids = (p_ids + c_ids)[:max_length]
                n_p = min(len(p_ids), len(ids) - 1)
                x = torch.tensor([ids], device=dev)
                logits = model(input_ids=x).logits.float()[0, :-1]
                lp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
                pair.append(float(lp[n_p - 1:].sum()))
            out.append((pair[0], pair[1]))
    return out


def reward_scores(model: Any, tok: Any, examples: list[dict[str, Any]], max_length: int) -> list[tuple[float, float]]:
    """Scalar rewards (chosen, rejected) of a sequence-classification model, per pair."""
    out = []
    dev = _device(model)
    with _evaluating(model):
        for ex in examples:
            pair = []
            for key in ("chosen", "rejected"):
                text = tok.apply_chat_template(ex["prompt"] + ex[key], tokenize=False)
                ids = tok(text, add_special_tokens=False, truncation=True, max_length=max_length, return_tensors="pt")
                pair.append(float(model(input_ids=ids["input_ids"].to(dev)).logits[0, 0]))
            out.append((pair[0], pair[1]))
    return out


def pair_stats(pairs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """(accuracy: share with chosen > rejected, mean margin chosen - rejected)."""
    if not pairs:
        return None, None
    return (sum(c > r for c, r in pairs) / len(pairs), sum(c - r for c, r in pairs) / len(pairs))


def generate_samples(model: Any, tok: Any, gen: Any, *, synced: bool = False) -> list[dict[str, Any]]:
    """Greedy answers to ``gen.prompts`` rendered with the chat template; stops at <|im_end|> / EOS."""
    import torch

    records = []
    was = model.training
    model.eval()
    dev = _device(model)
    stops = stop_token_ids(tok)
    try:
        for prompt in gen.prompts:
            msgs = ([{"role": "system", "content": gen.system}] if gen.system else []) + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            enc = tok(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                                     max_new_tokens=gen.max_new_tokens, do_sample=False, eos_token_id=stops,
                                     pad_token_id=tok.pad_token_id, synced_gpus=synced)
            new = ids[0, enc["input_ids"].shape[1]:].tolist()
            stopped = bool(new) and new[-1] in stops
            records.append({"prompt": prompt, "rendered": text, "completion": tok.decode(new, skip_special_tokens=True),
                            "stopped": stopped, "new_tokens": len(new)})
    finally:
        model.train(was)
    return records


# ------------------------------------------------------------------------------- training glue


def _dist_setup(cfg: Any, ds_cfg: dict | None) -> None:
    import torch

    if ds_cfg is not None and "LOCAL_RANK" not in os.environ:
        from pipeline.training.launcher import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    if ds_cfg is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def trainer_kwargs(cfg: Any, ctx: Any, output_dir: str, precision: str, ds_cfg: dict | None, has_eval: bool) -> dict:
    """TrainingArguments fields shared by the three TRL configs."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.log_every,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="steps" if (cfg.eval_every and has_eval) else "no",
        eval_steps=cfg.eval_every or None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        deepspeed=ds_cfg,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=not ctx.progress,
        ddp_backend="gloo" if (not cuda and "LOCAL_RANK" in os.environ) else None,
        use_cpu=not cuda,
        save_safetensors=True,
        dataset_num_proc=None,
    )


def lora_config(cfg: Any, task_type: str) -> Any:
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, task_type=task_type,
                      target_modules=lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules))


def _quiet() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"trl.*")


def _final_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return float(losses[-1]) if losses else None


class _Stage:
    """What the three trainers share around the TRL trainer: folders, checks, distributed setup, export."""

    def __init__(self, cfg: Any, ctx: Any, out: Any, name: str):
        import torch

        from pipeline.training.pretrain import deepspeed_dict, resolve_precision

        _quiet()
        self.cfg, self.ctx, self.out, self.name = cfg, ctx, out, name
        self.main = ctx.rank == 0
        self.tmp = tempfile.mkdtemp(prefix=f"llmpipe-{name}-r{ctx.rank}-")
        self.cuda = torch.cuda.is_available()
        self.precision = resolve_precision(cfg.precision)
        self.ds_cfg = deepspeed_dict(cfg)
        # -- every check before any weights are loaded
        self.model_dir, self.tok_dir = model_folder(ctx, cfg, self.tmp)
        self.model_config = check_max_length(cfg, self.model_dir)
        self.tok = prepare_tokenizer(self.tok_dir, cfg.chat_template)
        if len(self.tok) > self.model_config.vocab_size:
            raise InputError(f"the tokenizer has {len(self.tok)} tokens but the model's vocab_size is "
                             f"{self.model_config.vocab_size}")
        self.synced = cfg.zero_stage == 3 and ctx.world > 1
        self.log_records: list[dict[str, Any]] = []

    def start(self) -> None:
        _dist_setup(self.cfg, self.ds_cfg)

    def export_dir(self) -> str:
        if self.out is not None and self.out.storage.is_local:
            return self.out.path()
        return os.path.join(self.tmp, "export")

    def save(self, trainer: Any, extra_files: dict[str, Any], *, causal: bool = True) -> str:
        """Write the full model (LoRA merged, adapter under adapter/), tokenizer and reports; rank 0 writes."""
        from pipeline.training.pretrain import barrier

        export = self.export_dir()
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.cfg.lora is not None:
            if self.main:
                model.save_pretrained(os.path.join(export, "adapter"))
                merged = model.merge_and_unload()
                merged.save_pretrained(export, safe_serialization=True)
                model = merged
        else:
            trainer.save_model(export)  # collective under ZeRO-3; only rank 0 writes
        barrier()
        if self.main and self.out is not None:
            if causal:
                self._generation_config(export)
            for junk in ("training_args.bin",):
                try:
                    os.remove(os.path.join(export, junk))
                except OSError:
                    pass
            self.tok.save_pretrained(export)
            for fname, payload in extra_files.items():
                with open(os.path.join(export, fname), "w", encoding="utf-8") as fh:
                    if fname.endswith(".jsonl"):
                        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in payload)
                    else:
                        json.dump(payload, fh, indent=2, ensure_ascii=False)
            if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(export)):
                raise PipelineError(f"no model weights were exported to {export}")
            if not self.out.storage.is_local:
                self.out.put_local(export)
        barrier()
        return export

    def _generation_config(self, export: str) -> None:
        """generation_config.json that stops at <|im_end|> and EOS, pads with the pad token."""
        from transformers import GenerationConfig

        try:
            gc = GenerationConfig.from_pretrained(export)
        except OSError:
            gc = GenerationConfig()
        gc.eos_token_id = stop_token_ids(self.tok)
        gc.pad_token_id = self.tok.pad_token_id
        if self.tok.bos_token_id is not None:
            gc.bos_token_id = self.tok.bos_token_id
        gc.save_pretrained(export)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _metrics_common(st: _Stage, trainer: Any, n_train: int, n_eval: int) -> dict[str, Any]:
    return {
        "train_examples": n_train,
        "eval_examples": n_eval,
        "steps": trainer.state.global_step,
        "world_size": st.ctx.world,
        "zero_stage": st.cfg.zero_stage,
        "precision": st.precision,
        "mode": "lora" if st.cfg.lora is not None else "full",
        "train_loss": _final_loss(trainer.state.log_history),
        "data_sha256": data_fingerprints([*st.cfg.data, *st.cfg.eval_data]),
    }


LOG_KEYS = ("loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins", "accuracy", "margin",
            "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_accuracy")


def _quiet_logs(st: "_Stage", trainer: Any) -> Any:
    """Replace the Trainer's raw dict printing by one line per log on rank 0 (through ctx.log)."""
    from transformers import TrainerCallback

    class LineLog(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not st.main or not logs:
                return
            parts = [f"{k.replace('learning_rate', 'lr')} {logs[k]:.4g}" for k in LOG_KEYS
                     if isinstance(logs.get(k), (int, float))]
            if parts:
                st.ctx.log(f"{st.name} step {state.global_step}: " + "  ".join(parts))

    from pipeline import tracking
    from pipeline.training.pretrain import quiet_trainer_logs

    quiet_trainer_logs(trainer)
    trainer.add_callback(LineLog())
    trainer.add_callback(tracking.hf_callback())  # step metrics to the stage's MLflow run, when one is active
    return trainer


def _log(st: _Stage, message: str) -> None:
    if st.main:
        st.ctx.log(message)


# ------------------------------------------------------------------------------------- sft


def sft_trainer(cfg: Any, model: Any, tok: Any, train: list, held: list, args_kwargs: dict) -> Any:
    """A TRL SFTTrainer on conversational examples with the loss on assistant tokens only."""
    import datasets
    import trl

    args = trl.SFTConfig(**args_kwargs, max_length=cfg.max_length, packing=cfg.packing, assistant_only_loss=True,
                         padding_free=False, eval_packing=False)
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                          eval_dataset=datasets.Dataset.from_list(held) if held else None, processing_class=tok,
                          peft_config=lora_config(cfg, "CAUSAL_LM"))


def train_sft(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    train, held = load_train_eval(cfg, "sft")
    st = _Stage(cfg, ctx, out, "sft")
    try:
        st.start()
        kw = trainer_kwargs(cfg, ctx, os.path.join(st.tmp, "trainer"), st.precision, st.ds_cfg, bool(held))
        import trl  # noqa: F401  (TrainingArguments before from_pretrained: ZeRO-3 partitions on load)

        model = AutoModelForCausalLM.from_pretrained(st.model_dir, dtype=torch.float32)
        model.config.use_cache = False
        _log(st, f"sft: {len(train)} train / {len(held)} held-out conversations, {'LoRA' if cfg.lora else 'full'}, "
                 f"world {ctx.world}, ZeRO {cfg.zero_stage}, {st.precision}")
        trainer = _quiet_logs(st, sft_trainer(cfg, model, st.tok, train, held, kw))
        eval_rows = [dict(r) for r in trainer.eval_dataset] if held else []
        measure = cfg.zero_stage != 3
        before = heldout_loss(trainer.model, eval_rows) if measure else None
        trainer.train()
        after = heldout_loss(trainer.model, eval_rows) if measure else None
        gens = generate_samples(trainer.model, st.tok, cfg.generation, synced=st.synced) if (st.main or st.synced) else []
        metrics = _metrics_common(st, trainer, len(train), len(held))
        metrics.update(eval_loss_before=before, eval_loss_after=after, packing=cfg.packing,
                       generations_stopped=sum(g["stopped"] for g in gens) if gens else None)
        if before is not None and after is not None:
            _log(st, f"sft: held-out loss {before:.4f} -> {after:.4f}")
        st.save(trainer, {GENERATIONS_FILE: gens, METRICS_FILE: trainer.state.log_history})
        return metrics
    finally:
        st.close()


# ------------------------------------------------------------------------------------- dpo


def _dpo_measure(st: _Stage, model: Any, train: list, held: list) -> dict[str, list]:
    return {"eval": completion_logps(model, st.tok, held, st.cfg.max_length),
            "train": completion_logps(model, st.tok, train[:64], st.cfg.max_length)}


def train_dpo(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM

    train, held = load_train_eval(cfg, "preference")
    st = _Stage(cfg, ctx, out, "dpo")
    try:
        st.start()
        kw = trainer_kwargs(cfg, ctx, os.path.join(st.tmp, "trainer"), st.precision, st.ds_cfg, bool(held))
        args = trl.DPOConfig(**kw, max_length=cfg.max_length, beta=cfg.beta, loss_type=[cfg.loss_type])
        model = AutoModelForCausalLM.from_pretrained(st.model_dir, dtype=torch.float32)
        model.config.use_cache = False
        ref = None
        if cfg.lora is None:
            ref = AutoModelForCausalLM.from_pretrained(st.model_dir, dtype=torch.float32)
            ref.requires_grad_(False).eval()
        _log(st, f"dpo: {len(train)} train / {len(held)} held-out pairs, {'LoRA' if cfg.lora else 'full'}, "
                 f"reference {'adapters disabled' if cfg.lora else 'frozen copy'}, beta {cfg.beta}")
        measure = cfg.zero_stage != 3
        before = _dpo_measure(st, model, train, held) if measure else None
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(train),
                                 eval_dataset=datasets.Dataset.from_list(held) if held else None, processing_class=st.tok,
                                 peft_config=lora_config(cfg, "CAUSAL_LM"))
        _quiet_logs(st, trainer)
        trainer.train()
        metrics = _metrics_common(st, trainer, len(train), len(held))
        metrics.update(reference="adapters disabled" if cfg.lora else "frozen copy", beta=cfg.beta)
        if measure:
            after = _dpo_measure(st, trainer.model, train, held)
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
            _log(st, f"dpo: held-out logp margin {metrics['eval_logp_margin_before']} -> {metrics['eval_logp_margin_after']}, "
                     f"reward accuracy {metrics['eval_reward_accuracy_after']}, margin {metrics['eval_reward_margin_after']}")
        gens = generate_samples(trainer.model, st.tok, cfg.generation, synced=st.synced) if (st.main or st.synced) else []
        st.save(trainer, {GENERATIONS_FILE: gens, METRICS_FILE: trainer.state.log_history})
        return metrics
    finally:
        st.close()


# ---------------------------------------------------------------------------------- reward


def train_reward(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForSequenceClassification

    train, held = load_train_eval(cfg, "preference")
    st = _Stage(cfg, ctx, out, "reward")
    try:
        st.start()
        kw = trainer_kwargs(cfg, ctx, os.path.join(st.tmp, "trainer"), st.precision, st.ds_cfg, bool(held))
        args = trl.RewardConfig(**kw, max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards)
        model = AutoModelForSequenceClassification.from_pretrained(st.model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = st.tok.pad_token_id
        model.config.use_cache = False
        _log(st, f"reward: {len(train)} train / {len(held)} held-out pairs, {'LoRA' if cfg.lora else 'full'}")
        measure = cfg.zero_stage != 3
        ev_b = reward_scores(model, st.tok, held, cfg.max_length) if measure else []
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                                    eval_dataset=datasets.Dataset.from_list(held) if held else None,
                                    processing_class=st.tok, peft_config=lora_config(cfg, "SEQ_CLS"))
        _quiet_logs(st, trainer)
        trainer.train()
        metrics = _metrics_common(st, trainer, len(train), len(held))
        if measure:
            ev_a = reward_scores(trainer.model, st.tok, held, cfg.max_length)
            tr_a = reward_scores(trainer.model, st.tok, train[:64], cfg.max_length)
            (acc_b, mar_b), (acc_a, mar_a), (tacc, tmar) = pair_stats(ev_b), pair_stats(ev_a), pair_stats(tr_a)
            metrics.update(eval_accuracy_before=acc_b, eval_margin_before=mar_b, eval_accuracy_after=acc_a,
                           eval_margin_after=mar_a, train_accuracy_after=tacc, train_margin_after=tmar)
            _log(st, f"reward: held-out accuracy {acc_b} -> {acc_a}, train accuracy {tacc}")
        st.save(trainer, {METRICS_FILE: trainer.state.log_history}, causal=False)
        return metrics
    finally:
        st.close()

