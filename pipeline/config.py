"""The core of every stage config: loading from YAML with ``--set`` overrides, validation, hashing.

Each stage's config class lives beside the code it configures (``Stage.config`` names it); this
module keeps what they all share. YAML keys mirror the model fields one to one. Unknown keys and
wrong types are rejected with the dotted field path, the offending value and a hint. ``${VAR}`` /
``${VAR:-default}`` in string values are expanded from the environment, so one file serves a
laptop and a cluster.

Fields declared with :func:`ExecField` change how a stage runs (process counts, progress bars,
checkpoint cadence) but not what it produces; they are left out of the config hash that decides
whether a stage is up to date.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError


class StrictModel(BaseModel):
    """Base for every config object: unknown keys are errors, assignment is validated."""

    # inf and nan are refused in every float field: no setting of ours means anything infinite (--set lr=.inf
    # would train into nan and fail much later)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


EXECUTION_ONLY = "execution_only"


def ExecField(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - used like pydantic's Field
    """A ``Field`` that changes how a stage runs, not what it produces (process counts, logging, checkpoint
    cadence): it is left out of :func:`config_hash`, so changing it does not make a committed output stale."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[EXECUTION_ONLY] = True
    return Field(*args, json_schema_extra=extra, **kwargs)


def execution_only(model: type[BaseModel]) -> set[str]:
    """The fields of ``model`` declared with :func:`ExecField`."""
    return {name for name, f in model.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(EXECUTION_ONLY)}


_ARTIFACT_RE = r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$"
ArtifactName = Annotated[str, Field(pattern=_ARTIFACT_RE, max_length=120)]


def distinct_io(cfg: Any) -> Any:
    """A stage's config names its input and output artifacts; they must differ."""
    if cfg.input == cfg.output:
        raise ValueError(f"input and output are both {cfg.output!r}: a stage cannot overwrite what it reads")
    return cfg


# --------------------------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_CONFIG_VALUES = 100_000  # scalars, lists and mappings a config may hold once aliases are expanded
MAX_CONFIG_BYTES = 1 << 20


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML itself would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one mapping "
                                  f"(first at line {seen[key] + 1}); YAML would keep the last silently")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any, limit: int) -> int:
    """How many values ``value`` holds with every shared (aliased) object counted each time it appears, computed
    once per distinct object; stops counting past ``limit``."""
    memo: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        key = id(v)
        if key not in memo:
            memo[key] = limit + 1  # a cycle counts as too big
            children = v.values() if isinstance(v, dict) else v
            total = 1
            for c in children:
                total += size(c)
                if total > limit:
                    break
            memo[key] = total
        return memo[key]

    return size(value)


def parse_yaml(text: str, source: str) -> Any:
    """A config file's YAML, bounded: at most MAX_CONFIG_BYTES of text and MAX_CONFIG_VALUES values once aliases are
    expanded (a 400-byte alias bomb would otherwise expand to billions), no key twice in a mapping. ConfigError
    with the file and line otherwise."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {source} is {len(text):,} characters; a config is at most {MAX_CONFIG_BYTES:,}")
    try:
        loaded = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"config file {source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(f"config file {source} nests too deeply") from None
    n = _expanded_size(loaded, MAX_CONFIG_VALUES)
    if n > MAX_CONFIG_VALUES:
        raise ConfigError(f"config file {source} expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
                          "repeating lists?); a stage config is far smaller")
    return loaded


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable ${{{name}}} is not set (write ${{{name}:-default}} for a fallback)")

        return _ENV_RE.sub(repl, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    return value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set dedup.threshold=0.85")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_ConfigLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError):
        value = raw
    except ConfigError as exc:
        raise ConfigError(f"--set {assignment!r}: {exc}") from None
    if _expanded_size(value, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(f"--set {key.strip()}=...: the value expands to more than {MAX_CONFIG_VALUES:,} values")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Suggest the closest valid key for an unknown one."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            return ""
        cls = sub[0]
    fields = list(getattr(cls, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid keys: {', '.join(f for f in fields)})" if fields else ""


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key{_hint(model, loc)}")
        else:
            shown = err.get("input")
            value = "" if isinstance(shown, (dict, list)) or shown is None else f" (got {shown!r})"
            lines.append(f"  {path}: {err['msg']}{value}")
    return "\n".join(lines)


def load_config(model: type[StrictModel], path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Any:
    """Read a config of class ``model`` from YAML (or start empty), apply overrides, validate.
    (:func:`pipeline.stages.load_config` does this for a stage by name.)"""
    source = str(path) if path else "(defaults)"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
        loaded = parse_yaml(text, str(p))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    for assignment in overrides or []:
        apply_override(data, assignment)
    data = _expand_env(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def config_hash(cfg: StrictModel) -> str:
    """Hash of the fields that decide a stage's output (the :func:`ExecField` ones left out)."""
    exclude = execution_only(type(cfg))
    payload = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
