"""The repository API of `toolkit serve` beside a real Triton 2.51, call by call, the differences printed.

Both servers run in model control mode "explicit" on a repository with the same model names and configs:

    ok          loads and serves (ours: the sample model as ONNX; Triton: a Python-backend model with the
                same config, since the tritonserver in the nvidia-pytriton wheel has only that backend)
    failing     its model fails to load (ours: a corrupt model.onnx; Triton: a model.py that raises)
    badconfig   config.pbtxt is not protobuf text
    noversion   no version folder

and each is asked the same sequence over HTTP (index, load, reload, unload, unknown names, readiness,
inference after unload) and over gRPC (index, load, unload). Answers are compared as status + JSON body
(gRPC: status code + message), with the repository's path written as <repo>; the script prints every
call with both answers and then the calls that differ. Which differences remain, and why, is in the
README (`toolkit serve`, "As Triton answers").

Set-up (once; `--setup` alone, run automatically when missing): Triton 2.51 is the `tritonserver` inside
`nvidia-pytriton==0.5.13` (Python backend only; it needs numpy < 2), installed into a venv of its own,
bench/.tools/triton-venv (ignored by git), with the Python backend's stub for this Python put beside it.

    python bench/bench_triton_repository.py [--setup] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = ROOT / "bench" / ".tools"
VENV = TOOLS / "triton-venv"
PYTRITON = "nvidia-pytriton==0.5.13"  # bundles tritonserver 2.51.0 (release 24.10)
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
MODELS = ("ok", "failing", "badconfig", "noversion")


# --- set-up ------------------------------------------------------------------------------------------------

def site_packages() -> Path:
    return VENV / "lib" / f"python{PY}" / "site-packages"


def setup() -> dict[str, Path]:
    """tritonserver 2.51 in bench/.tools/triton-venv; returns its binary, libraries and backends folder."""
    if not (site_packages() / "pytriton").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", PYTRITON, "numpy<2"],
                       check=True)
    server = site_packages() / "pytriton" / "tritonserver"
    backends = TOOLS / "triton-backends"
    python_backend = backends / "python"
    if not (python_backend / "triton_python_backend_stub").exists():
        python_backend.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(server / "backends" / "python" / name, python_backend / name)
        shutil.copy2(server / "python_backend_stubs" / PY / "triton_python_backend_stub", python_backend)
    return {"binary": server / "bin" / "tritonserver", "libs": site_packages() / "nvidia_pytriton.libs",
            "backends": backends}


# --- the two repositories -------------------------------------------------------------------------------

def config_text(name: str, engine: str) -> str:
    """The same config for both servers but the line saying what runs the model."""
    return (f'name: "{name}"\n{engine}\nmax_batch_size: 8\n'
            'input [ { name: "input" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]\n'
            'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
            "instance_group [ { count: 1 kind: KIND_CPU } ]\ndynamic_batching { }\n")


PYTHON_MODEL = '''import sys
sys.path.insert(0, {site!r})  # numpy for the stub: the bench's Triton venv
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        if {fail!r}:
            raise RuntimeError("broken on purpose")

    def execute(self, requests):
        answers = []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", np.zeros((len(batch), 10),
                                                                                     np.float32))]))
        return answers
'''


def write_repositories(folder: Path) -> tuple[Path, Path]:
    """(ours, Triton's): the same names, configs and faults; ONNX for ours, Python models for Triton."""
    from export.onnx import export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint
    from toolkit.sample import SAMPLE_MODEL

    ours, theirs = folder / "ours", folder / "triton"
    onnx = export(*build_from_checkpoint(load_checkpoint(SAMPLE_MODEL))[:2], folder / "sample.onnx")
    for repository, engine in ((ours, 'platform: "onnxruntime_onnx"'), (theirs, 'backend: "python"')):
        for name in MODELS:
            (repository / name).mkdir(parents=True)
            text = config_text(name, engine)
            (repository / name / "config.pbtxt").write_text(text if name != "badconfig" else text + "{\n")
            if name in ("ok", "failing", "badconfig"):
                (repository / name / "1").mkdir()
    shutil.copy(onnx, ours / "ok" / "1" / "model.onnx")
    (ours / "failing" / "1" / "model.onnx").write_bytes(b"not an ONNX file")
    shutil.copy(onnx, ours / "badconfig" / "1" / "model.onnx")
    for name, fail in (("ok", False), ("failing", True), ("badconfig", False)):
        code = PYTHON_MODEL.format(site=str(site_packages()), fail=fail)
        (theirs / name / "1" / "model.py").write_text(code)
    return ours, theirs


# --- the servers --------------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_live(port: int, process: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited (code {process.returncode})")
        with contextlib.suppress(httpx.HTTPError):  # not listening yet: ask again
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start within {timeout_s:g} s")


def start_triton(tools: dict[str, Path], repository: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [str(tools["binary"]), f"--model-repository={repository}", "--model-control-mode=explicit",
               f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
               f"--backend-directory={tools['backends']}", "--exit-on-error=false"]
    env = {**os.environ, "LD_LIBRARY_PATH": str(tools["libs"])}
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_live(http, process, "tritonserver")
    return process, http, grpc


def start_ours(repository: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    http, grpc = free_port(), free_port()
    command = [sys.executable, "-m", "toolkit.cli", "serve", "--model-repository", str(repository),
               "--model-control-mode", "explicit", "--port", str(http), "--grpc-port", str(grpc)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_live(http, process, "toolkit serve")
    return process, http, grpc


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


# --- the calls ---------------------------------------------------------------------------------------------

Call = tuple[str, Callable[[int, int], Any]]


def http_call(method: str, path: str, body: bytes = b"") -> Callable[[int, int], Any]:
    def call(port: int, grpc_port: int) -> Any:
        import httpx

        answer = httpx.request(method, f"http://127.0.0.1:{port}{path}", content=body, timeout=120)
        try:
            return answer.status_code, answer.json() if answer.content else None
        except ValueError:
            return answer.status_code, answer.text[:200]

    return call


def grpc_call(method: str, *args: Any) -> Callable[[int, int], Any]:
    def call(port: int, grpc_port: int) -> Any:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            try:
                answer = getattr(client, method)(*args)
            except InferenceServerException as exc:
                return exc.status(), exc.message()
            if hasattr(answer, "ListFields"):
                from google.protobuf import json_format

                return "OK", json_format.MessageToDict(answer, preserving_proto_field_name=True)
            return "OK", answer

    return call


def calls() -> list[Call]:
    index, post = ("POST", "/v2/repository/index"), "POST"
    infer = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                    "data": [0.0] * 3072}]}).encode()
    sequence: list[Call] = [
        ("index (nothing loaded)", http_call(*index)),
        ("load ok", http_call(post, "/v2/repository/models/ok/load")),
        ("index", http_call(*index)),
        ("load ok again (reload)", http_call(post, "/v2/repository/models/ok/load")),
        ("model ok ready", http_call("GET", "/v2/models/ok/ready")),
        ("load nope (unknown)", http_call(post, "/v2/repository/models/nope/load")),
        ("load failing", http_call(post, "/v2/repository/models/failing/load")),
        ("load badconfig", http_call(post, "/v2/repository/models/badconfig/load")),
        ("load noversion", http_call(post, "/v2/repository/models/noversion/load")),
        ("index after the failures", http_call(*index)),
        ("index ready only", http_call(*index[:2], b'{"ready": true}')),
        ("model failing ready", http_call("GET", "/v2/models/failing/ready")),
        ("server ready", http_call("GET", "/v2/health/ready")),
        ("unload ok", http_call(post, "/v2/repository/models/ok/unload")),
        ("index after unload", http_call(*index)),
        ("infer ok after unload", http_call(post, "/v2/models/ok/infer", infer)),
        ("model ok ready after unload", http_call("GET", "/v2/models/ok/ready")),
        ("unload ok again", http_call(post, "/v2/repository/models/ok/unload")),
        ("unload nope (unknown)", http_call(post, "/v2/repository/models/nope/unload")),
        ("model nope metadata", http_call("GET", "/v2/models/nope")),
        ("gRPC index", grpc_call("get_model_repository_index")),
        ("gRPC load ok", grpc_call("load_model", "ok")),
        ("gRPC load nope", grpc_call("load_model", "nope")),
        ("gRPC load failing", grpc_call("load_model", "failing")),
        ("gRPC unload ok", grpc_call("unload_model", "ok")),
        ("gRPC index after", grpc_call("get_model_repository_index")),
    ]
    return sequence


def normalised(answer: Any, roots: tuple[Path, ...]) -> str:
    text = json.dumps(answer, sort_keys=True)
    for root in roots:
        text = text.replace(str(root), "<repo>")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="only install Triton 2.51 into bench/.tools")
    parser.add_argument("--keep", action="store_true", help="keep the repositories and logs (printed)")
    args = parser.parse_args()
    tools = setup()
    if args.setup:
        print(f"tritonserver: {tools['binary']}")
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-triton-repo-"))
    ours, theirs = write_repositories(folder)
    triton, t_http, t_grpc = start_triton(tools, theirs, folder / "triton.log")
    try:
        server, o_http, o_grpc = start_ours(ours, folder / "ours.log")
        try:
            rows = [(name, call(t_http, t_grpc), call(o_http, o_grpc)) for name, call in calls()]
        finally:
            stop(server)
    finally:
        stop(triton)
    differ = []
    for name, theirs_answer, ours_answer in rows:
        a, b = normalised(theirs_answer, (theirs,)), normalised(ours_answer, (ours,))
        mark = "same" if a == b else "DIFFERS"
        print(f"== {name}: {mark}\n   Triton 2.51: {a}\n   toolkit:     {b}")
        if a != b:
            differ.append(name)
    print(f"\n{len(rows) - len(differ)} of {len(rows)} answers equal; differ: {', '.join(differ) or 'none'}")
    if args.keep:
        print(f"repositories and logs kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
