"""Function calling: one conversation shape for tool use, readers of the public formats into it, and the parser
and scorer of the calls a model makes.

The shape is OpenAI's, which the chat template (:func:`pipeline.data.tokenization.chat_template`) renders in the
Hermes / Qwen 2.5 layout that llama.cpp and vLLM parse back:

* ``tools``: JSON schemas ``[{"type": "function", "function": {"name", "description", "parameters"}}]``, kept in
  an example as one canonical JSON string (Arrow cannot hold schemas whose keys differ between rows);
* an assistant message with ``tool_calls``: ``[{"type": "function", "function": {"name", "arguments"}}]``,
  ``arguments`` as canonical JSON text (``json.dumps(..., ensure_ascii=False)``: what the template prints), the
  content possibly empty;
* ``{"role": "tool", "content": "<result>"}`` messages with the results.

Readers (:func:`to_tool_example`): ``xlam`` (Salesforce xLAM / APIGen: ``query``, ``tools``, ``answers``), ``glaive``
(glaive-function-calling-v2: ``system`` with the function schemas, ``chat`` with ``USER:`` / ``ASSISTANT:`` /
``<functioncall>`` / ``FUNCTION RESPONSE:`` turns), ``hermes`` (NousResearch hermes-function-calling-v1:
``conversations`` of ``from``/``value`` with ``<tools>``, ``<tool_call>`` and ``<tool_response>`` blocks). A record
that does not fit raises :class:`BadToolRecord` with a short reason; the loader counts them by reason and skips
them (public dumps carry a few per thousand).

Scoring (:func:`score_calls`): a model's answer is parsed for ``<tool_call>`` blocks (:func:`parse_tool_calls`); a
call is *valid* when it parses and names a given tool whose JSON schema its arguments satisfy (jsonschema), the
*name* is right when it equals the reference's, the *arguments* are right when they equal the reference's as JSON
values (dict key order ignored; numbers compared as numbers); a reference with no call expects the model to
answer without one (*abstention*).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.errors import InputError

TOOL_FORMATS = ("xlam", "glaive", "hermes")
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class BadToolRecord(InputError):
    """A record of a public tool-use format that does not fit; ``reason`` is what the loader counts by."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


# ------------------------------------------------------------------------------- the one shape


def canonical_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _loads(value: Any, where: str, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadToolRecord(where, f"{what} is not valid JSON", str(exc)) from None
    return value


def _function(entry: Any, where: str, what: str) -> dict[str, Any]:
    """The ``function`` object of an OpenAI-style entry (or the entry itself when bare), which must have a name."""
    fn = entry.get("function") if isinstance(entry, dict) and isinstance(entry.get("function"), dict) else entry
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadToolRecord(where, f"{what} has no name")
    return fn


def check_tools(tools: Any, where: str) -> str:
    """The tools as one canonical JSON string of ``{"type": "function", "function": {...}}`` entries (a bare
    ``{"name", "description", "parameters"}`` is wrapped); :class:`BadToolRecord` when malformed."""
    tools = _loads(tools, where, "tools")
    if not isinstance(tools, list) or not tools:
        raise BadToolRecord(where, "tools is not a non-empty list")
    out = []
    for t in tools:
        fn = _function(t, where, "a tool")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise BadToolRecord(where, "a tool's parameters are not a JSON schema object", fn["name"])
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""),
                                                     "parameters": params}})
    return canonical_json(out)


def check_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """``[{"type": "function", "function": {"name", "arguments": <canonical JSON text>}}]`` from OpenAI-style calls
    or bare ``{"name", "arguments"}`` objects (arguments as an object or JSON text)."""
    calls = _loads(calls, where, "tool calls")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise BadToolRecord(where, "tool calls are not a non-empty list")
    out = []
    for c in calls:
        fn = _function(c, where, "a tool call")
        args = _loads(fn.get("arguments", {}), where, "tool call arguments")
        if not isinstance(args, dict):
            raise BadToolRecord(where, "tool call arguments are not an object", fn["name"])
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": canonical_json(args)}})
    return out


def tool_names(tools_json: str | None) -> set[str]:
    return {t["function"]["name"] for t in json.loads(tools_json)} if tools_json else set()


# ------------------------------------------------------------------------------- public formats


def _xlam(rec: dict, where: str) -> dict[str, Any]:
    query = rec.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadToolRecord(where, "no query")
    tools = check_tools(rec.get("tools"), where)
    answers = _loads(rec.get("answers"), where, "answers")
    if answers in (None, []):  # no tool fits: the model must answer without a call
        raise BadToolRecord(where, "no answers")
    calls = check_tool_calls(answers, where)
    unknown = {c["function"]["name"] for c in calls} - tool_names(tools)
    if unknown:
        raise BadToolRecord(where, "a call names a tool that is not given", ", ".join(sorted(unknown)))
    return {"messages": [{"role": "user", "content": query},
                         {"role": "assistant", "content": "", "tool_calls": calls}], "tools": tools}


_GLAIVE_TURN = re.compile(r"(USER:|ASSISTANT:|FUNCTION RESPONSE:)")


def _glaive(rec: dict, where: str) -> dict[str, Any]:
    system, chat = rec.get("system"), rec.get("chat")
    if not isinstance(system, str) or not isinstance(chat, str) or not chat.strip():
        raise BadToolRecord(where, "no system/chat text")
    sys_text = system.split("SYSTEM:", 1)[-1].strip()
    schemas, prose = [], sys_text
    brace = sys_text.find("{")
    if brace >= 0:
        prose, blob = sys_text[:brace].strip(), sys_text[brace:]
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(blob):
            while pos < len(blob) and blob[pos] in " \n\t,":
                pos += 1
            if pos >= len(blob):
                break
            try:
                obj, pos = decoder.raw_decode(blob, pos)
            except json.JSONDecodeError:
                raise BadToolRecord(where, "function schema in system is not valid JSON") from None
            schemas.append(obj)
    parts = [p.strip() for p in _GLAIVE_TURN.split(chat) if p.strip()]
    messages: list[dict[str, Any]] = [{"role": "system", "content": prose}] if prose else []
    role = None
    for p in parts:
        if p in ("USER:", "ASSISTANT:", "FUNCTION RESPONSE:"):
            role = p
            continue
        text = p.replace("<|endoftext|>", "").strip()
        if role == "USER:":
            messages.append({"role": "user", "content": text})
        elif role == "FUNCTION RESPONSE:":
            messages.append({"role": "tool", "content": text})
        elif role == "ASSISTANT:":
            if text.startswith("<functioncall>"):
                body = text[len("<functioncall>"):].strip()
                # glaive writes arguments as a single-quoted JSON string inside JSON: '{"a": 1}'
                body = re.sub(r"'(\{.*\})'", lambda m: json.dumps(m.group(1)), body, flags=re.S)
                call = _loads(body, where, "<functioncall>")
                messages.append({"role": "assistant", "content": "", "tool_calls": check_tool_calls(call, where)})
            else:
                messages.append({"role": "assistant", "content": text})
        else:
            raise BadToolRecord(where, "chat text before the first USER:/ASSISTANT: marker")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadToolRecord(where, "no assistant turn")
    out: dict[str, Any] = {"messages": messages}
    if schemas:
        out["tools"] = check_tools(schemas, where)
    return out


_HERMES_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "tool": "tool"}


def _hermes(rec: dict, where: str) -> dict[str, Any]:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadToolRecord(where, "no conversations")
    tools = rec.get("tools")
    messages: list[dict[str, Any]] = []
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("from") not in _HERMES_ROLES or not isinstance(turn.get("value"), str):
            raise BadToolRecord(where, "a turn is not {from, value} with a known role")
        role, text = _HERMES_ROLES[turn["from"]], turn["value"]
        if role == "system":
            m = re.search(r"<tools>\s*(.*?)\s*</tools>", text, re.S)
            if m and tools is None:
                tools = m.group(1)
            text = re.sub(r"<tools>.*?</tools>", "", text, flags=re.S).strip()
            if text:
                messages.append({"role": "system", "content": text})
        elif role == "assistant":
            calls = [_loads(c, where, "<tool_call>") for c in _CALL_RE.findall(text)]
            content = _CALL_RE.sub("", text).strip()
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = check_tool_calls(calls, where)
            messages.append(msg)
        elif role == "tool":
            for body in re.findall(r"<tool_response>\s*(.*?)\s*</tool_response>", text, re.S) or [text]:
                messages.append({"role": "tool", "content": body})
        else:
            messages.append({"role": "user", "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadToolRecord(where, "no assistant turn")
    out: dict[str, Any] = {"messages": messages}
    if tools is not None:
        if isinstance(tools, str):  # hermes writes a Python-ish list of dicts in <tools>: JSON in practice
            tools = tools.strip()
        out["tools"] = check_tools(tools, where)
    return out


READERS = {"xlam": _xlam, "glaive": _glaive, "hermes": _hermes}


def detect_tool_format(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "query" in rec and "answers" in rec:
        return "xlam"
    if "chat" in rec and "system" in rec:
        return "glaive"
    if "conversations" in rec:
        return "hermes"
    return None


def to_tool_example(rec: Any, where: str, fmt: str) -> dict[str, Any]:
    """``{"messages": [...], "tools": <JSON string>?}`` from a record of a public tool-use format."""
    if not isinstance(rec, dict):
        raise BadToolRecord(where, "not a JSON object")
    return READERS[fmt](rec, where)


# ------------------------------------------------------------------------------- model output


def parse_tool_calls(text: str) -> tuple[list[dict[str, Any]], int]:
    """(the calls in a model's answer as ``{"name", "arguments": dict}``, how many ``<tool_call>`` blocks did not
    parse as ``{"name": str, "arguments": object}``)."""
    calls, bad = [], 0
    for body in _CALL_RE.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            bad += 1
            continue
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            bad += 1
            continue
        calls.append({"name": obj["name"], "arguments": args})
    if "<tool_call>" in text and text.count("<tool_call>") > len(calls) + bad:  # an unclosed block
        bad += text.count("<tool_call>") - len(calls) - bad
    return calls, bad


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def score_calls(answer: str, reference: list[dict[str, Any]], tools_json: str | None) -> dict[str, bool]:
    """One item's scores: ``valid`` (every call parses, names a given tool and satisfies its schema), ``name`` (the
    called names equal the reference's, as a multiset), ``arguments`` (each reference call matched by a call with
    that name and equal arguments, order of calls and keys ignored), ``abstained`` (no call; right when the
    reference has none). ``reference``: ``[{"name", "arguments": dict}]``, empty when no tool fits."""
    import jsonschema

    calls, bad = parse_tool_calls(answer)
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in json.loads(tools_json or "[]")}
    valid = bad == 0 and bool(calls)
    for c in calls:
        schema = schemas.get(c["name"])
        if schema is None:
            valid = False
            continue
        try:
            jsonschema.validate(c["arguments"], schema)
        except (jsonschema.ValidationError, jsonschema.SchemaError):
            valid = False
    names_ok = sorted(c["name"] for c in calls) == sorted(r["name"] for r in reference)
    remaining = list(calls)
    args_ok = names_ok
    for r in reference:
        match = next((c for c in remaining if c["name"] == r["name"] and _same_value(c["arguments"], r["arguments"])), None)
        if match is None:
            args_ok = False
            break
        remaining.remove(match)
    abstained = not calls and bad == 0
    return {"valid": valid, "name": names_ok and bool(reference), "arguments": args_ok and bool(reference),
            "abstained": abstained, "expected_call": bool(reference)}
