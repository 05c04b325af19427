"""Triton's ModelConfig for one classifier, built once: the exported config.pbtxt and the server's
`/v2/models/<name>/config` (HTTP and gRPC) are renderings of the same dict, so they cannot drift.

The dict uses the field names of Triton's `model_config.proto` (what Triton's JSON answer and
`google.protobuf.json_format` use); `to_pbtxt` writes it in protobuf text format. Pure Python:
exporting a repository needs no protobuf or tritonclient (tests parse the text with Triton's own
`ModelConfig` message).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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
