"""Post-training data: records from files, folders or Hugging Face datasets, normalised to conversations.

:func:`read_records` gives every record of a data source with where it came from (``file:line``,
``file[i]``, ``file[row i]``, ``dataset[split][i]``); :func:`to_sft_example` and
:func:`to_preference_example` normalise one record (a missing or malformed field is an
:class:`~pipeline.errors.InputError` naming the file and line); :func:`load_examples` /
:func:`load_train_eval` do a config's sources; :func:`data_fingerprints` are the stage's external inputs.

Files are found and opened as the collect stage's readers do (:func:`pipeline.data.readers.list_files`: a
folder recursively, hidden names skipped, sorted; format by extension after an optional compression suffix,
:func:`~pipeline.data.readers.split_ext`): ``.jsonl`` / ``.ndjson`` hold one record per line, a ``.json`` file
is one JSON list of records (or ``{"data": [...]}``), ``.parquet`` one record per row. Unlike collect, which
counts a bad record and moves on, post-training stops at the first one.

This module is imported by the up-to-date check of the post-training stages (:func:`data_fingerprints`):
``datasets`` and ``pyarrow`` are imported only where a datasets folder, a hub name or a parquet file is read.
"""

from __future__ import annotations

import io
import json
from collections import Counter
import os
import random
from typing import Any, Iterable, Iterator

import fsspec

from pipeline.data import readers
from pipeline.errors import ConfigError, InputError
from pipeline.training.posttrain.tools import (
    TOOL_FORMATS,
    BadToolRecord,
    check_tool_calls,
    check_tools,
    detect_tool_format,
    to_tool_example,
)
from pipeline.storage import sha256_file

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # as named in messages; .ndjson and compressed ones are read too
ROLES = ("system", "user", "assistant", "tool")
_PARQUET_BATCH = 4096


# ------------------------------------------------------------------------------------- reading


def _data_files(path: str) -> list[tuple[str, readers.DataFile]]:
    """``(name in messages, file)`` of a local file or folder: a folder's data files (by extension), or the file."""
    if not os.path.isdir(path):
        return [(path, f) for f in readers.list_files(path, storage_options={}, globs=False)]
    found = [(os.path.join(path, f.rel), f) for f in readers.list_files(path, storage_options={}, globs=False)
             if readers.split_ext(f.path)[0] in readers.JSON_EXT | readers.PARQUET_EXT]
    if not found:
        raise InputError(f"data folder {path} holds no {'/'.join(DATA_SUFFIXES)} files")
    return found


def _file_records(name: str, f: readers.DataFile) -> Iterator[tuple[str, Any]]:
    ext, compression = readers.split_ext(f.path)
    if ext in readers.PARQUET_EXT:
        try:
            with readers.open_parquet(f, compression) as pf:
                i = 0
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
                    for rec in batch.to_pylist():
                        yield f"{name}[row {i}]", rec
                        i += 1
        except readers.SkippedFile as skip:
            raise InputError(f"{name}: {skip.detail}") from None
    elif ext == ".json":
        with readers.open_bytes(f, compression) as stream:
            text = stream.read().decode("utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise InputError(f"{name}: expected a JSON list of records (or {{\"data\": [...]}})")
        for i, rec in enumerate(data):
            yield f"{name}[{i}]", rec
    elif ext in readers.JSON_EXT:
        with readers.open_bytes(f, compression) as stream:
            for n, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{name}:{n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{name}:{n}: not valid JSON: {exc.msg}") from None
    else:
        raise InputError(f"data file {name}: unsupported type (use {', '.join(DATA_SUFFIXES)} or a datasets folder)")


def _is_hf_disk_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_records(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of a data source; ``where`` is ``file:line`` or ``file[row]``."""
    if _is_hf_disk_dataset(path):
        import datasets  # here, not at the top: see the module docstring

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
    for name, f in _data_files(path):
        yield from _file_records(name, f)


def _hub_records(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets  # here, not at the top: see the module docstring

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, ...
        raise InputError(f"data {name!r} is neither a local path nor a loadable Hugging Face dataset: {exc}") from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}][{i}]", rec


# ------------------------------------------------------------------------------------- records


def detect_format(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    tool_format = detect_tool_format(rec)
    if tool_format:
        return tool_format
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


def check_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict[str, Any]]:
    """``[{role, content}]`` checked; an assistant message may carry ``tool_calls`` (then its content may be empty or
    null), normalised by :func:`~pipeline.training.posttrain.tools.check_tool_calls`; ``tool`` messages hold results."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise InputError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"{where}: messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and m["role"] != "assistant":
            raise InputError(f"{where}: messages[{i}] has tool_calls but role {m['role']!r}; only assistant turns call tools")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise InputError(f"{where}: messages[{i}].content must be a string")
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = check_tool_calls(calls, f"{where}: messages[{i}]")
        out.append(msg)
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
        example: dict[str, Any] = {"messages": check_messages(rec["messages"], where)}
        if rec.get("tools") not in (None, [], ""):
            example["tools"] = check_tools(rec["tools"], where)
        return example
    if kind in TOOL_FORMATS:
        return to_tool_example(rec, where, kind)
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


def load_examples(sources: Iterable[Any], kind: str, skipped: Counter | None = None) -> list[dict[str, Any]]:
    """All examples of ``sources`` (config ``DataSource`` objects), ``kind`` = ``sft`` or ``preference``.

    A bad record of our own formats stops the load (:class:`InputError` naming it); a bad record of a public
    tool-use format (xlam, glaive, hermes) is skipped and counted by reason in ``skipped`` (``"<format>: <reason>"``).
    """
    out: list[dict[str, Any]] = []
    for src in sources:
        n = 0
        for where, rec in read_records(src.path, src.split):
            if src.max_examples is not None and n >= src.max_examples:
                break
            n += 1
            if kind == "sft":
                if src.format == "preference":
                    raise ConfigError(f"data {src.path}: format 'preference' is for dpo/reward, not sft")
                try:
                    out.append(to_sft_example(rec, where, src.format))
                except BadToolRecord as exc:
                    fmt = src.format if src.format != "auto" else detect_format(rec)
                    if fmt not in TOOL_FORMATS:
                        raise
                    if skipped is not None:
                        skipped[f"{fmt}: {exc.reason}"] += 1
            else:
                if src.format in ("alpaca", "chat", *TOOL_FORMATS):
                    raise ConfigError(f"data {src.path}: format {src.format!r} has no preference pairs")
                out.append(to_preference_example(rec, where))
        if n == 0:
            raise InputError(f"data {src.path} holds no records")
    if not out:
        raise InputError("the training data is empty" + (f" (every record was skipped: {dict(skipped)})" if skipped else ""))
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
    fs = fsspec.filesystem("file")
    out: dict[str, str | None] = {}
    for src in sources:
        if not os.path.exists(src.path):
            out[src.path] = None
            continue
        if os.path.isdir(src.path):
            files = [os.path.join(src.path, f.rel) for f in readers.list_files(src.path, storage_options={}, globs=False)]
        else:
            files = [src.path]
        for f in files:
            out[f] = sha256_file(fs, f)
    return out


def load_train_eval(cfg: Any, kind: str, skipped: Counter | None = None) -> tuple[list, list]:
    """(train, held-out) examples of a config; every example has a ``tools`` key when any has one (a datasets
    table takes its columns from the first row)."""
    examples = load_examples(cfg.data, kind, skipped)
    held = load_examples(cfg.eval_data, kind, skipped) if cfg.eval_data else None
    if any("tools" in e for e in examples + (held or [])):
        for e in examples + (held or []):
            e.setdefault("tools", None)
    if held is not None:
        return examples, held
    return split_examples(examples, cfg.eval_fraction, cfg.seed)
