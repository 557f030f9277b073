"""lm-evaluation-harness on our models, offline.

The tasks shipped in ``tasks/`` (``llmpipe_mc_kk``, ``llmpipe_mc_ru``, ``llmpipe_mc_en`` and their
group ``llmpipe_mc``) are multiple-choice sets over JSONL files beside their YAML. Relative
``data_files`` in any task folder we load are resolved against the YAML's own folder (lm_eval
would resolve them against the working directory), by copying the folder to a scratch
directory and rewriting those paths, so the tasks work from any cwd and from an installed wheel.

Task names are checked before any model is loaded: our folders first (fast), lm_eval's ~15k
built-in tasks only when a name is not ours (indexing them takes tens of seconds, so their names
are cached per lm_eval version under ``$LLMPIPE_CACHE_DIR`` or ``~/.cache/llmpipe``). An unknown
name fails with the closest known names.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from pipeline.errors import InputError

TASKS_DIR = Path(__file__).parent / "tasks"


def materialize(include_paths: list[str], dest: str) -> list[str]:
    """Copies of the task folders under ``dest`` with relative data_files made absolute."""
    out = []
    for n, src in enumerate([str(TASKS_DIR), *include_paths]):
        if not os.path.isdir(src):
            raise InputError(f"lm_eval.include_paths: {src} is not a folder of task YAMLs")
        target = os.path.join(dest, f"{n:02d}-{Path(src).name}")
        shutil.copytree(src, target)
        for yml in Path(target).rglob("*.yaml"):
            try:
                doc = yaml.safe_load(yml.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue  # !function tags etc.: left as they are
            files = ((doc or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(doc, dict) else None
            if not files:
                continue
            origin = Path(src) / yml.parent.relative_to(target)

            def absolute(p: Any) -> Any:
                if isinstance(p, str) and "://" not in p and not os.path.isabs(p):
                    return str((origin / p).resolve())
                return p

            if isinstance(files, dict):
                fixed = {k: [absolute(x) for x in v] if isinstance(v, list) else absolute(v) for k, v in files.items()}
            elif isinstance(files, list):
                fixed = [absolute(x) for x in files]
            else:
                fixed = absolute(files)
            doc["dataset_kwargs"]["data_files"] = fixed
            yml.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
        out.append(target)
    return out


def _builtin_cache() -> Path:
    base = os.environ.get("LLMPIPE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmpipe")
    return Path(base) / f"lm_eval-{importlib.metadata.version('lm_eval')}-tasks.json"


def builtin_task_names(folders: list[str] | None = None, ours: set[str] | frozenset[str] = frozenset()
                       ) -> tuple[set[str], Any]:
    """lm_eval's built-in task/group/tag names, cached per lm_eval version (indexing them takes tens of
    seconds); with the TaskManager when it had to be built (None when the names came from the cache)."""
    cache = _builtin_cache()
    try:
        return set(json.loads(cache.read_text(encoding="utf-8"))), None
    except (OSError, ValueError):
        pass
    tm = TaskManager(include_path=folders or None, include_defaults=True)
    names = sorted(set(tm.all_tasks) - set(ours))  # the cache holds lm_eval's own names only
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(names), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home: no cache, still correct
    return set(names), tm


def task_manager(tasks: list[str], folders: list[str]) -> Any:
    """A TaskManager that knows every name in ``tasks``; InputError naming close matches otherwise."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    ours = TaskManager(include_path=folders, include_defaults=False)
    if all(t in ours.all_tasks for t in tasks):
        return ours
    builtin, full = builtin_task_names(folders, set(ours.all_tasks))
    known = builtin | set(ours.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, sorted(known), n=5, cutoff=0.6)
            hints.append(f"{t!r} (close: {', '.join(close)})" if close else repr(t))
        raise InputError(f"unknown lm_eval task {'; '.join(hints)}; shipped offline tasks: "
                         f"{', '.join(shipped_tasks())}; `lm-eval ls tasks` lists the rest")
    return full if full is not None else TaskManager(include_path=folders, include_defaults=True)


def shipped_tasks() -> list[str]:
    names = []
    for yml in sorted(TASKS_DIR.glob("*.yaml")):
        doc = yaml.safe_load(yml.read_text(encoding="utf-8")) or {}
        names.append(doc.get("group") or doc.get("task"))
    return [n for n in names if n]


def adds_bos(tok: Any) -> bool:
    """Whether ``tok`` puts BOS before a text encoded with special tokens (our tokenizers' post-processor does)."""
    ids = tok("a")["input_ids"]
    return bool(tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id)


def evaluate(model: Any, tok: Any, tasks: list[str], tm: Any, *, limit: float | None, num_fewshot: int | None,
             batch_size: int, max_length: int, seed: int, chat: bool = False) -> dict[str, Any]:
    """lm_eval's ``simple_evaluate`` on an already loaded HF model: ``{"results", "n_samples", "versions"}``."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "pretrained is not a str": on purpose
    # BOS as in training (pack puts it before every document): lm-eval adds it only when told to
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length,
              add_bos_token=adds_bos(tok))
    res = simple_evaluate(
        model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, apply_chat_template=chat,
    )
    if res is None:  # only non-zero ranks of a distributed run get None
        return {"results": {}, "n_samples": {}, "versions": {}}
    return {"results": res.get("results", {}), "n_samples": res.get("n-samples", {}),
            "versions": {k: v for k, v in (res.get("versions") or {}).items()}}


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``lm_eval_<task>_<metric>`` for every numeric metric (``acc``, ``acc_norm``, ...); no stderr."""
    flat: dict[str, float] = {}
    for task, vals in results.items():
        for key, value in vals.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            flat[f"lm_eval_{task}_{name}"] = float(value)
    return flat
