"""AOTInductor: the torch.export program compiled ahead of time into a `.pt2` package of native kernels.

`torch._inductor.aot_compile(..., {"aot_inductor.package": True})` generates and compiles C++ (CPU)
or C++ + Triton (CUDA) for the program, and `package_pt2` writes those files with our `extra/`
entries (card.json, artifact.json): the same two steps as `torch._inductor.aoti_compile_and_package`,
which offers no extra files. The package then runs without Python's per-op overhead.

A package is native code built for one machine: the torch release whose C++ ABI it links against,
the device it was compiled for, and on CPUs the vector ISA (inductor compiles with -march=native).
The facts record all three, and `AOTInductorRunner` refuses a mismatch with one line saying to
rebuild, as TensorRT engines do. Compiling needs the C++ compiler inductor uses (`$CXX`, else g++):
where there is none, the export stops before any work with one line saying so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.pt2_archive import pt2_extra_files
from toolkit.card import ModelCard
from toolkit.errors import BackendUnavailableError, ExportError, first_line
from toolkit.fileio import atomic_write_bytes

from .pipeline import ExportJob, FormatSpec
from .torch_export import PRECISIONS, BatchRange, BatchRangeOptions, exported_program, facts

REBUILD = "toolkit export -m CHECKPOINT --format aoti"


def cpp_compiler() -> str:
    """The C++ compiler inductor will call (its `cpp.cxx` search: `$CXX`, else g++), or a one-line
    BackendUnavailableError before minutes of work are spent on code nothing can compile."""
    from torch._inductor import config

    candidates = config.cpp.cxx if isinstance(config.cpp.cxx, list | tuple) else (config.cpp.cxx,)
    named = [c for c in candidates if c]
    for name in named:
        found = shutil.which(name.split()[0])
        if found:
            return found
    raise BackendUnavailableError(
        f"AOTInductor needs a C++ compiler to build the package and found none ({' or '.join(named)} is "
        "not on PATH): install one (apt-get install g++, or set CXX), or export --format pt2")


def cpu_isa() -> str:
    """The vector ISA inductor generates CPU kernels for here ("avx512", "avx2", ...; "" for none)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa())


def build_environment(device: str) -> dict[str, Any]:
    """What the package will depend on, recorded in its facts (the runner checks each on load)."""
    import torch

    kind = torch.device(device).type
    described: dict[str, Any] = {"device": kind}
    if kind == "cpu":
        described["cpu_isa"] = cpu_isa()
    elif kind == "cuda":
        index = torch.device(device).index or 0
        described["gpu"] = torch.cuda.get_device_name(index)
        described["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
    return described


def compile_package(program: Any, extra_files: dict[str, str]) -> bytes:
    """The package's bytes: AOTInductor's generated files, packaged with `extra_files`."""
    import torch
    from torch.export.pt2_archive._package import package_pt2

    module = program.module(check_guards=False)
    args, kwargs = program.example_inputs
    try:
        with _quiet("torch.utils.cpp_extension"):
            files = torch._inductor.aot_compile(module, args, kwargs,
                                                options={"aot_inductor.package": True})
    except Exception as exc:  # noqa: BLE001 - inductor lowering, C++ compile or link errors
        raise ExportError(f"AOTInductor could not compile the program: {first_line(exc)}") from None
    if not isinstance(files, list):
        raise ExportError(f"AOTInductor returned {type(files).__name__}, not the package's file list")
    buffer = io.BytesIO()
    package_pt2(buffer, aoti_files=files, extra_files=extra_files)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Warnings of `logger` off while inductor compiles: torch.utils.cpp_extension logs "No CUDA runtime
    is found" on import wherever a CUDA_HOME exists without a GPU, which says nothing about a CPU build."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def export(model: Any, card: ModelCard, output: str | Path, *, precision: str = "fp32",
           batch: BatchRange = BatchRange(1, 32), device: str = "cpu") -> Path:
    """Compile `model` into an AOTInductor package at `output` (atomically), card and facts inside."""
    cpp_compiler()  # fail before the slow work
    environment = build_environment(device)
    program = exported_program(model, card, precision, batch, device)
    described = facts(card, "aoti", precision, batch, "AOTInductor", **environment)
    data = compile_package(program, pt2_extra_files(card, described))
    return atomic_write_bytes(Path(output), data)


# --- `toolkit export --format aoti`: the pipeline's format entry ----------------------------------

def _write(job: ExportJob, path: Path) -> Path:
    return export(job.model, job.card, path, precision=job.precision, batch=BatchRange.of(job),
                  device=job.device)


FORMAT = FormatSpec("aoti", _write, PRECISIONS, options=(BatchRangeOptions,))
