"""KServe's own gRPC client (`kserve.InferenceGRPCClient`) against our server, unchanged.

KServe's SDK pins pandas < 3 (and a Kubernetes client), so it cannot live in this project's venv: the
Makefile's test set-up gives it `.venv-kserve`, and this test runs the client there, in a subprocess,
against a real server on a loopback port. Every call the client offers is used (ServerLive,
ServerReady, ModelReady, ModelInfer); logits are compared with the Runner called offline.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from support.serve import free_port, running_server
from toolkit.preprocess import preprocess

KSERVE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-kserve" / "bin" / "python"
MODEL = "digits"

CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(url, model, batch_path, out_path):
    batch = np.load(batch_path)
    async with InferenceGRPCClient(url=url, timeout=30) as client:
        facts = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
                 "model_ready": await client.is_model_ready(model)}
        for binary in (True, False):
            tensor = InferInput(name="input", shape=list(batch.shape), datatype="FP32")
            tensor.set_data_from_numpy(batch, binary_data=binary)
            response = await client.infer(InferRequest(model_name=model, infer_inputs=[tensor]))
            output = response.outputs[0]
            facts[f"output_binary_{binary}"] = [output.name, list(output.shape), output.datatype]
            np.save(out_path.replace(".npy", f"-{binary}.npy"), output.as_numpy())
        try:
            await client.is_model_ready("no-such-model")
            facts["unknown_model"] = "answered"
        except Exception as exc:
            facts["unknown_model"] = type(exc).__name__ + ": " + str(getattr(exc, "code", lambda: "")())
    print(json.dumps(facts))

asyncio.run(main(*sys.argv[1:]))
"""

pytestmark = pytest.mark.skipif(
    not KSERVE_PYTHON.is_file(),
    reason="KServe's client lives in .venv-kserve, which `make test` creates (pip install kserve there); "
           "it could not be installed here",
)


def test_kserve_grpc_client_works_unchanged(sample_onnx_runner, sample_test, tmp_path):
    batch = preprocess(sample_test.images[:6], sample_onnx_runner.card)
    np.save(tmp_path / "batch.npy", batch)
    port = free_port()
    with running_server(sample_onnx_runner, max_batch_size=8, grpc_port=port):
        done = subprocess.run(
            [str(KSERVE_PYTHON), "-c", CLIENT, f"127.0.0.1:{port}", MODEL, str(tmp_path / "batch.npy"),
             str(tmp_path / "out.npy")],
            capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["live"] is True and facts["ready"] is True and facts["model_ready"] is True
    expected = sample_onnx_runner(batch)
    for binary in (True, False):
        assert facts[f"output_binary_{binary}"] == ["logits", [6, expected.shape[1]], "FP32"]
        np.testing.assert_allclose(np.load(tmp_path / f"out-{binary}.npy"), expected, rtol=1e-5, atol=1e-5)
    assert "NOT_FOUND" in facts["unknown_model"]
