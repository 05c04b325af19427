"""The runners: ONNX Runtime and OpenVINO agree with eager PyTorch, read the card, fail cleanly; every
runner warms up at the end of `open`, and only there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from toolkit.errors import BackendUnavailableError, ModelFormatError
from toolkit.evaluate import collect_logits
from toolkit.runtime.cpu import physical_cores
from toolkit.runtime.onnxruntime_runner import OnnxRuntimeRunner, providers_for
from toolkit.runtime.registry import open_model


@pytest.fixture(scope="module")
def reference_logits(sample_model, sample_test):
    with open_model(sample_model) as runner:
        return collect_logits(runner, sample_test)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_onnx_agrees_with_eager(sample_onnx_fp32, sample_test, reference_logits, sample_card, backend):
    with open_model(sample_onnx_fp32, backend=backend) as runner:
        assert runner.backend == backend and runner.precision == "fp32"
        assert runner.card == sample_card
        logits = collect_logits(runner, sample_test, batch_size=100)  # 100, 100, 100, 60: uneven batches
    np.testing.assert_allclose(logits, reference_logits, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_openvino_runs_the_int8_file_like_onnxruntime(sample_onnx_int8, sample_test):
    with open_model(sample_onnx_int8) as ort_runner, \
            open_model(sample_onnx_int8, backend="openvino") as ov_runner:
        assert ort_runner.precision == ov_runner.precision == "int8"
        a, b = collect_logits(ort_runner, sample_test), collect_logits(ov_runner, sample_test)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("hint", ["latency", "throughput"])
def test_openvino_hints_agree(sample_onnx_fp32, sample_test, reference_logits, hint):
    from toolkit.runtime.openvino_runner import OpenVINORunner

    drawn = sample_test.subset_indices(37)
    with OpenVINORunner.open(sample_onnx_fp32, hint=hint) as runner:
        logits = collect_logits(runner, sample_test.subset(37), batch_size=37)
    np.testing.assert_allclose(logits, reference_logits[drawn], atol=1e-4, rtol=1e-3)


def _count_runs(monkeypatch, backend: str, fail: bool = False) -> list[int]:
    """Patch the backend's inference methods to record each batch's size (and fail, if asked)."""
    from toolkit.runtime.registry import backend_class

    cls = backend_class(backend)
    sizes: list[int] = []
    for name in ("_infer", "_infer_parallel"):
        real = getattr(cls, name, None)
        if real is None:
            continue

        def run(self, batch, *args, _real=real):
            sizes.append(len(batch))
            if fail:
                raise RuntimeError("kaboom: no kernel for this node\ndetails")
            return _real(self, batch, *args)

        monkeypatch.setattr(cls, name, run)
    return sizes


@pytest.mark.parametrize(("backend", "calls"), [("onnxruntime", 1), ("openvino", 1), ("torch", 2)])
def test_every_runner_warms_up_at_load(sample_onnx_fp32, sample_model, monkeypatch, backend, calls):
    """Issue 12: kernels, arenas and plans are made at load; evaluate also sets its first batch apart."""
    model = sample_model if backend == "torch" else sample_onnx_fp32
    sizes = _count_runs(monkeypatch, backend)
    with open_model(model, backend=backend):
        assert len(sizes) == calls and sum(sizes) >= calls
    with open_model(model, backend=backend, warmup=0):
        assert len(sizes) == calls


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_a_model_that_loads_but_cannot_run_fails_at_load_in_one_line(sample_onnx_fp32, sample_model,
                                                                     monkeypatch, backend):
    model = sample_model if backend == "torch" else sample_onnx_fp32
    _count_runs(monkeypatch, backend, fail=True)
    with pytest.raises(ModelFormatError, match=r"cannot run it \(kaboom: no kernel for this node\)") as info:
        open_model(model, backend=backend)
    assert model.name in str(info.value) and "\n" not in str(info.value)


def test_torch_runner_constructor_stores_and_open_warms_up(sample_model, sample_card, monkeypatch, tmp_path):
    """Issue 20: one warm-up convention (`Runner.warm_up`, at the end of `open`), a constructor that runs
    nothing, and inductor's cache folder set only while a step compiles, never left in the environment."""
    import torch

    from toolkit.archs import build_model
    from toolkit.runtime.torch_runner import RunOptions, TorchRunner

    sizes = _count_runs(monkeypatch, "torch")
    caches: list[str | None] = []  # TORCHINDUCTOR_CACHE_DIR as each compiled call sees it

    def fake_compile(step, **_):
        def call(x):
            caches.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
            return step(x)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    options = RunOptions(compile="default", compile_cache=tmp_path / "unused", batch_size=4)
    runner = TorchRunner(build_model("resnet20", sample_card.num_classes), sample_card, source="built",
                         options=options)
    assert sizes == [] and caches == [] and runner.compile_status == "pending"
    assert not (tmp_path / "unused").exists()
    with open_model(sample_model, batch_size=4, warmup=3):
        assert sizes == [4, 4, 4]
    cache = tmp_path / "inductor"
    with open_model(sample_model, compile="default", compile_cache=str(cache), batch_size=4,
                    warmup=2) as opened:
        assert opened.compile_status == "compiled" and sizes == [4] * 5
    assert caches[0] == str(cache) and cache.is_dir()  # the compiling call ran inside the scope...
    assert caches[1] != str(cache)  # ...the next one outside it, and nothing was left behind
    assert not os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").startswith(str(tmp_path))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_corrupt_onnx_is_one_line_model_format_error(tmp_path, backend):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xff")
    with pytest.raises(ModelFormatError) as info:
        open_model(bad, backend=backend)
    assert "\n" not in str(info.value) and "bad.onnx" in str(info.value)


def test_onnx_without_card_says_how_to_get_one(tmp_path, sample_onnx_fp32):
    import onnx

    proto = onnx.load(str(sample_onnx_fp32))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelFormatError, match="no model card"):
        OnnxRuntimeRunner.open(tmp_path / "plain.onnx")


def test_missing_openvino_says_what_to_install(monkeypatch, sample_onnx_fp32):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import now fails as if not installed
    with pytest.raises(BackendUnavailableError, match=r"resnet-toolkit\[openvino\]"):
        open_model(sample_onnx_fp32, backend="openvino")


def test_cuda_without_provider_says_what_is_missing():
    with pytest.raises(BackendUnavailableError, match="CUDA execution provider"):
        providers_for("cuda", ["CPUExecutionProvider"])
    assert providers_for("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    chosen = providers_for("cuda:1", available, use_tensorrt=True)
    assert [p[0] for p in chosen] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert chosen[1][1]["device_id"] == 1


def test_session_uses_physical_cores(sample_onnx_fp32):
    with OnnxRuntimeRunner.open(sample_onnx_fp32) as runner:
        assert runner.session.get_session_options().intra_op_num_threads == physical_cores() >= 1


@pytest.mark.slow
def test_onnx_path_never_imports_torch(sample_onnx_fp32):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from toolkit.runtime.registry import open_model
        from toolkit.describe import describe_artifact
        for backend in ("onnxruntime", "openvino"):
            with open_model({str(sample_onnx_fp32)!r}, backend=backend) as runner:
                runner(np.zeros((2, 3, 32, 32), np.float32))
        describe_artifact({str(sample_onnx_fp32)!r})
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
