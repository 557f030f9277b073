"""``llmpipe publish``: a registered model version -> the folder pushed to the Hugging Face Hub -> the push.

:func:`build_folder` assembles exactly what would be uploaded:

* the Hugging Face folder of the version (weights, config, generation config, tokenizer and its chat template), made
  by :func:`pipeline.serving.resolve.fetch` from the MLflow transformers-flavour model, with the local-only keys the
  save left in ``tokenizer_config.json`` (``is_local``, ``local_files_only``) and ``config.json`` taken out;
* optionally GGUF files: the run root's ``quantized/`` files when its manifest says they were made from this very
  model (the version's ``llmpipe.fingerprint``), or files given by path;
* ``README.md``: the model card, built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` (the Hub reads the
  YAML header: languages, license, datasets, base model, ``model-index`` for the evaluation results) from the
  lineage and the evaluation: data sources and cleaning, token counts, training recipe, evaluation table, quantized
  variants with their quality deltas, license and limitations.

Facts come from the stage manifests of the lineage chain. The run root's manifest is used when it is reachable
(``--root``, or the run root the version recorded) and still has the fingerprint the lineage recorded; else the copy
of the manifest in the stage's MLflow run (``manifest.json``), so a card can be built from the registry alone. What
neither holds is said in the card, not guessed.

:func:`push` uploads the folder with ``huggingface_hub.HfApi``: ``create_repo`` (private unless asked otherwise;
an existing repo keeps its visibility) then ``upload_folder`` with a commit message naming the version.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, PipelineError

DEFAULT_LICENSE = "apache-2.0"
LANGUAGES = ("kk", "ru", "en")  # the platform's target languages, in the order the card lists them
LANGUAGE_NAMES = {"kk": "Kazakh", "ru": "Russian", "en": "English"}
TOKEN_ENV = "HF_TOKEN"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOCAL_ONLY_KEYS = {"tokenizer_config.json": ("is_local", "local_files_only", "name_or_path", "_name_or_path"),
                    "config.json": ("_name_or_path",)}
_NOT_RECORDED = "not recorded (neither the run root nor the stage's MLflow run holds its manifest)"


@dataclass
class Facts:
    """What the card is written from."""

    name: str
    version: int
    alias: str | None
    aliases: list[str]
    repo_id: str | None
    license: str
    description: str | None
    tags: dict[str, str]  # the version's tags: metric.*, lineage.*, llmpipe.*
    run_id: str | None
    chain: list[dict[str, Any]]  # lineage entries, the model first
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # artifact -> its manifest (fingerprint checked)
    manifest_from: dict[str, str] = field(default_factory=dict)  # artifact -> "run root" | "MLflow run <id>"
    config: dict[str, Any] = field(default_factory=dict)  # the model's config.json
    params: int | None = None
    quantized: dict[str, Any] | None = None  # quantize's manifest for this model
    quantized_from: str | None = None
    gguf: list[tuple[str, str | None]] = field(default_factory=list)  # (file in the repo, variant) of included GGUFs
    chat_template: bool = False
    notes: list[str] = field(default_factory=list)  # what could not be found, for the dry run's output


@dataclass
class Bundle:
    """The folder that is (or would be) pushed."""

    folder: Path
    name: str
    version: int
    alias: str | None
    uri: str  # models:/NAME/VERSION
    files: list[tuple[str, int]]  # (path in the repo, bytes)
    card: Any  # huggingface_hub.ModelCard
    notes: list[str]

    @property
    def size_bytes(self) -> int:
        return sum(s for _, s in self.files)

    def commit_message(self) -> str:
        alias = f", alias {self.alias}" if self.alias else ""
        return f"{self.name} version {self.version} ({self.uri}{alias}) from llmpipe"


# ------------------------------------------------------------------------------------------- the folder


def build_folder(client: Any, uri: str, out_dir: str | os.PathLike[str], *, tracking_uri: str | None = None,
                 root_storage: Any = None, gguf: bool = False, gguf_files: list[str] | tuple[str, ...] = (),
                 license: str = DEFAULT_LICENSE, repo_id: str | None = None) -> Bundle:
    """Write the folder :func:`push` would upload to ``out_dir`` (absent, empty, or an earlier publish folder).

    ``root_storage``: the run root (a :class:`pipeline.storage.Storage`) to read manifests and GGUF files from;
    None: the run root the version recorded when it is a local folder that still exists, else the registry alone.
    ``gguf``: include the GGUF files of the run root's ``quantized/`` (they must have been made from this model);
    ``gguf_files``: GGUF files to include as they are."""
    from pipeline import registry
    from pipeline.serving.resolve import fetch, resolve

    out = Path(out_dir)
    _check_target(out)
    name, version, alias, mv = resolve(client, uri)
    pinned = f"models:/{name}/{version}"
    tracking_uri = tracking_uri or getattr(client, "tracking_uri", None)
    info = registry.lineage(client, pinned)
    facts = Facts(name=name, version=version, alias=alias, aliases=info["aliases"], repo_id=repo_id, license=license,
                  description=getattr(mv, "description", None) or None, tags=info["tags"], run_id=info["run_id"],
                  chain=info["chain"])
    storage = root_storage if root_storage is not None else _recorded_root(info.get("run_root"), facts)
    _collect_manifests(client, storage, facts)
    _find_quantized(client, storage, facts)
    where = [f"{sum(1 for v in facts.manifest_from.values() if v == 'run root')} from the run root",
             f"{sum(1 for v in facts.manifest_from.values() if v != 'run root')} from MLflow runs"]
    facts.notes.insert(0, f"card facts: {len(facts.manifests)} of {len(facts.chain)} lineage manifests ("
                          + ", ".join(where) + "); quantized variants: " + (facts.quantized_from or "none found"))
    run_gguf = _run_gguf(storage, facts) if gguf else {}  # checked before the download: a refusal costs nothing
    for path in gguf_files:
        _check_gguf_file(Path(path))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.download-") as tmp:
            served = fetch(client, pinned, tmp, tracking_uri or "")
            shutil.move(served.folder, staging)
        _strip_local_keys(staging)
        facts.config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        facts.params = _safetensors_params(staging)
        facts.chat_template = _has_chat_template(staging)
        if not facts.chat_template:
            facts.notes.append("the tokenizer has no chat template: the model is published as a plain LM")
        for variant, rel in sorted(run_gguf.items()):
            target = _gguf_name(facts, variant)
            storage.fs.get(storage.path("quantized", rel), str(staging / target))
            facts.gguf.append((target, variant))
        for path in gguf_files:
            _copy_gguf_file(Path(path), staging, facts)
        card = model_card(facts)
        card.save(str(staging / "README.md"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    files = sorted((p.relative_to(out).as_posix(), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    return Bundle(folder=out, name=name, version=version, alias=alias, uri=pinned, files=files, card=card,
                  notes=facts.notes)


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file: give a folder to write the repository into")
    if out.is_dir() and any(out.iterdir()) and not ((out / "config.json").exists() and (out / "README.md").exists()):
        raise InputError(f"{out} is not empty and is not an earlier publish folder: give a new or empty folder")


def _recorded_root(run_root: str | None, facts: Facts) -> Any:
    """The run root the version recorded, when it is a local folder that is still there (an object-store root is
    read only when given with --root: it may need credentials this machine does not have)."""
    from pipeline.storage import Storage

    if not run_root or "://" in run_root:
        if run_root:
            facts.notes.append(f"the run root {run_root} was not read (give --root to use it): facts from MLflow")
        return None
    if not os.path.isdir(run_root):
        facts.notes.append(f"the run root {run_root} is not reachable here: facts from the registry and MLflow runs")
        return None
    return Storage(run_root, create=False)


def _run_manifest(client: Any, run_id: str | None) -> dict[str, Any] | None:
    """The ``manifest.json`` tracking logged to a stage's MLflow run."""
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "manifest.json", tmp)
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except Exception:  # noqa: BLE001 - a run without the artefact, or a store that is not reachable
            return None
    return data if isinstance(data, dict) else None


def _collect_manifests(client: Any, storage: Any, facts: Facts) -> None:
    """Each chain artifact's manifest, from the run root when it still holds the fingerprint the lineage recorded,
    else from the stage's MLflow run."""
    stale = []
    for entry in facts.chain:
        art, fp = entry.get("artifact"), entry.get("fingerprint")
        if not art or entry.get("missing"):
            continue
        m = None
        if storage is not None:
            try:
                m = storage.manifest(art)
            except PipelineError:
                m = None
            if m is not None and m.get("fingerprint") == fp:
                facts.manifests[art], facts.manifest_from[art] = m, "run root"
                continue
            if m is not None:
                stale.append(art)
        m = _run_manifest(client, entry.get("mlflow_run_id"))
        if m is not None and (fp is None or m.get("fingerprint") == fp):
            facts.manifests[art], facts.manifest_from[art] = m, f"MLflow run {entry.get('mlflow_run_id')}"
    if stale:
        facts.notes.append(f"the run root's {', '.join(stale)} changed since registration (other fingerprints): "
                           "their MLflow runs' manifests were used")
    missing = [e["artifact"] for e in facts.chain if e.get("artifact") and e["artifact"] not in facts.manifests]
    if missing:
        facts.notes.append(f"no manifest for {', '.join(missing)}: the card leaves their details out")


def _made_from(manifest: dict[str, Any], fingerprint: str | None) -> bool:
    return bool(fingerprint) and any((v or {}).get("fingerprint") == fingerprint
                                     for v in (manifest.get("inputs") or {}).values())


def _find_quantized(client: Any, storage: Any, facts: Facts) -> None:
    """quantize's manifest for this model: the run root's ``quantized/``, else the newest quantize run in MLflow
    whose manifest names this model's fingerprint as its input."""
    fp = facts.tags.get("llmpipe.fingerprint")
    if not fp:
        return
    if storage is not None:
        try:
            m = storage.manifest("quantized")
        except PipelineError:
            m = None
        if m is not None and _made_from(m, fp):
            facts.quantized, facts.quantized_from = m, "run root"
            return
    if not facts.run_id:
        return
    try:
        exp = client.get_run(facts.run_id).info.experiment_id
        runs = client.search_runs([exp], filter_string="tags.`llmpipe.stage` = 'quantize'",
                                  order_by=["attributes.start_time DESC"], max_results=20)
    except Exception:  # noqa: BLE001 - the card goes without the quantized variants
        return
    for run in runs:
        m = _run_manifest(client, run.info.run_id)
        if m is not None and _made_from(m, fp):
            facts.quantized, facts.quantized_from = m, f"MLflow run {run.info.run_id}"
            return


def _strip_local_keys(folder: Path) -> None:
    """Keys a local save wrote that mean nothing on the Hub (``local_files_only: true`` would follow the tokenizer
    to every machine that downloads it)."""
    for fname, keys in _LOCAL_ONLY_KEYS.items():
        path = folder / fname
        if not path.exists():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and any(k in data for k in keys):
            for k in keys:
                data.pop(k, None)
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    path = folder / "tokenizer_config.json"
    return path.exists() and bool(json.loads(path.read_text(encoding="utf-8")).get("chat_template"))


def _safetensors_params(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files, from their headers (no tensor is read)."""
    total, found = 0, False
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key != "__metadata__":
                total += math.prod(t.get("shape") or [1])
                found = True
    return total if found else None


def _gguf_name(facts: Facts, variant: str) -> str:
    base = (facts.repo_id or facts.name).rsplit("/", 1)[-1]
    return f"{base}-{variant.removeprefix('gguf-').upper()}.gguf"


def _run_gguf(storage: Any, facts: Facts) -> dict[str, str]:
    """{variant: path under quantized/} of the run root's GGUF files, which must have been made from this model."""
    if storage is None or facts.quantized is None or facts.quantized_from != "run root":
        where = ("the run root's quantized/ was not made from this version's model"
                 if storage is not None else "no run root is reachable")
        raise InputError(f"--gguf takes the GGUF files from the run root's quantized/ ({where}): run quantize on the "
                         "registered model and give --root, or name the files with --gguf-file PATH")
    variants = {k: str(v["path"]) for k, v in ((facts.quantized.get("metrics") or {}).get("variants") or {}).items()
                if str(v.get("path", "")).endswith(".gguf")}
    if not variants:
        raise InputError("the run root's quantized/ has no GGUF variant (quantize's variants: gguf-f16, gguf-q8_0, "
                         "gguf-q4_0)")
    return variants


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"--gguf-file {path} does not exist")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InputError(f"--gguf-file {path} is not a GGUF file (no GGUF magic)")


def _copy_gguf_file(path: Path, folder: Path, facts: Facts) -> None:
    if (folder / path.name).exists():
        raise InputError(f"--gguf-file {path}: a file named {path.name} is already in the folder")
    shutil.copyfile(path, folder / path.name)
    facts.gguf.append((path.name, None))


# ------------------------------------------------------------------------------------------- the card


def _stage_entries(facts: Facts, stage: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(lineage entry, manifest) of each chain artifact made by ``stage``, oldest first."""
    out = []
    for e in reversed(facts.chain):
        m = facts.manifests.get(e.get("artifact", ""))
        if (e.get("stage") or (m or {}).get("stage")) == stage and m is not None:
            out.append((e, m))
    return out


def _n(x: Any) -> str:
    """A count for people: 1,234 / 12.3M / 4.56B."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return "-"
    x = float(x)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{int(x):,}" if x.is_integer() else f"{x:.4g}"


def _g(x: Any, digits: int = 4) -> str:
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    return f"{x:.{digits}g}"


def _mb(n: Any) -> str:
    return "-" if not isinstance(n, (int, float)) else f"{n / 1e6:.2f} MB"


def _by_language(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """Items of a dict keyed by language (or anything), kk / ru / en first (manifests store keys sorted)."""
    rank = {x: i for i, x in enumerate(LANGUAGES)}
    return sorted(d.items(), key=lambda kv: (rank.get(kv[0], len(rank)), str(kv[0])))


def _short_path(p: str) -> str:
    """A source path without the machine it was read on: the last two parts of an absolute local path."""
    if "://" in p or not p.startswith("/"):
        return p
    parts = [x for x in p.split("/") if x]
    return "…/" + "/".join(parts[-2:]) if len(parts) > 2 else p


def _is_hub_id(value: Any) -> bool:
    s = str(value or "")
    return bool(_HUB_ID.match(s)) and os.path.splitext(s)[1] not in (".json", ".jsonl", ".parquet", ".txt", ".gz") \
        and not os.path.exists(s)


def _languages(facts: Facts) -> list[str]:
    kept: dict[str, int] = {}
    for _, m in _stage_entries(facts, "clean"):
        for lang, n in ((m.get("metrics") or {}).get("kept_by_language") or {}).items():
            if re.fullmatch(r"[a-z]{2,3}", str(lang)) and n:
                kept[lang] = kept.get(lang, 0) + int(n)
    if not kept:
        return list(LANGUAGES)
    return [x for x in LANGUAGES if x in kept] + sorted(x for x in kept if x not in LANGUAGES)


def _datasets(facts: Facts) -> list[str]:
    names: list[str] = []
    for _, m in _stage_entries(facts, "collect"):
        for s in (m.get("config") or {}).get("sources") or []:
            if s.get("kind") == "hf" and _is_hub_id(s.get("dataset")):
                names.append(s["dataset"])
    for stage in ("sft", "dpo"):
        for _, m in _stage_entries(facts, stage):
            for d in ((m.get("config") or {}).get("data") or []) + ((m.get("config") or {}).get("eval_data") or []):
                if _is_hub_id(d.get("path")):
                    names.append(d["path"])
    return list(dict.fromkeys(names))


def _base_model(facts: Facts) -> tuple[str | None, str | None]:
    """(hub id for the metadata, what the body says) of the checkpoint init started from, if any."""
    for _, m in _stage_entries(facts, "init"):
        cfg = m.get("config") or {}
        if cfg.get("source") == "pretrained" and cfg.get("pretrained_path"):
            path = str(cfg["pretrained_path"])
            if cfg.get("allow_hub") and _is_hub_id(path):
                return path, f"[{path}](https://huggingface.co/{path})"
            return None, f"a local checkpoint ({_short_path(path)})"
    return None, None


_LM_EVAL_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc", "bleu", "word_perplexity", "byte_perplexity",
                    "bits_per_byte")


def _metric_rows(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The version's ``metric.*`` tags as rows: group, dataset, metric, value."""
    rows = []
    for key, raw in sorted(tags.items()):
        if not key.startswith("metric."):
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        k = key[len("metric."):]
        row: dict[str, Any] = {"key": k, "value": value}
        m = re.fullmatch(r"val_(loss|perplexity|bpb)", k)
        lang = re.fullmatch(r"(perplexity|bits_per_byte|tokens)_([a-z]{2,3})", k)
        if m:
            row.update(group="validation", dataset="validation blocks (pack's val split)", metric=m.group(1),
                       dataset_type="llmpipe/validation-blocks")
        elif lang:
            row.update(group="heldout", lang=lang.group(2), metric=lang.group(1),
                       dataset=f"held-out {LANGUAGE_NAMES.get(lang.group(2), lang.group(2))} documents",
                       dataset_type=f"llmpipe/heldout-{lang.group(2)}")
        elif k.startswith("lm_eval_"):
            rest = k[len("lm_eval_"):]
            metric = next((s for s in _LM_EVAL_METRICS if rest.endswith("_" + s)), None)
            task = rest[: -len(metric) - 1] if metric else rest
            row.update(group="lm_eval", task=task, metric=metric or "value", dataset=task, dataset_type=task)
        elif k.startswith("tool_"):
            row.update(group="tool_use", metric=k[len("tool_"):], dataset="tool-use conversations (kk/ru/en)",
                       dataset_type="llmpipe/tool-use")
        else:
            row.update(group="other", metric=k, dataset="llmpipe evaluation", dataset_type="llmpipe/evaluate")
        rows.append(row)
    return rows


def _eval_results(rows: list[dict[str, Any]]) -> list[Any]:
    from huggingface_hub import EvalResult

    out = []
    for r in rows:
        if r["group"] == "heldout" and r["metric"] == "tokens":
            continue  # a count, not a result
        metric_type = {"acc": "accuracy", "acc_norm": "accuracy", "bpb": "bits_per_byte"}.get(r["metric"], r["metric"])
        out.append(EvalResult(task_type="text-generation", dataset_type=r["dataset_type"], dataset_name=r["dataset"],
                              metric_type=metric_type, metric_name=r["key"], metric_value=round(r["value"], 6)))
    return out


def model_card(facts: Facts) -> Any:
    """The model card: huggingface_hub's ``ModelCardData`` for the YAML header, our sections for the body."""
    from huggingface_hub import ModelCard, ModelCardData

    rows = _metric_rows(facts.tags)
    base_id, _ = _base_model(facts)
    tags = ["llmpipe", str(facts.config.get("model_type") or "llama"), "text-generation"]
    tags += [LANGUAGE_NAMES[x].lower() for x in _languages(facts) if x in LANGUAGE_NAMES]
    if facts.chat_template:
        tags.append("conversational")
    if _stage_entries(facts, "sft") or _stage_entries(facts, "dpo"):
        tags.append("trl")
    if _stage_entries(facts, "dpo"):
        tags.append("dpo")
    if facts.gguf:
        tags.append("gguf")
    data = ModelCardData(
        language=_languages(facts), license=facts.license, library_name="transformers", pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)), datasets=_datasets(facts) or None, base_model=base_id,
        model_name=(facts.repo_id or facts.name).rsplit("/", 1)[-1],
        eval_results=_eval_results(rows) or None,
    )
    body = render_body(facts, rows)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)]


def render_body(facts: Facts, rows: list[dict[str, Any]]) -> str:
    title = (facts.repo_id or facts.name).rsplit("/", 1)[-1]
    langs = _languages(facts)
    lang_words = ", ".join(LANGUAGE_NAMES.get(x, x) for x in langs)
    params = facts.params
    stages = [s for s in ("pretrain", "sft", "dpo") if _stage_entries(facts, s)]
    made = " -> ".join(["init", *stages]) if stages else "init"
    out = [f"# {title}", ""]
    size = f"{_n(params)}-parameter " if params else ""
    intro = (f"A {size}{str(facts.config.get('model_type') or 'llama').capitalize()}-architecture causal language "
             f"model for {lang_words}, built end to end by llmpipe ({made}). ")
    out += [intro + f"This repository is version {facts.version} of the registered model `{facts.name}` "
            f"(`models:/{facts.name}/{facts.version}`"
            + (f", aliases: {', '.join(facts.aliases)}" if facts.aliases else "") + ")."]
    if facts.description:
        out += ["", f"> {facts.description}"]
    out += ["", "**Read the limitations below before using it.**", ""]
    out += _usage(facts)
    out += _architecture(facts)
    out += _data(facts)
    out += _tokens(facts)
    out += _recipe(facts)
    out += _evaluation(facts, rows)
    out += _quantized(facts)
    out += _license(facts)
    out += _limitations(facts)
    out += _provenance(facts)
    return "\n".join(out).rstrip() + "\n"


def _usage(facts: Facts) -> list[str]:
    repo = facts.repo_id or f"ORG/{facts.name}"
    out = ["## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', f'model = AutoModelForCausalLM.from_pretrained("{repo}")']
    if facts.chat_template:
        out += ['messages = [{"role": "user", "content": "Қазақстанның астанасы қай қала?"}]',
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                "return_dict=True)"]
    else:
        out += ['inputs = tokenizer("Қазақстанның астанасы", return_tensors="pt")']
    out += ["output = model.generate(**inputs, max_new_tokens=64)",
            "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", ""]
    if facts.chat_template:
        out += ["The chat template (`chat_template.jinja`) is ChatML (`<|im_start|>role ... <|im_end|>`), with tools "
                "and tool calls when the training data had them.", ""]
    if facts.gguf:
        out += ["GGUF files for llama.cpp and tools built on it (see *Quantized variants*):", "", "```",
                f"llama-cli -m {_example_gguf(facts)} -p \"Қазақстанның астанасы\"", "```", ""]
    return out


def _example_gguf(facts: Facts) -> str:
    return next((f for f, v in facts.gguf if v == "gguf-q8_0"), facts.gguf[0][0])


def _architecture(facts: Facts) -> list[str]:
    c = facts.config
    if not c:
        return []
    rope = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta"))
    rows = [["architecture", ", ".join(c.get("architectures") or [str(c.get("model_type"))])],
            ["parameters", f"{facts.params:,}" if facts.params else "-"],
            ["layers / hidden / FFN", f"{c.get('num_hidden_layers')} / {c.get('hidden_size')} / {c.get('intermediate_size')}"],
            ["attention heads / KV heads", f"{c.get('num_attention_heads')} / {c.get('num_key_value_heads')}"],
            ["vocabulary", _n(c.get("vocab_size"))],
            ["positions", _n(c.get("max_position_embeddings")) + (f" (RoPE theta {_g(rope)})" if rope else "")],
            ["tied input / output embeddings", "yes" if c.get("tie_word_embeddings") else "no"],
            ["weights", str(c.get("dtype") or c.get("torch_dtype") or "-") + " safetensors"]]
    return ["## Model", "", *_table(["", ""], rows), ""]


def _data(facts: Facts) -> list[str]:
    out = ["## Training data", ""]
    collect = _stage_entries(facts, "collect")
    if not collect:
        out += [f"Sources: {_NOT_RECORDED}.", ""]
    for e, m in collect:
        met = m.get("metrics") or {}
        by_source = met.get("by_source") or {}
        rows = []
        for s in (m.get("config") or {}).get("sources") or []:
            label = s.get("name") or s.get("dataset") or ", ".join(s.get("paths") or [])
            where = (f"HF dataset `{s.get('dataset')}`" + (f" ({s['dataset_config']})" if s.get("dataset_config") else "")
                     + f", split {s.get('split')}" if s.get("kind") == "hf"
                     else ", ".join(f"`{_short_path(p)}`" for p in s.get("paths") or []))
            rows.append([label, s.get("language") or "auto", where, _n(by_source.get(label))])
        out += [f"`{e['artifact']}/` (collect): {_n(met.get('documents'))} documents, {_n(met.get('characters'))} "
                "characters, from:", "", *_table(["source", "language", "from", "documents"], rows), ""]
        problems = met.get("problems") or {}
        if problems:
            out += [f"Unreadable inputs skipped: {', '.join(f'{k} {v}' for k, v in sorted(problems.items()))}.", ""]
    for e, m in _stage_entries(facts, "clean"):
        out += _clean_section(e, m)
    sft_data = [(stage, d) for stage in ("sft", "dpo") for _, m in _stage_entries(facts, stage)
                for d in (m.get("config") or {}).get("data") or []]
    if sft_data:
        out += ["Post-training data:", "",
                *_table(["stage", "data", "format", "records used"],
                        [[stage, f"`{_short_path(str(d.get('path')))}`", d.get("format", "auto"),
                          d.get("max_examples") or "all"] for stage, d in sft_data]), ""]
    return out


def _clean_section(e: dict[str, Any], m: dict[str, Any]) -> list[str]:
    met, cfg = m.get("metrics") or {}, m.get("config") or {}
    n_in, kept, dropped = met.get("documents_in"), met.get("kept"), met.get("dropped")
    share = f" ({100 * kept / n_in:.1f}%)" if isinstance(kept, int) and n_in else ""
    out = [f"### Cleaning: `{e['artifact']}/`", "",
           f"{_n(n_in)} documents in, {_n(kept)} kept{share}, {_n(dropped)} dropped; "
           f"{_n(met.get('characters_in'))} -> {_n(met.get('characters_out'))} characters."]
    steps = []
    norm = cfg.get("normalize") or {}
    if norm:
        steps.append(f"Unicode {norm.get('unicode_form', 'NFC')}, control characters stripped, whitespace collapsed")
    length = cfg.get("length") or {}
    if length:
        steps.append(f"length filters (at least {length.get('min_words')} words / {length.get('min_chars')} characters, "
                     f"mean word length {length.get('min_mean_word_length')}-{length.get('max_mean_word_length')})")
    if cfg.get("repetition"):
        steps.append("Gopher-style repetition filters (duplicate lines, paragraphs and n-grams)")
    script = cfg.get("script") or {}
    if script.get("enabled"):
        steps.append("script share (" + ", ".join(f"{k} {v}" for k, v in _by_language(script.get("expected") or {})) + ")")
    langid = cfg.get("langid") or {}
    if langid.get("enabled"):
        steps.append(f"fastText language ID keeping {', '.join(langid.get('languages') or [])}")
    if cfg.get("pii") or met.get("pii_replaced"):
        steps.append("PII replacement (e-mails, phone numbers, IP addresses)")
    dedup = cfg.get("dedup") or {}
    if dedup:
        kinds = (["exact"] if dedup.get("exact") else []) + (
            [f"near (MinHash LSH, Jaccard >= {dedup.get('threshold')} on {dedup.get('shingle_words')}-word shingles)"]
            if dedup.get("near") else [])
        steps.append("deduplication across the corpus: " + " + ".join(kinds))
    if steps:
        out += ["", "Steps: " + "; ".join(steps) + "."]
    reasons = met.get("dropped_by_reason") or {}
    if reasons:
        grouped: dict[str, int] = {}
        for k, v in reasons.items():
            grouped[k.split(".", 1)[0]] = grouped.get(k.split(".", 1)[0], 0) + int(v)
        detail = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        out += ["", *_table(["dropped because", "documents", "largest reasons"],
                            [[g, _n(n), ", ".join([f"{k} {_n(v)}" for k, v in detail if k.split(".", 1)[0] == g][:3])]
                             for g, n in sorted(grouped.items(), key=lambda kv: (-kv[1], kv[0]))])]
    pii = met.get("pii_replaced") or {}
    if pii and not any(pii.values()):
        out += ["", f"PII: none found (looked for {', '.join(sorted(pii))})."]
    elif pii:
        docs = (met.get("pii_documents") or {}).get("any")
        out += ["", "PII replaced: " + ", ".join(f"{k} {_n(v)}" for k, v in sorted(pii.items()))
                + (f" (in {_n(docs)} documents)." if docs is not None else ".")]
    by_lang = met.get("kept_by_language") or {}
    if by_lang:
        out += ["", "Kept by language: " + ", ".join(f"{k} {_n(v)}" for k, v in _by_language(by_lang)) + "."]
    return out + [""]


def _tokens(facts: Facts) -> list[str]:
    out = ["## Tokenizer and token counts", ""]
    for e, m in _stage_entries(facts, "tokenizer"):
        cfg, met = m.get("config") or {}, m.get("metrics") or {}
        out += [f"Byte-level BPE, {_n(met.get('vocab_size') or cfg.get('vocab_size'))} tokens "
                f"({cfg.get('pretokenizer', '-')} pre-tokenizer), trained on "
                + ", ".join(f"{k} {_n(v)}" for k, v in _by_language(met.get("train_characters") or {})) + " characters."]
        fert = met.get("fertility") or {}
        if fert:
            refs = sorted({r for v in fert.values() for r in v if r != "ours"})
            out += ["", "Tokens per word on held-out text (lower is better):", "",
                    *_table(["language", "this tokenizer", *refs],
                            [[lang, _g(v.get("ours"), 3), *(_g(v.get(r), 3) for r in refs)] for lang, v in _by_language(fert)])]
        out += [""]
    packs = _stage_entries(facts, "pack")
    for e, m in packs:
        met = m.get("metrics") or {}
        tok, blocks, docs = met.get("tokens") or {}, met.get("blocks") or {}, met.get("documents") or {}
        line = (f"`{e['artifact']}/` (pack): blocks of {met.get('seq_len')} tokens; train {_n(tok.get('train'))} tokens "
                f"({_n(blocks.get('train'))} blocks, {_n(docs.get('train'))} documents), validation {_n(tok.get('val'))} "
                f"tokens ({_n(docs.get('val'))} documents, never trained on).")
        by_lang: dict[str, int] = {}
        for st in (met.get("streams") or {}).values():
            if st.get("lang"):
                by_lang[st["lang"]] = by_lang.get(st["lang"], 0) + int(st.get("tokens") or 0)
        if by_lang:
            line += " Training tokens by language: " + ", ".join(f"{k} {_n(v)}" for k, v in _by_language(by_lang)) + "."
        out += [line, ""]
    for e, m in _stage_entries(facts, "pretrain"):
        met = m.get("metrics") or {}
        line = f"Pretraining saw {_n(met.get('tokens'))} tokens"
        if met.get("tokens_by_language"):
            line += " (" + ", ".join(f"{k} {_n(v)}" for k, v in _by_language(met["tokens_by_language"])) + ")"
        out += [line + "; per phase under *Training recipe*.", ""]
    if not packs and not _stage_entries(facts, "pretrain"):
        out += [f"Token counts: {_NOT_RECORDED}.", ""]
    return out


def _lr(cfg: dict[str, Any]) -> str:
    return _g(cfg.get("lr"), 3)


def _recipe(facts: Facts) -> list[str]:
    out = ["## Training recipe", ""]
    _, base_text = _base_model(facts)
    for e, m in _stage_entries(facts, "init"):
        cfg, met = m.get("config") or {}, m.get("metrics") or {}
        if base_text:
            out += [f"- **init**: from {base_text}" + (f", {_n(met.get('params_total'))} parameters" if met.get("params_total") else "")
                    + (f" (vocabulary moved to ours: new rows {cfg.get('new_token_init')})" if cfg.get("new_token_init") else "") + "."]
        else:
            out += [f"- **init**: random weights, preset `{cfg.get('preset') or 'custom'}`, init "
                    f"{cfg.get('init_std') or '-'} (std {cfg.get('initializer_range')}), seed {cfg.get('seed')}."]
    for e, m in _stage_entries(facts, "pretrain"):
        cfg, met = m.get("config") or {}, m.get("metrics") or {}
        sched = cfg.get("schedule")
        sched_text = (f"WSD (decay over the last {_g(cfg.get('decay_fraction'), 2)} of steps, {cfg.get('decay_shape')})"
                      if sched == "wsd" else str(sched))
        out += [f"- **pretrain**: {_n(met.get('steps'))} steps x {_n(cfg.get('global_batch_tokens'))} tokens = "
                f"{_n(met.get('tokens'))} tokens; AdamW lr {_lr(cfg)} (min {_g(cfg.get('min_lr_ratio'), 2)} x lr), "
                f"{cfg.get('warmup_steps')} warmup steps, {sched_text}; weight decay {cfg.get('weight_decay')}, "
                f"betas {cfg.get('adam_beta1')}/{cfg.get('adam_beta2')}, grad clip {cfg.get('max_grad_norm')}; "
                f"micro batch {met.get('micro_batch_size')} x grad accum {met.get('grad_accum')} x "
                f"{met.get('world_size')} ranks of {met.get('seq_len')} tokens; {met.get('precision')}, ZeRO "
                f"{met.get('zero_stage')}; attention {'within documents' if cfg.get('document_masking') else 'across the block'}. "
                f"Final train loss {_g(met.get('train_loss'))}, validation loss {_g(met.get('val_loss'))} "
                f"(perplexity {_g(met.get('val_perplexity'))})."]
        phases = met.get("phases") or {}
        if phases:
            rows = []
            for name, ph in sorted(phases.items(), key=lambda kv: (kv[1].get("steps") or [0])[0]):  # training order
                steps = ph.get("steps") or ["?", "?"]
                mix = ph.get("mix")
                mix_text = (f"by {ph.get('mix_by', 'lang')}: " + ", ".join(f"{k} x{v}" for k, v in _by_language(mix))
                            if mix else "natural")
                langs = ph.get("languages") or {}
                lang_text = ", ".join(f"{k} {_n(v.get('tokens'))} ({_g(v.get('epochs'), 2)} ep)" for k, v in _by_language(langs))
                rows.append([name, f"`{ph.get('shards')}/`", f"{steps[0]}-{steps[1]}", _n(ph.get("tokens")),
                             mix_text, lang_text or "-"])
            out += ["", *["  " + x for x in _table(["phase", "data", "steps", "tokens", "mix", "tokens by language (epochs)"], rows)], ""]
    for stage in ("sft", "dpo"):
        for e, m in _stage_entries(facts, stage):
            cfg, met = m.get("config") or {}, m.get("metrics") or {}
            lora = cfg.get("lora")
            mode = f"LoRA r {lora.get('r')} alpha {lora.get('alpha')} (merged)" if lora else "full fine-tuning"
            steps = met.get("steps")
            line = (f"- **{stage}**: {_n(met.get('train_examples'))} training / {_n(met.get('eval_examples'))} held-out "
                    f"{'conversations' if stage == 'sft' else 'preference pairs'}, {_n(steps)} steps, {mode}; lr {_lr(cfg)} "
                    f"{cfg.get('lr_scheduler')} (warmup {cfg.get('warmup_ratio')}), micro batch "
                    f"{cfg.get('micro_batch_size')} x grad accum {cfg.get('grad_accum')} x {met.get('world_size', 1)} "
                    f"ranks, max length {cfg.get('max_length')}")
            if stage == "sft":
                line += (f", packing {'on' if cfg.get('packing') else 'off'}, loss on assistant tokens only; "
                         f"held-out loss {_g(met.get('eval_loss_before'))} -> {_g(met.get('eval_loss_after'))}.")
            else:
                line += (f", beta {cfg.get('beta')}, loss {cfg.get('loss_type')}, reference {met.get('reference', '-')}; "
                         f"held-out reward accuracy {_g(met.get('eval_reward_accuracy_before'), 3)} -> "
                         f"{_g(met.get('eval_reward_accuracy_after'), 3)}, log-prob margin "
                         f"{_g(met.get('eval_logp_margin_before'))} -> {_g(met.get('eval_logp_margin_after'))}.")
            out += [line]
    if len(out) == 2:
        out += [f"Training stages: {_NOT_RECORDED}."]
    return out + [""]


def _evaluation(facts: Facts, rows: list[dict[str, Any]]) -> list[str]:
    out = ["## Evaluation", ""]
    if not rows:
        return out + ["This version carries no evaluation metrics (register's `eval: null`).", ""]
    out += ["From the evaluate stage, as registered on the version (`metric.*` tags); also in the `model-index` above.", ""]
    ppl = []
    val = {r["metric"]: r["value"] for r in rows if r["group"] == "validation"}
    if val:
        ppl.append(["validation blocks (pack's val split)", "-", _g(val.get("perplexity")), _g(val.get("bpb"), 3),
                    _g(val.get("loss"))])
    held: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["group"] == "heldout":
            held.setdefault(r["lang"], {})[r["metric"]] = r["value"]
    for lang, v in _by_language(held):
        ppl.append([f"held-out {LANGUAGE_NAMES.get(lang, lang)} documents", _n(v.get("tokens")), _g(v.get("perplexity")),
                    _g(v.get("bits_per_byte"), 3), "-"])
    if ppl:
        out += [*_table(["text", "tokens", "perplexity", "bits per byte", "loss"], ppl), "",
                "Measured with this model's own tokenizer on documents it never trained on; bits per byte compares "
                "across tokenizers, perplexity does not.", ""]
    tasks: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["group"] == "lm_eval":
            tasks.setdefault(r["task"], {})[r["metric"]] = r["value"]
    if tasks:
        others = sorted({m for v in tasks.values() for m in v} - {"acc", "acc_norm"})
        out += [*_table(["lm-eval task", "accuracy", "accuracy (length-normalised)", *others],
                        [[f"`{t}`", _g(v.get("acc"), 3), _g(v.get("acc_norm"), 3), *(_g(v.get(m), 3) for m in others)]
                         for t, v in sorted(tasks.items())]), ""]
    tool: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["group"] == "tool_use":
            head, _, tail = r["metric"].rpartition("_")  # tool_<measure> overall, tool_<measure>_<lang> per language
            measure, lang = (head, tail) if head and re.fullmatch(r"[a-z]{2}", tail) else (r["metric"], "overall")
            tool.setdefault(measure, {})[lang] = r["value"]
    if tool:
        cols = ["overall", *[x for x, _ in _by_language({k: 0 for v in tool.values() for k in v if k != "overall"})]]
        out += [*_table(["function calling (share of conversations)", *cols],
                        [[m, *(_g(v.get(c), 3) for c in cols)] for m, v in sorted(tool.items())]), ""]
    other = [[r["metric"], _g(r["value"])] for r in rows if r["group"] == "other"]
    if other:
        out += [*_table(["other metric", "value"], other), ""]
    return out


_VARIANT_ORDER = ("gguf-f16", "gguf-q8_0", "gguf-q4_0", "int8")


def _variants(met: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """quantize's variants, largest GGUF first, int8 last (manifests store them sorted by name)."""
    rank = {x: i for i, x in enumerate(_VARIANT_ORDER)}
    return sorted((met.get("variants") or {}).items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _quantized(facts: Facts) -> list[str]:
    out = ["## Quantized variants", ""]
    q = facts.quantized
    if q is None:
        files = ", ".join(f"`{f}`" for f, _ in facts.gguf)
        return out + ["No quantize run of this exact model was found, so no quality deltas are given."
                      + (f" GGUF files included as given: {files} (not measured here)." if files else ""), ""]
    met = q.get("metrics") or {}
    orig = met.get("original") or {}
    in_repo = {v: f for f, v in facts.gguf if v}
    rows = [["original (this repo's safetensors)", "-", _mb(orig.get("size_bytes")), "1.00x", _g(orig.get("perplexity")), "-",
             "yes"]]
    for name, v in _variants(met):
        ratio = v.get("size_ratio")
        delta = v.get("perplexity_delta_pct")
        cpp = v.get("llamacpp_perplexity")
        rows.append([name, v.get("format", "-"), _mb(v.get("size_bytes")), f"{ratio:.2f}x" if isinstance(ratio, (int, float)) else "-",
                     _g(v.get("perplexity")) + (f" (llama.cpp {_g(cpp)})" if cpp is not None else ""),
                     f"{delta:+.2f}%" if isinstance(delta, (int, float)) else "-",
                     f"`{in_repo[name]}`" if name in in_repo else "no"])
    out += [f"Made by the quantize stage from this model; perplexity on {met.get('eval_blocks')} validation blocks of "
            f"{met.get('seq_len')} tokens, the same blocks for every variant.", "",
            *_table(["variant", "format", "size", "vs original", "perplexity", "delta", "in this repo"], rows)]
    extra = [f for f, v in facts.gguf if not v]
    if extra:
        out += ["", f"Also included as given (not measured here): {', '.join(f'`{f}`' for f in extra)}."]
    return out + [""]


def _license(facts: Facts) -> list[str]:
    return ["## License", "",
            f"The weights and files in this repository are released under `{facts.license}`. The training data keep "
            "their own licenses and terms (see *Training data*); check them before relying on this license for "
            "redistribution of the model's outputs or of the data.", ""]


def _tokens_seen(facts: Facts) -> int | None:
    total = sum(int((m.get("metrics") or {}).get("tokens") or 0) for _, m in _stage_entries(facts, "pretrain"))
    return total or None


def _limitations(facts: Facts) -> list[str]:
    params, tokens = facts.params, _tokens_seen(facts)
    langs = _languages(facts)
    out = ["## Limitations", ""]
    if params is not None and params < 100_000_000:
        out += [f"- **Size.** {_n(params)} parameters is a demonstration size: expect fluent-looking but often wrong, "
                "repetitive or nonsensical text, no reliable facts, reasoning or instruction following."]
    elif params is not None:
        out += [f"- **Size.** {_n(params)} parameters: small by current standards; facts and reasoning are unreliable."]
    if tokens is not None:
        per = tokens / params if params else None
        small = tokens < 1_000_000_000
        out += [f"- **Data.** {_n(tokens)} pretraining tokens" + (f" ({per:.2g} per parameter; compute-optimal is about 20)" if per else "")
                + (": a demo-scale corpus, far too little for general use." if small else ".")]
    out += [f"- **Languages.** Trained on {', '.join(LANGUAGE_NAMES.get(x, x) for x in langs)} only; other languages "
            "and code are not supported. Quality differs between languages with their share of the data (see the "
            "token counts)."]
    pack_len = next((int((m.get("metrics") or {}).get("seq_len")) for _, m in _stage_entries(facts, "pack")
                     if (m.get("metrics") or {}).get("seq_len")), None)
    if pack_len:
        out += [f"- **Context.** Pretrained on blocks of {pack_len} tokens; longer inputs are untested even where the "
                f"position limit ({_n(facts.config.get('max_position_embeddings'))}) allows them."]
    dpo = _stage_entries(facts, "dpo")
    out += ["- **Safety.** No safety evaluation was run: the model can produce false, biased, offensive or harmful "
            "text. " + ("Its only preference tuning is DPO on the pairs listed above, not a safety alignment."
                        if dpo else "It had no preference or safety tuning.")]
    out += ["- **Evaluation.** The numbers above are from small held-out sets and the platform's own tasks; they rank "
            "versions of this model, they are not benchmarks to compare with other models."]
    return out + [""]


def _data_fp(value: str | None) -> str:
    """register's llmpipe.data_fingerprint: one fingerprint, or ``artifact=fingerprint;...`` for several phases."""
    if not value:
        return "-"
    parts = [p.split("=", 1) for p in str(value).split(";")]
    return ", ".join(f"`{p[0]}` `{p[1][:12]}`" if len(p) == 2 else f"`{p[0][:16]}`" for p in parts)


def _provenance(facts: Facts) -> list[str]:
    t = facts.tags
    out = ["## Provenance", "",
           f"Registered model `{facts.name}` version {facts.version}, MLflow run `{facts.run_id}`; code version "
           f"`{t.get('llmpipe.code_version', '-')}`, training data fingerprint {_data_fp(t.get('llmpipe.data_fingerprint'))}, "
           f"tokenizer fingerprint `{str(t.get('llmpipe.tokenizer_fingerprint', '-'))[:16]}`. Every artifact the "
           "model came from (`llmpipe lineage`):", ""]
    rows = []
    for e in facts.chain:
        if e.get("missing"):
            rows.append([f"`{e.get('artifact')}/`", "-", "(manifest no longer under the run root)", "-", "-"])
            continue
        rows.append([f"`{e.get('artifact')}/`", e.get("stage") or "-", f"`{str(e.get('fingerprint'))[:12]}`",
                     f"`{str(e.get('config_hash'))[:12]}`", e.get("ended_at") or "-"])
    out += _table(["artifact", "stage", "fingerprint", "config hash", "finished"], rows)
    promo = t.get("promotion.decision")
    if promo:
        out += ["", f"Promotion: {promo} at {t.get('promotion.at')} (compared with version {t.get('promotion.compared_with')})."]
    out += ["", f"Card generated by `llmpipe publish` on {dt.date.today().isoformat()}."]
    return out + [""]


# ------------------------------------------------------------------------------------------- the push


def push(bundle: Bundle, repo_id: str, *, token: str, private: bool = True) -> Any:
    """Create the repo (``exist_ok``; an existing repo keeps its visibility) and upload the folder as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=str(bundle.folder), repo_type="model",
                             commit_message=bundle.commit_message())


# ------------------------------------------------------------------------------------------- the command


EPILOG = """\
examples:
  llmpipe publish models:/llm-pipeline-demo@champion --repo-id me/kk-ru-en-tiny --root runs/demo --dry-run out/hub
  llmpipe publish models:/llm-pipeline-demo@champion --repo-id me/kk-ru-en-tiny --root runs/demo --gguf
  HF_TOKEN=hf_... MLFLOW_TRACKING_URI=http://mlflow:5000 llmpipe publish models:/llm-pipeline/7 --repo-id org/kk-llm

What is pushed: the version's Hugging Face folder (model.safetensors, config.json, generation_config.json,
tokenizer.json, tokenizer_config.json, chat_template.jinja), the GGUF files with --gguf / --gguf-file, and
README.md: a model card from the lineage (data sources and cleaning, token counts, training recipe), the
evaluation (the version's metric.* tags, also as model-index metadata), the quantized variants and their
perplexity deltas, the license and the limitations. --dry-run DIR writes exactly that folder and pushes nothing:
read README.md there before a real push.

The card is richest with --root (the run root's manifests); without it, the run root the version recorded
is read when it is a local folder, else the manifests each stage logged to MLflow. The push needs $HF_TOKEN
(a write token); $HF_ENDPOINT points huggingface_hub at another Hub. The repo is created private unless
--public; an existing repo keeps its visibility. The commit message names the registry version.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "publish",
        help="push a registered model version to the Hugging Face Hub with a model card (or --dry-run DIR)",
        description="Publish models:/NAME@ALIAS (or /VERSION) to the Hugging Face Hub: its transformers folder, "
                    "optional GGUF files and a model card generated from its lineage and evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME@ALIAS (e.g. models:/llm-pipeline@champion) "
                                                          "or models:/NAME/VERSION")
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub repository (user or organisation / name)")
    p.add_argument("--dry-run", metavar="DIR", help="write the folder that would be pushed to DIR (new, empty, or an "
                                                    "earlier dry run's) and print what would be uploaded; push nothing")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--gguf", action="store_true", help="include the GGUF files of the run root's quantized/ (made by "
                                                       "the quantize stage from this very model)")
    p.add_argument("--gguf-file", action="append", default=[], metavar="PATH", help="a GGUF file to include as it "
                                                                                     "is (repeatable)")
    p.add_argument("--license", default=DEFAULT_LICENSE, metavar="ID",
                   help=f"license identifier for the card, as the Hub spells it (default: {DEFAULT_LICENSE})")
    p.add_argument("--root", metavar="URI", help="run root: its manifests and quantized/ (and its embedded MLflow "
                                                 "store when $MLFLOW_TRACKING_URI is unset)")
    return p


def _print_bundle(bundle: Bundle, repo_id: str, private: bool, dry_run: bool) -> None:
    print(f"{bundle.uri}" + (f" (alias {bundle.alias})" if bundle.alias else "") + f" -> {repo_id} "
          f"({'private' if private else 'public'})")
    width = max(len(f) for f, _ in bundle.files)
    for f, size in bundle.files:
        print(f"  {f.ljust(width)}  {_mb(size):>12}")
    print(f"  {len(bundle.files)} files, {_mb(bundle.size_bytes)}; commit message: {bundle.commit_message()!r}")
    for note in bundle.notes:
        print(f"  note: {note}")
    if dry_run:
        print(f"dry run: wrote {bundle.folder}; nothing was uploaded (run again without --dry-run, with $HF_TOKEN set, "
              "to push it)")


def main(args: argparse.Namespace, client: Any) -> int:
    """``llmpipe publish`` after the CLI found the MLflow client."""
    from pipeline.storage import Storage

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per manifest read otherwise
    repo_id = args.repo_id.strip()
    if not _REPO_ID.match(repo_id):
        raise InputError(f"--repo-id {args.repo_id!r} is not a Hub repo id: use ORG/NAME (letters, digits, '-', '_', '.')")
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not args.dry_run and not token:
        raise PipelineError(f"${TOKEN_ENV} is not set: export a Hugging Face write token to push "
                            "(or --dry-run DIR to write the folder without pushing)")
    storage = Storage(args.root, create=False) if args.root else None
    private = not args.public
    options = dict(root_storage=storage, gguf=args.gguf, gguf_files=args.gguf_file, license=args.license,
                   repo_id=repo_id)
    if args.dry_run:
        bundle = build_folder(client, args.model_uri, args.dry_run, **options)
        _print_bundle(bundle, repo_id, private, dry_run=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="llmpipe-publish-") as tmp:
        bundle = build_folder(client, args.model_uri, Path(tmp) / "repo", **options)
        _print_bundle(bundle, repo_id, private, dry_run=False)
        try:
            info = push(bundle, repo_id, token=token, private=private)
        except Exception as exc:  # noqa: BLE001 - the Hub's HTTP errors: one line, not a traceback
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PipelineError(f"the push to {repo_id} failed: {first}") from None
    url = getattr(info, "commit_url", None) or getattr(info, "repo_url", None) or info
    print(f"pushed {bundle.uri} to {repo_id}: {url}")
    return 0
