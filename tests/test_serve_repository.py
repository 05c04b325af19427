"""A Triton-layout model repository as the server reads it, and model control with Triton's semantics.

config.pbtxt is read by `toolkit.triton_config.parse` and checked against Triton's own `ModelConfig`
protobuf (text_format, the reference); version policies and settings against Triton's documented
rules; `ModelControl` against a fleet that records what it was asked, in order; and a real single-process
server, whose unload must let every request it accepted finish.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.config import ServeConfig
from serve.control import ModelControl
from serve.errors import ModelLoadError, RepositoryControlError, ServeStartupError, UnknownModelError
from serve.models import IndexEntry, ModelDescription
from serve.repository import FileModels, ModelSettings, RepositoryModels, VersionSpec
from support.serve import SlowRunner, running_server
from toolkit import triton_config
from toolkit.engines import RunnerSpec

CONFIG = """
name: "m"  # a comment
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "input", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] } ]
output { name: "logits" data_type: TYPE_FP32 dims: 10 label_filename: "labels.txt" }
instance_group [ { count: 2 kind: KIND_CPU }, { count: 1, kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 500 default_queue_policy { max_queue_size: 7 } }
version_policy: { specific: { versions: [1, 3] } }
parameters { key: "toolkit.card" value { string_value: "{\\"a\\": \\"b c\\"}" } }
parameters: { key: "other", value: { string_value: 'single' "-joined" } }
"""


def _reference(text: str) -> dict:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    return json_format.MessageToDict(text_format.Parse(text, model_config_pb2.ModelConfig()),
                                     preserving_proto_field_name=True)


def _ours(text: str) -> dict:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    message = json_format.ParseDict(triton_config.parse(text), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@pytest.mark.parametrize("which", ["hand-written", "exported"])
def test_parse_reads_config_pbtxt_as_triton_protobuf_does(which, sample_card):
    text = CONFIG if which == "hand-written" else triton_config.to_pbtxt(triton_config.build(
        name="x", platform="onnxruntime_onnx", max_batch_size=16, card=sample_card,
        inputs=[triton_config.tensor("input", "TYPE_FP32", [3, 32, 32])],
        outputs=[triton_config.tensor("logits", "TYPE_FP32", [10], "labels.txt")],
        max_queue_delay_us=100, queue_policy={"max_queue_size": 5, "default_timeout_microseconds": 9}))
    assert _ours(text) == _reference(text)


@pytest.mark.parametrize("text, says", [("max_batch_size: 8 input [ {", "end of text"),
                                        ("name: \"m\"\n  max_batch_size: @", "line 2"),
                                        ("input { name: \"x\" ]", "line 1")])
def test_parse_refuses_broken_text_naming_the_line(text, says):
    with pytest.raises(triton_config.ConfigSyntaxError, match=says):
        triton_config.parse(text)


def test_serving_settings_follow_tritons_defaults():
    settings = triton_config.serving_settings(triton_config.parse(CONFIG))
    assert (settings.max_batch_size, settings.dynamic_batching, settings.max_queue_delay_us) == (8, True, 500)
    assert (settings.max_queue_size, settings.instance_count, settings.kind) == (7, 3, "KIND_CPU")
    bare = triton_config.serving_settings(triton_config.parse('name: "m" max_batch_size: 4'))
    assert (bare.dynamic_batching, bare.instance_count, bare.version_policy) == (
        False, 1, {"latest": {"num_versions": 1}})
    assert triton_config.serving_settings(triton_config.parse("dynamic_batching { }")).dynamic_batching


@pytest.mark.parametrize("policy, expected", [
    ({"latest": {"num_versions": 1}}, [7]), ({"latest": {"num_versions": 2}}, [7, 3]),
    ({"all": {}}, [7, 3, 1]), ({"specific": {"versions": [1, 3, 9]}}, [3, 1])])
def test_version_policies_choose_as_triton_does(policy, expected):
    assert triton_config.select_versions(policy, [1, 3, 7]) == expected


# --- reading a repository folder ------------------------------------------------------------------------

def _folder(root: Path, name: str, config: str | None, versions: tuple[int, ...] = (1,),
            filename: str = "model.onnx") -> Path:
    folder = root / name
    folder.mkdir()
    for version in versions:
        (folder / str(version)).mkdir(parents=True)
        (folder / str(version) / filename).write_bytes(b"weights")
    if config is not None:
        (folder / "config.pbtxt").write_text(config, "utf-8")
    return folder


def test_repository_reads_versions_settings_and_failures(tmp_path):
    config = ServeConfig(max_batch_size=32, max_queue=99, timeout_s=3)
    _folder(tmp_path, "two", 'name: "two" max_batch_size: 4 dynamic_batching { max_queue_delay_microseconds: '
            '2000 } version_policy { latest { num_versions: 2 } }', versions=(1, 2, 3))
    _folder(tmp_path, "bare", None)
    _folder(tmp_path, "python", 'backend: "python"', filename="model.py")
    _folder(tmp_path, "misnamed", 'name: "other"')
    _folder(tmp_path, "empty", "max_batch_size: 4", versions=())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text("max_batch_size: {", "utf-8")
    repository = RepositoryModels(tmp_path, RunnerSpec("placeholder", "auto", "cpu"), config)
    assert repository.names() == ["bare", "broken", "empty", "misnamed", "python", "two"]
    specs = repository.read("two")
    assert [s.version for s in specs] == ["3", "2"]
    assert specs[0].opener.model == str(tmp_path / "two" / "3" / "model.onnx")
    settings = specs[0].settings
    assert (settings.max_batch_size, settings.batching, settings.max_delay_ms) == (4, True, 2.0)
    assert (settings.max_queue, settings.timeout_s) == (99, 3)  # where the config is silent: the flags'
    assert repository.read("bare")[0].settings == ModelSettings.from_config(config)
    for name, says in [("python", "platform/backend 'python' is not served here"),
                       ("misnamed", "names the model 'other'"), ("empty", "at least one version"),
                       ("broken", "config.pbtxt")]:
        with pytest.raises(ModelLoadError, match=says):
            repository.read(name)
    for name in ("nope", "../two", ".hidden"):
        with pytest.raises(UnknownModelError, match="failed to poll from model repository"):
            repository.read(name)


def test_settings_without_dynamic_batching_run_requests_one_at_a_time():
    serving = triton_config.serving_settings(triton_config.parse("max_batch_size: 8"))
    settings = ModelSettings.from_triton(serving, ServeConfig())
    assert (settings.max_batch_size, settings.batch_limit) == (8, 1)


# --- model control --------------------------------------------------------------------------------------

@dataclass
class Fleet:
    """Records what model control asks, in order; `fail` names versions that cannot come up."""

    fail: tuple[str, ...] = ()
    gate: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.published: list[tuple[list[IndexEntry], dict]] = []

    async def bring_up(self, spec: VersionSpec, uid: int) -> ModelDescription:
        self.calls.append(("up", (spec.name, spec.version, uid)))
        if self.gate is not None:
            await self.gate.wait()
        if f"{spec.name}:{spec.version}" in self.fail:
            raise RuntimeError(f"cannot run {spec.name}")
        return None  # type: ignore[return-value]

    async def take_down(self, uid: int) -> None:
        self.calls.append(("down", uid))

    def publish(self, entries, routes) -> None:
        self.published.append((list(entries), {n: dict(v) for n, v in routes.items()}))
        self.calls.append(("publish", {n: dict(v) for n, v in routes.items()}))


def _source(*names: str) -> FileModels:
    return FileModels({name: object() for name in names}, ModelSettings())


def test_mode_none_loads_everything_and_refuses_control():
    async def main() -> None:
        fleet = Fleet()
        control = ModelControl(_source("a", "b"), fleet)
        await control.start()
        assert control.routes() == {"a": {"1": 1}, "b": {"1": 2}} and control.readiness() == (True, None)
        with pytest.raises(RepositoryControlError, match="not allowed"):
            await control.load("a")
        with pytest.raises(RepositoryControlError):
            await control.unload("a")

    asyncio.run(main())


def test_a_model_failing_at_start_stops_the_server_with_the_reason():
    async def main() -> None:
        control = ModelControl(_source("a", "bad"), Fleet(fail=("bad:1",)))
        with pytest.raises(ServeStartupError, match="load failed for model 'bad': version 1 is at "
                           "UNAVAILABLE state: cannot run bad"):
            await control.start()

    asyncio.run(main())


def test_explicit_mode_load_reload_fail_and_unload():
    async def main() -> None:
        fleet = Fleet()
        control = ModelControl(_source("a", "b"), fleet, mode="explicit", startup=["a"])
        await control.start()
        assert control.routes() == {"a": {"1": 1}}
        assert [e.to_dict() for e in control.entries()] == [
            {"name": "a", "version": "1", "state": "READY"}, {"name": "b"}]
        fleet.calls.clear()
        await control.load("a")  # a reload: the new copy is up and routed before the old one goes
        assert fleet.calls == [("up", ("a", "1", 2)), ("publish", {"a": {"1": 2}}), ("down", 1)]
        fleet.fail = ("b:1",)
        with pytest.raises(ModelLoadError, match="load failed for model 'b': version 1 is at UNAVAILABLE "
                           "state: cannot run b"):  # Triton 2.51's words
            await control.load("b")
        assert IndexEntry("b", "1", "UNAVAILABLE", "cannot run b") in control.entries()
        assert control.readiness() == (False, "model 'b' failed to load")  # as Triton's strict readiness
        await control.unload("b")  # forgets the failure
        assert control.readiness() == (True, None)
        assert IndexEntry("b", "1", "UNAVAILABLE", "unloaded") in control.entries()
        fleet.fail = ("a:1",)
        with pytest.raises(ModelLoadError):
            await control.load("a")  # a failed reload leaves the loaded version serving
        assert control.routes() == {"a": {"1": 2}}
        fleet.calls.clear()
        await control.unload("a")  # routes go first, then the model, then the index says why
        assert fleet.calls == [("publish", {}), ("down", 2), ("publish", {})]
        assert IndexEntry("a", "1", "UNAVAILABLE", "unloaded") in control.entries()
        await control.unload("a")  # as Triton: unloading what is not loaded succeeds
        with pytest.raises(UnknownModelError):
            await control.load("zzz")

    asyncio.run(main())


def test_a_first_load_makes_the_server_not_ready_until_it_is_done():
    async def main() -> None:
        fleet = Fleet(gate=asyncio.Event())
        control = ModelControl(_source("a", "b"), fleet, mode="explicit")
        fleet.gate.set()
        await control.start()
        fleet.gate.clear()
        loading = asyncio.create_task(control.load("b"))
        await asyncio.sleep(0.01)
        assert control.readiness() == (False, "model 'b' is loading")
        assert IndexEntry("b", "1", "LOADING") in control.entries()
        fleet.gate.set()
        await loading
        assert control.readiness() == (True, None)

    asyncio.run(main())


# --- a real server: an unload lets every accepted request finish ---------------------------------------

@dataclass(frozen=True)
class _Given:
    runner: SlowRunner

    def open(self) -> SlowRunner:
        return self.runner


def test_unload_finishes_every_accepted_request_then_refuses(sample_onnx_runner, sample_test):
    from toolkit.preprocess import preprocess

    slow = SlowRunner(sample_onnx_runner, 0.0)
    source = FileModels({"slow": _Given(slow), "other": _Given(SlowRunner(sample_onnx_runner, 0.0))},
                        ModelSettings(max_batch_size=4))
    batch = preprocess(sample_test.images[:1], sample_onnx_runner.card)
    expected = sample_onnx_runner(batch)
    body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}]}
    with running_server(source, model_control="explicit", load_models=("*",)) as (base, state):
        slow.gate.clear()  # every call now waits: the requests below are accepted and held
        with ThreadPoolExecutor(9) as pool:  # the 8 held requests and the unload
            held = [pool.submit(httpx.post, f"{base}/v2/models/slow/infer", json=body, timeout=60)
                    for _ in range(8)]
            deadline = time.monotonic() + 20
            while state.models.lookup("slow").in_flight < 8 and time.monotonic() < deadline:
                time.sleep(0.02)
            unload = pool.submit(httpx.post, f"{base}/v2/repository/models/slow/unload", timeout=60)
            time.sleep(0.5)
            assert not unload.done()  # it waits for the accepted requests
            refused = httpx.post(f"{base}/v2/models/slow/infer", json=body, timeout=10)
            assert refused.status_code == 503 and "not ready (unloading)" in refused.json()["error"]
            assert httpx.post(f"{base}/v2/models/other/infer", json=body, timeout=10).status_code == 200
            threading.Timer(0.2, slow.gate.set).start()
            answers = [future.result() for future in held]
            assert unload.result().status_code == 200
            gone = httpx.post(f"{base}/v2/models/slow/infer", json=body, timeout=10)
            assert gone.status_code == 404 and gone.json()["error"] == (  # Triton 2.51's answer
                "Request for unknown model: 'slow' has no available versions")
    assert [a.status_code for a in answers] == [200] * 8  # no accepted request was lost
    for answer in answers:
        np.testing.assert_allclose(answer.json()["outputs"][0]["data"], expected.ravel(), atol=1e-5)


def test_requests_timing_out_in_a_queue_are_answered_504(sample_card):
    """Several requests queued behind a busy runner time out one by one (a queue of numpy batches is
    searched by identity, never by comparing arrays)."""
    from fakes.runners import ConstantRunner
    from serve.batcher import DynamicBatcher
    from serve.errors import QueueTimeoutError
    from serve.metrics import Stats

    class Busy(ConstantRunner):
        def _infer(self, batch):  # type: ignore[no-untyped-def]
            time.sleep(0.6)
            return super()._infer(batch)

    async def main() -> list[BaseException | np.ndarray]:
        batcher = DynamicBatcher(Busy(sample_card, source="fake"), Stats(), max_batch_size=1, timeout_s=0.3)
        await batcher.start()
        try:
            shape = (1, *sample_card.input_size)
            return await asyncio.gather(*(batcher.infer(np.full(shape, i, np.float32)) for i in range(4)),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    answers = asyncio.run(main())
    assert all(isinstance(answer, QueueTimeoutError) for answer in answers), answers


# --- the command line: refused before anything starts ------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--load-model", "a"], "--load-model applies with --model-control-mode explicit"),
    (["--model-control-mode", "explicit", "--load-model", "*", "--load-model", "a"], "give it alone"),
    (["-m", "a.onnx", "-m", "b.onnx", "--name", "x"], "--name names a single -m"),
    (["-m", "x=a.onnx", "-m", "x=b.onnx"], "the same name"),
    (["--model-repository", ".", "-m", "a.onnx"], "either --model-repository or -m"),
])
def test_serve_refuses_contradictory_model_flags(flags, says, tmp_path, sample_onnx_fp32):
    from support.cli import invoke

    flags = [str(sample_onnx_fp32) if f.endswith(".onnx") and "=" not in f else
             f.split("=")[0] + "=" + str(sample_onnx_fp32) if f.endswith(".onnx") else f for f in flags]
    result = invoke("serve", *flags, "--port", "0", "--grpc-port", "0", "--workers", "1")
    assert result.exit_code == 2 and says in result.output, result.output
