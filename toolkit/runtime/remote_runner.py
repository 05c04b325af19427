"""A model behind an Open Inference Protocol (KServe v2) server: Triton, KServe, or `toolkit serve`.

`toolkit eval -m http://host:8000/resnet20` evaluates a served model exactly like a local file:
batches go out as FP32 tensors with the binary-data extension and logits come back. The card comes
from the model config's `parameters["toolkit.card"]` (our server and toolkit-exported Triton
repositories); otherwise it is rebuilt from the metadata: input size -> CIFAR or ImageNet preset,
class labels from one classification-extension request, generic names as the last resort.
Standard library HTTP only (no torch, no tritonclient).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from ..card import ModelCard, generic_class_names, preset
from ..errors import (
    BackendUnavailableError,
    DataError,
    InputError,
    ModelFormatError,
    ToolkitError,
    UsageError,
)
from ..v2 import (
    CARD_PARAMETER,
    HEADER_LENGTH,
    ProtocolError,
    RequestedOutput,
    Tensor,
    decode_response,
    encode_request,
    parse_classification,
)
from .base import Runner


class RemoteError(ToolkitError):
    """The server answered with an error or could not be reached."""


def parse_url(url: str) -> tuple[str, str, int, str, str, str]:
    """`http://host:port/<model>` or `.../v2/models/<model>[/versions/<v>]`
    -> (scheme, host, port, prefix, model, version)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{url}: expected http://host:port/<model> or http://host:port/v2/models/<model>")
    segments = [s for s in parts.path.split("/") if s]
    version = ""
    if "models" in segments and "v2" in segments:
        v2_at = segments.index("v2")
        prefix, rest = segments[:v2_at], segments[v2_at + 2:]
    else:
        prefix, rest = segments[:-1], segments[-1:]
    if len(rest) >= 3 and rest[1] == "versions":
        version = rest[2]
    if not rest:
        raise UsageError(f"{url}: the URL names no model; use http://host:port/<model>")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, "/" + "/".join(prefix) if prefix else "", rest[0], version


class RemoteRunner(Runner):
    """Runner over HTTP to a v2 inference server; keeps one persistent connection per thread."""

    backend = "remote"

    def __init__(self, url: str, card: ModelCard, *, input_name: str, output_name: str,
                 headers: dict[str, str], timeout: float, max_batch_size: int | None,
                 device: str = "remote") -> None:
        super().__init__(card, source=url, device=device, max_batch_size=max_batch_size)
        self.url = url
        self.scheme, self.host, self.port, prefix, self.model, self.version = parse_url(url)
        base = f"{prefix}/v2/models/{quote(self.model, safe='')}"
        self._model_path = base + (f"/versions/{quote(self.version, safe='')}" if self.version else "")
        self.input_name, self.output_name = input_name, output_name
        self._headers = headers
        self._timeout = timeout
        self._local = threading.local()

    # --- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, device: str = "cpu", api_key: str | None = None, timeout: float = 60.0,
             card: ModelCard | None = None) -> RemoteRunner:
        """Read metadata + config, build the card, and check the model is ready. `api_key` defaults to
        $TOOLKIT_API_KEY; `card` replaces the one the server describes."""
        key = api_key or os.environ.get("TOOLKIT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        probe = cls(url, card or _placeholder_card(), input_name="input", output_name="logits",
                    headers=headers, timeout=timeout, max_batch_size=None, device=device)
        metadata = probe._get_json(probe._model_path)
        try:
            config = probe._get_json(probe._model_path + "/config")
        except RemoteError:
            config = {}
        inputs, outputs = metadata.get("inputs") or [], metadata.get("outputs") or []
        if len(inputs) != 1 or not outputs:
            raise ModelFormatError(f"{url}: expected a model with one input and an output, got "
                                   f"{len(inputs)} inputs and {len(outputs)} outputs")
        if inputs[0].get("datatype") != "FP32":
            raise ModelFormatError(f"{url}: input {inputs[0].get('name')} is {inputs[0].get('datatype')}; "
                                   "the toolkit sends FP32 NCHW images")
        probe.input_name, probe.output_name = inputs[0]["name"], outputs[0]["name"]
        max_batch = config.get("max_batch_size")
        probe.max_batch_size = int(max_batch) if isinstance(max_batch, int) and max_batch > 0 else None
        probe.card = card or _card_from_config(config) or probe._card_from_metadata(inputs[0], outputs[0])
        return probe

    def _card_from_metadata(self, inp: dict[str, Any], out: dict[str, Any]) -> ModelCard:
        shape = [int(d) for d in inp.get("shape", [])]
        chw = shape[-3:]
        if len(chw) != 3 or chw[0] != 3 or min(chw) < 1:
            raise ModelFormatError(f"{self.url}: input shape {shape} is not [N,] 3, H, W")
        out_shape = [int(d) for d in out.get("shape", [])]
        num_classes = out_shape[-1] if out_shape and out_shape[-1] > 0 else None
        if num_classes is None:
            raise ModelFormatError(f"{self.url}: output shape {out_shape} does not give the number of "
                                   "classes")
        name = "imagenet" if chw[1] >= 64 else ("cifar100" if num_classes == 100 else "cifar10")
        values = preset(name)
        fallback = values["class_names"]
        if len(fallback) != num_classes:
            fallback = generic_class_names(num_classes)
        labels = self._labels(chw, num_classes) or fallback
        resize = values["resize_size"] if name == "imagenet" else chw[1]
        return ModelCard(arch=f"remote:{self.model}", class_names=labels, input_size=(chw[0], chw[1], chw[2]),
                         mean=values["mean"], std=values["std"], resize_size=max(resize, chw[1], chw[2]),
                         interpolation=values["interpolation"],
                         extra={"card_source": f"preset {name} (server sent no card)"})

    def _labels(self, chw: list[int], num_classes: int) -> tuple[str, ...] | None:
        """Class labels by index through the classification extension (Triton's label_filename)."""
        try:
            out = self._post_infer(np.zeros((1, *chw), np.float32),
                                   RequestedOutput(self.output_name, True, num_classes))
        except ToolkitError:
            return None
        labels: dict[int, str] = {}
        for item in np.asarray(out).reshape(-1):
            _, index, label = parse_classification(item)
            if label is None:
                return None
            labels[index] = label
        if sorted(labels) != list(range(num_classes)):
            return None
        return tuple(labels[i] for i in range(num_classes))

    # --- HTTP ----------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            factory = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = factory(self.host, self.port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        all_headers = {**self._headers, **(headers or {})}
        for attempt in (0, 1):  # one retry on a keep-alive connection the server closed meanwhile
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=all_headers)
                response = conn.getresponse()
                payload = response.read()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, payload
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt == 1 or isinstance(exc, TimeoutError):
                    raise BackendUnavailableError(f"{self.url}: cannot reach the server ({exc})") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _error_text(status: int, payload: bytes) -> str:
        try:
            return str(json.loads(payload).get("error") or payload[:200])
        except (ValueError, AttributeError):
            return payload[:200].decode("utf-8", "replace") or f"HTTP {status}"

    def _get_json(self, path: str) -> dict[str, Any]:
        status, _, payload = self._request("GET", path)
        if status == 404:
            raise ModelFormatError(f"{self.url}: the server has no model {self.model!r} "
                                   f"({self._error_text(status, payload)})")
        if status == 401:
            raise UsageError(f"{self.url}: the server wants an API key (set TOOLKIT_API_KEY)")
        if status != 200:
            raise RemoteError(f"{self.url}: GET {path} answered {status}: "
                              f"{self._error_text(status, payload)}")
        try:
            return json.loads(payload)
        except ValueError:
            raise RemoteError(f"{self.url}: GET {path} did not answer JSON") from None

    def _post_infer(self, batch: np.ndarray, output: RequestedOutput) -> np.ndarray:
        body, header_length = encode_request([Tensor(self.input_name, batch)], [output], binary=True)
        headers = {"Content-Type": "application/octet-stream"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        status, response_headers, payload = self._request("POST", self._model_path + "/infer", body, headers)
        if status != 200:
            message = f"{self.url}: inference failed with HTTP {status}: {self._error_text(status, payload)}"
            if status in (400, 413, 415):
                raise InputError(message)
            if status in (503, 504):
                raise BackendUnavailableError(message)
            raise RemoteError(message)
        try:
            outputs = decode_response(payload, response_headers.get(HEADER_LENGTH.lower()))
        except ProtocolError as exc:
            raise RemoteError(f"{self.url}: unreadable inference response ({exc})") from None
        if self.output_name not in outputs:
            raise RemoteError(f"{self.url}: the response lacks output {self.output_name!r}")
        return outputs[self.output_name]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._post_infer(batch, RequestedOutput(self.output_name, True)), dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.model, "input": self.input_name,
                "output": self.output_name}

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _placeholder_card() -> ModelCard:
    return ModelCard(arch="remote", class_names=("?",), input_size=(3, 32, 32), resize_size=32)


def _card_from_config(config: dict[str, Any]) -> ModelCard | None:
    """The card a toolkit server (or a toolkit Triton repository) put in the config parameters."""
    raw = (config.get("parameters") or {}).get(CARD_PARAMETER)
    text = raw.get("string_value") if isinstance(raw, dict) else raw
    if not text:
        return None
    try:
        return ModelCard.from_json(text)
    except (DataError, UsageError, TypeError):
        return None
