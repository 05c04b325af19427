"""AOTInductor packages (`.pt2` from `toolkit export --format aoti`): compiled kernels, card and facts inside.

A package is native code tied to what built it: the torch release (the C++ ABI its library links
against), the device kind, and on CPUs the vector ISA inductor compiled for (with -march=native).
The facts record them; a mismatch is one ModelFormatError saying to rebuild, checked before the
library is loaded, as TensorRT engines are checked against their GPU and TensorRT version. A
package runs only what it was compiled for: batches within its range (larger ones are split here,
a static package's smaller ones padded by `Runner`), at its own precision.

Loading a package loads a shared library: open only packages you built or trust, as with any
native code.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactFacts
from ..card import ModelCard
from ..errors import ModelFormatError, UsageError, first_line
from ..pt2_archive import read_pt2
from ..quiet import quieted
from .base import Runner
from .pt2_runner import batch_limits
from .torch_runner import torch_device

REBUILD_HINT = "rebuild it here: toolkit export -m CHECKPOINT --format aoti"


def quiet_cuda_home_warning() -> contextlib.AbstractContextManager[None]:
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when inductor first
    imports it on a machine with a CUDA_HOME and no GPU: noise for a CPU package, so its warnings are
    off while inductor compiles or loads one."""
    return quieted("torch.utils.cpp_extension")


def release(version: str) -> str:
    """"2.14.1+cu130" -> "2.14.1": builds of one release share the C++ ABI a package links against."""
    return version.split("+", 1)[0]


def check_compatible(facts: ArtifactFacts, device: str, path: Path) -> None:
    """Refuse, in one line, a package built by another torch release, for another device kind or for a
    CPU vector ISA this machine lacks (loading it would fail deep in C++, or crash on an illegal
    instruction)."""
    import torch

    extra = facts.extra
    built_with = str(extra.get("torch_version") or "")
    if release(built_with) != release(torch.__version__):
        raise ModelFormatError(f"{path.name} was compiled by torch {built_with or '?'}; this is torch "
                               f"{torch.__version__}, which cannot load it: {REBUILD_HINT}")
    built_for, asked = str(extra.get("device") or "?"), torch.device(device).type
    if built_for != asked:
        raise ModelFormatError(f"{path.name} was compiled for {built_for} and runs only there (--device "
                               f"{built_for}); to run on {asked}, {REBUILD_HINT} --device {asked}")
    if asked == "cuda" and facts.compute_capability:
        index = torch.device(device).index or 0
        here = "{}.{}".format(*torch.cuda.get_device_capability(index))
        if here != facts.compute_capability:
            raise ModelFormatError(f"{path.name} was compiled for compute capability "
                                   f"{facts.compute_capability} ({facts.gpu or 'unknown GPU'}); this GPU has "
                                   f"{here}: {REBUILD_HINT} --device cuda")
    isa = extra.get("cpu_isa")
    if asked == "cpu" and isa:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        offered = [str(candidate) for candidate in valid_vec_isa_list()]
        if isa not in offered:
            raise ModelFormatError(f"{path.name} was compiled for CPUs with {isa}; this CPU offers "
                                   f"{', '.join(offered) or 'no vector ISA inductor uses'}: {REBUILD_HINT}")


class AOTInductorRunner(Runner):
    """One loaded package: float32 NCHW in, logits out, on the device it was compiled for."""

    backend = "aoti"

    def __init__(self, model: Any, card: ModelCard, *, source: str, device: str,
                 facts: ArtifactFacts) -> None:
        import torch

        fixed, limit = batch_limits(facts)
        super().__init__(card, source=source, device=device, fixed_batch_size=fixed, max_batch_size=limit,
                         facts=facts)
        self._torch = torch
        self._device = torch_device(device)
        self._model = model
        self._lock = threading.Lock()  # the loader runs one call at a time (num_runners=1)

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu",  # type: ignore[override]
             precision: str = "fp32", warmup: int = 2) -> AOTInductorRunner:
        """Check the package against this torch and device, load it, warm up. `precision` may only be the
        package's own (or fp32, meaning "as compiled"): its kernels are fixed at export."""
        import torch

        path = Path(path)
        card, facts = read_pt2(path)
        if facts.format != "aoti":
            raise ModelFormatError(f"{path} is a torch.export program, not an AOTInductor package: open it "
                                   "with --backend pt2")
        if precision not in ("fp32", facts.precision):
            raise UsageError(f"{path} is an AOTInductor package compiled at {facts.precision}; for "
                             f"{precision}, export one with --format aoti --precision {precision}")
        target = torch_device(device)
        try:
            with quiet_cuda_home_warning():
                check_compatible(facts, device, path)
                model = torch._inductor.aoti_load_package(
                    str(path), device_index=-1 if target.index is None else target.index)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelFormatError(f"{path}: not a loadable AOTInductor package ({first_line(exc)}): "
                                   f"{REBUILD_HINT}") from None
        return cls(model, card, source=str(path), device=device, facts=facts).warm_up(warmup)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        if not batch.flags.writeable:  # the server's wire buffers: torch warns on read-only arrays
            batch = batch.copy()
        x = torch.from_numpy(batch).to(self._device)
        with self._lock, torch.inference_mode():
            out = self._model(x)
        if isinstance(out, list | tuple):
            out = out[0]
        return out.float().cpu().numpy()

    def close(self) -> None:
        self._model = None

    def describe(self) -> dict[str, Any]:
        extra = self.facts.extra if self.facts is not None else {}
        return {**super().describe(), "torch_version": extra.get("torch_version"),
                "cpu_isa": extra.get("cpu_isa")}
