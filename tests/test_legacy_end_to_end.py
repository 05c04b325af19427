"""A checkpoint written the way PyTorch 0.3 code wrote it validates, evaluates, exports and serves.

The weights are the bundled sample's (really trained), saved as akamaster's trainer.py saved its
CIFAR ResNets: `DataParallel`'s `module.` prefix, the `linear`/`shortcut` names, no
`num_batches_tracked`, `best_prec1` beside the weights, the pre-1.6 format. The card comes from flags
(the file carries none), so this also follows the card flags through every command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from support.cli import invoke
from support.serve import free_port, wait_for
from toolkit.data import load_sample
from toolkit.runtime.registry import read_artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory, sample_model):
    state = torch.load(sample_model, weights_only=True)
    renamed = OrderedDict(
        ("module." + key.replace("fc.", "linear.", 1) if key.startswith("fc.") else "module." + key, value)
        for key, value in state.items() if not key.endswith("num_batches_tracked"))
    path = tmp_path_factory.mktemp("legacy") / "resnet20-digits.th"
    torch.save({"state_dict": renamed, "best_prec1": 99.72, "epoch": 30}, path,
               _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def card_flags(tmp_path_factory, sample_card):
    names = tmp_path_factory.mktemp("names") / "digits.txt"
    names.write_text("\n".join(sample_card.class_names) + "\n")
    return ["--classes", str(names), "--mean", ",".join(map(str, sample_card.mean)),
            "--std", ",".join(map(str, sample_card.std))]


def test_it_validates_with_its_history_shown(old_checkpoint, card_flags):
    result = invoke("validate", "-m", old_checkpoint, *card_flags, "--dataset", "sample", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["valid"] and report["prefix"] == "module." and report["layout"] == "akamaster"
    assert report["recorded"] == {"best_prec1": 99.72, "epoch": 30}
    assert {p["code"] for p in report["problems"] if p["severity"] == "info"} >= {
        "num_batches_tracked", "legacy_format", "recorded"}
    assert report["accuracy"] > 0.99


def test_it_evaluates_as_the_original(old_checkpoint, card_flags, sample_model):
    def accuracy(*args):
        result = invoke("eval", *args, "--dataset", "sample", "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["accuracy"]

    assert accuracy("-m", old_checkpoint, *card_flags) == accuracy("-m", sample_model)


def test_it_exports_verified_and_the_onnx_carries_the_flags(old_checkpoint, card_flags, sample_card,
                                                            tmp_path):
    out = tmp_path / "old.onnx"
    result = invoke("export", "-m", old_checkpoint, *card_flags, "-o", out, "--calib-dataset", "sample")
    assert result.exit_code == 0, result.output
    card, _ = read_artifact(out)
    assert (card.class_names, card.mean, card.std) == (
        sample_card.class_names, sample_card.mean, sample_card.std)


def test_it_serves_to_the_official_client(old_checkpoint, card_flags, sample_card, tmp_path):
    """Served from a subprocess with the card flags (named classes of its own): the official client gets
    the model's answers and the flags' class names."""
    import tritonclient.http as httpclient

    names = tmp_path / "named.txt"
    names.write_text("\n".join(f"digit-{name}" for name in sample_card.class_names))
    flags = [*card_flags[2:], "--classes", str(names)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(old_checkpoint),
                               *flags, "--port", str(port), "--grpc-port", "0", "--workers", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/health/ready", timeout=120)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        test = load_sample("test").subset(16)
        batch = next(test.batches(sample_card, 16))
        tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        top = httpclient.InferRequestedOutput("logits", class_count=1)
        answer = client.infer(old_checkpoint.stem, [tensor], outputs=[top]).as_numpy("logits")
        labels = [entry.decode().split(":")[2] for entry in answer.reshape(-1)]
        expected = [f"digit-{sample_card.class_names[y]}" for y in test.labels]
        assert sum(label == want for label, want in zip(labels, expected)) >= 15
        client.close()
    finally:
        server.terminate()
        server.wait(30)
