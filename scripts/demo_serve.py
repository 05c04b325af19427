"""The serving part of `make demo`: start `toolkit serve`, ask it what a client would, stop it.

Shows readiness, the v2 model metadata, a /predict on a real PNG, and a clean SIGTERM drain.
Standard library only, as any client could do it.

    python scripts/demo_serve.py TOOLKIT MODEL.onnx IMAGE.png
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except OSError:
        return 0, b""


def post_image(url: str, image: Path) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{image.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    body += image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main() -> int:
    toolkit, model, image = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"$ {toolkit} serve -m {model} --port {port}")
    server = subprocess.Popen([toolkit, "serve", "-m", model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while get(f"{base}/v2/health/ready")[0] != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                print(server.stderr.read().decode() if server.stderr else "", file=sys.stderr)
                print("server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"GET  {base}/v2/health/ready -> 200 (loaded and warmed up)")
        name = Path(model).stem
        meta = json.loads(get(f"{base}/v2/models/{name}")[1])
        print(f"GET  {base}/v2/models/{name} -> inputs {meta['inputs']}, outputs {meta['outputs']}")
        answer = post_image(f"{base}/predict", image)
        print(f"POST {base}/predict ({image.name}) -> {json.dumps(answer)[:300]}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    print(f"SIGTERM -> drained and exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
