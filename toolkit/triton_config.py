"""Triton's ModelConfig for one classifier, built once: the exported config.pbtxt and the server's
`/v2/models/<name>/config` (HTTP and gRPC) are renderings of the same dict, so they cannot drift.

The dict uses the field names of Triton's `model_config.proto` (what Triton's JSON answer and
`google.protobuf.json_format` use); `to_pbtxt` writes it in protobuf text format and `parse` reads it
back (`toolkit serve --model-repository`), with `serving_settings` and `select_versions` saying what a
config asks of a server as Triton reads it. Pure Python: exporting or serving a repository needs no
protobuf or tritonclient (tests check both directions with Triton's own `ModelConfig` message).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .card import ModelCard
from .v2 import CARD_PARAMETER

LABELS_FILE = "labels.txt"
_ENUM_FIELDS = frozenset({"data_type", "kind", "format"})  # written unquoted in text format
_ENUM_VALUE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_MAP_FIELDS = frozenset({"parameters"})  # map<string, ModelParameter>: repeated {key, value} in text format


def tensor(name: str, data_type: str, dims: Sequence[int],
           label_filename: str | None = None) -> dict[str, Any]:
    """One ModelInput/ModelOutput (dims without the batch dim when the model batches)."""
    entry: dict[str, Any] = {"name": name, "data_type": data_type, "dims": [int(d) for d in dims]}
    if label_filename:
        entry["label_filename"] = label_filename
    return entry


def build(*, name: str, platform: str, max_batch_size: int, inputs: Sequence[Mapping[str, Any]],
          outputs: Sequence[Mapping[str, Any]], card: ModelCard, instance_count: int = 1,
          kind: str = "KIND_CPU", dynamic_batching: bool = True,
          preferred_batch_sizes: Sequence[int] | None = None, max_queue_delay_us: int = 0,
          queue_policy: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Triton's ModelConfig as a dict. The card rides along as the string parameter `toolkit.card`:
    Triton hands it back from GET /v2/models/<name>/config, so a remote client rebuilds the exact
    preprocessing and class names (backends ignore parameters they do not know)."""
    card_json = json.dumps(card.to_dict(), separators=(",", ":"), ensure_ascii=True)
    config: dict[str, Any] = {"name": name, "platform": platform, **extra,
                              "max_batch_size": int(max_batch_size), "input": [dict(i) for i in inputs],
                              "output": [dict(o) for o in outputs],
                              "parameters": {CARD_PARAMETER: {"string_value": card_json}},
                              "instance_group": [{"count": int(instance_count), "kind": kind}]}
    if dynamic_batching and max_batch_size > 0:
        batching: dict[str, Any] = {}
        if preferred_batch_sizes:
            batching["preferred_batch_size"] = [int(b) for b in preferred_batch_sizes]
        batching["max_queue_delay_microseconds"] = int(max_queue_delay_us)
        if queue_policy:
            batching["default_queue_policy"] = dict(queue_policy)
        config["dynamic_batching"] = batching
    return config


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if key in _ENUM_FIELDS and _ENUM_VALUE.match(str(value)):
        return str(value)
    return _quote(str(value))


def _lines(config: Mapping[str, Any], indent: str) -> list[str]:
    out: list[str] = []
    for key, value in config.items():
        if key in _MAP_FIELDS and isinstance(value, Mapping):
            for map_key, map_value in value.items():
                out += [f"{indent}{key} {{", f"{indent}  key: {_quote(str(map_key))}", f"{indent}  value {{",
                        *_lines(map_value, indent + "    "), f"{indent}  }}", f"{indent}}}"]
        elif isinstance(value, Mapping):
            out += [f"{indent}{key} {{", *_lines(value, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            out.append(f"{indent}{key} [")
            for i, item in enumerate(value):
                out += [f"{indent}  {{", *_lines(item, indent + "    "),
                        f"{indent}  }}" + ("," if i < len(value) - 1 else "")]
            out.append(f"{indent}]")
        elif isinstance(value, list):
            out.append(f"{indent}{key}: [ " + ", ".join(_scalar(key, v) for v in value) + " ]")
        else:
            out.append(f"{indent}{key}: {_scalar(key, value)}")
    return out


def to_pbtxt(config: Mapping[str, Any]) -> str:
    """`config` in protobuf text format (config.pbtxt)."""
    return "\n".join(_lines(config, "")) + "\n"


# --- reading config.pbtxt (what `toolkit serve --model-repository` honours) -----------------------------

_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')"""
                    r"""|(?P<word>[-+]?[A-Za-z0-9_.+-]+)|(?P<punct>[{}\[\]<>:,;])""")
_CLOSE = {"{": "}", "<": ">"}
# repeated fields of model_config.proto: a list even when the text names them once
_REPEATED = frozenset({"input", "output", "dims", "instance_group", "preferred_batch_size", "gpus",
                       "versions", "profile", "shape", "batch_input", "batch_output", "model_warmup", "step"})
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


class ConfigSyntaxError(ValueError):
    """config.pbtxt is not protobuf text format (the message names the line)."""


def _tokens(text: str) -> list[tuple[str, str, int]]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            line = text.count("\n", 0, position) + 1
            raise ConfigSyntaxError(f"line {line}: unexpected {text[position:position + 20]!r}")
        kind = match.lastgroup
        if kind is not None:
            tokens.append((kind, match.group(kind), text.count("\n", 0, position) + 1))
        position = match.end()
    return tokens


def _unquote(token: str) -> str:
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _scalar_value(word: str) -> Any:
    if word in ("true", "True"):
        return True
    if word in ("false", "False"):
        return False
    for cast in (int, float):
        try:
            return cast(word)
        except ValueError:
            continue
    return word  # an enum value (KIND_CPU, TYPE_FP32)


class _Reader:
    """A recursive-descent reader of protobuf text format into dicts with model_config.proto's names."""

    def __init__(self, text: str) -> None:
        self.tokens, self.at = _tokens(text), 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise ConfigSyntaxError(f"unexpected end of text{f'; expected {expected!r}' if expected else ''}")
        if expected is not None and token[1] != expected:
            raise ConfigSyntaxError(f"line {token[2]}: expected {expected!r}, found {token[1]!r}")
        self.at += 1
        return token

    def message(self, close: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        while (token := self.peek()) is not None and token[1] != close:
            if token[1] in (",", ";"):
                self.at += 1
                continue
            kind, name, line = self.take()
            if kind != "word":
                raise ConfigSyntaxError(f"line {line}: expected a field name, found {name!r}")
            if self.peek() is not None and self.peek()[1] == ":":  # type: ignore[index]
                self.at += 1
            value = self.value()
            if name == "parameters" and isinstance(value, dict) and "key" in value:
                fields.setdefault(name, {})[str(value["key"])] = value.get("value", {})
            elif name in fields or name in _REPEATED:
                existing = fields.setdefault(name, [])
                existing.extend(value if isinstance(value, list) else [value])
            else:
                fields[name] = value
        if close is not None:
            self.take(close)
        return fields

    def value(self) -> Any:
        kind, text, line = self.take()
        if text in _CLOSE:
            return self.message(_CLOSE[text])
        if text == "[":
            items: list[Any] = []
            while self.peek() is not None and self.peek()[1] != "]":  # type: ignore[index]
                if self.peek()[1] == ",":  # type: ignore[index]
                    self.at += 1
                    continue
                items.append(self.value())
            self.take("]")
            return items
        if kind == "string":
            parts = [_unquote(text)]
            while (following := self.peek()) is not None and following[0] == "string":  # "a" "b" is "ab"
                parts.append(_unquote(self.take()[1]))
            return "".join(parts)
        if kind == "word":
            return _scalar_value(text)
        raise ConfigSyntaxError(f"line {line}: unexpected {text!r}")


def parse(text: str) -> dict[str, Any]:
    """config.pbtxt (protobuf text format) as a dict with model_config.proto's field names: repeated fields
    as lists, `parameters` as {key: value}; numbers, booleans and enum names as Python values. Raises
    ConfigSyntaxError naming the line."""
    return _Reader(text).message(None)


@dataclass(frozen=True)
class ServingSettings:
    """What a model's config says about serving it, with Triton's defaults where it is silent."""

    max_batch_size: int = 0
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    max_queue_size: int | None = None  # default_queue_policy.max_queue_size (0/None: unbounded in Triton)
    timeout_us: int | None = None  # default_queue_policy.default_timeout_microseconds
    instance_count: int = 1
    kind: str = "KIND_AUTO"
    version_policy: Mapping[str, Any] = field(default_factory=lambda: {"latest": {"num_versions": 1}})


def serving_settings(config: Mapping[str, Any]) -> ServingSettings:
    """The serving settings of a parsed config (Triton's defaults: no batching across requests without
    `dynamic_batching`, one instance, the latest version)."""
    batching = config.get("dynamic_batching")
    queue = batching.get("default_queue_policy", {}) if isinstance(batching, Mapping) else {}
    groups = [g for g in config.get("instance_group", []) if isinstance(g, Mapping)]
    count = sum(int(g.get("count", 1)) for g in groups) if groups else 1
    policy = config.get("version_policy") or {"latest": {"num_versions": 1}}
    if not isinstance(policy, Mapping) or len(policy) != 1 or next(iter(policy)) not in _POLICIES:
        raise ConfigSyntaxError(f"version_policy must be one of {', '.join(_POLICIES)}")
    return ServingSettings(
        max_batch_size=int(config.get("max_batch_size", 0)), dynamic_batching=isinstance(batching, Mapping),
        max_queue_delay_us=int(batching.get("max_queue_delay_microseconds", 0)) if batching else 0,
        max_queue_size=int(queue["max_queue_size"]) if "max_queue_size" in queue else None,
        timeout_us=int(queue["default_timeout_microseconds"]) if "default_timeout_microseconds" in queue
        else None, instance_count=max(1, count), kind=str(groups[0].get("kind", "KIND_AUTO")) if groups
        else "KIND_AUTO", version_policy=dict(policy))


_POLICIES = ("latest", "all", "specific")


def select_versions(policy: Mapping[str, Any], available: Sequence[int]) -> list[int]:
    """The versions a version_policy serves out of those present, highest first (Triton's rules: `latest`
    the `num_versions` highest, `all` every one, `specific` those listed that exist)."""
    present = sorted(set(available), reverse=True)
    kind, settings = next(iter(policy.items()))
    settings = settings if isinstance(settings, Mapping) else {}
    if kind == "all":
        return present
    if kind == "specific":
        wanted = {int(v) for v in settings.get("versions", [])}
        return [v for v in present if v in wanted]
    return present[:max(1, int(settings.get("num_versions", 1)))]
