"""torch.export programs (`.pt2`, `toolkit export --format pt2`): card and facts in the archive's `extra/`.

The program is run as the eager reference is (`TorchRunner`: same device handling, precision and
call), through `ExportedProgram.module()`: an FX GraphModule whose guards check each batch against
the exported range, so batches beyond it are split here (the facts' `profile`), never refused there.
`torch.export.load` reads weights as raw bytes; it unpickles only tensor subclasses and custom
objects, which the toolkit's exports never hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts import ArtifactFacts
from ..errors import ModelFormatError, UsageError, first_line
from ..pt2_archive import read_pt2
from .torch_runner import RunOptions, TorchRunner, check_gpu_options, torch_device


def batch_limits(facts: ArtifactFacts) -> tuple[int | None, int | None]:
    """(fixed, max) batch size from the facts' batch range: a static program takes exactly one size."""
    profile = facts.profile or {}
    low, high = profile.get("min"), profile.get("max")
    if low is not None and low == high:
        return low, None
    return None, high


def reduced_precision(path: Path, own: str, asked: str, backend: str) -> str:
    """The precision a runner computes at: an fp32 artifact runs at the one asked; a reduced one only at
    its own (its body is cast already, behind fp32 edges)."""
    if own != "fp32" and asked not in ("fp32", own):
        raise UsageError(f"{path} is a {own} {backend} artifact; --precision {asked} needs the fp32 export "
                         "(or the checkpoint with --backend torch)")
    return own if own != "fp32" else asked


class ExportedProgramRunner(TorchRunner):
    """An `ExportedProgram`'s module, run by the torch backend's machinery (fp16/bf16 casts the weights
    once, channels-last on request, warm-up at load)."""

    backend = "pt2"

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu",  # type: ignore[override]
             precision: str = "fp32", channels_last: bool | None = None, cuda_graphs: bool = False,
             batch_size: int | None = None, warmup: int = 2) -> ExportedProgramRunner:
        """Card and facts come from the archive's extra files, read before torch loads the program.
        `precision`, `channels_last`, `cuda_graphs`, `batch_size`, `warmup`: as the torch backend's."""
        check_gpu_options(device, precision, cuda_graphs, None)
        path = Path(path)
        card, facts = read_pt2(path)
        if facts.format != "pt2":
            raise ModelFormatError(f"{path} is an AOTInductor package, not a torch.export program: open it "
                                   "with --backend aoti")
        module = load_program(path, device, built_on=str(facts.extra.get("device") or "cpu"))
        own = facts.precision
        options = RunOptions(channels_last=bool(channels_last), cuda_graphs=cuda_graphs,
                             batch_size=batch_size)
        runner = cls(module, card, source=str(path), device=device, facts=facts,
                     precision=reduced_precision(path, own, precision, "torch.export"), options=options,
                     cast="none" if own != "fp32" else "weights")
        runner.fixed_batch_size, limit = batch_limits(facts)
        runner.max_batch_size = runner.fixed_batch_size or limit
        runner.accepts_uint8 = False  # batches go through `Runner.__call__`, which splits them to the range
        return runner.warm_up(warmup)


def load_program(path: Path, device: str, built_on: str = "cpu") -> Any:
    """The program's module on `device` (its tensors and device arguments moved there when it was
    exported on another); an unreadable archive is one ModelFormatError naming the file."""
    import torch

    target = torch_device(device)
    try:
        program = torch.export.load(str(path))
        if target.type != built_on:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, target)
        return _inference_module(program.module())
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ModelFormatError(f"{path}: not a loadable torch.export program ({first_line(exc)}); re-export "
                               "it with this torch: toolkit export -m CHECKPOINT --format pt2") from None


def _inference_module(graph: Any) -> Any:
    """The program's GraphModule behind the usual nn.Module interface. It was captured in inference form
    and refuses train()/eval() (torch raises NotImplementedError), which have nothing to change in it."""
    import torch

    class ExportedModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph

        def train(self, mode: bool = True) -> ExportedModule:
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.graph(x)

    return ExportedModule()
