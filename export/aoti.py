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

import io
import shutil
from pathlib import Path
from typing import Any

from toolkit.card import ModelCard
from toolkit.errors import BackendUnavailableError, ExportError, first_line
from toolkit.fileio import atomic_write_bytes
from toolkit.pt2_archive import pt2_extra_files
from toolkit.runtime.aoti_runner import quiet_cuda_home_warning

from .pipeline import ExportJob, FormatSpec
from .torch_export import (
    DEFAULT_RANGE,
    PRECISIONS,
    BatchRange,
    BatchRangeOptions,
    exported_program,
    facts,
)


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
    """What a package compiled here depends on beyond the torch version (the facts' `extra`): the device
    kind, and on CPUs the vector ISA; the runner checks each on load."""
    import torch

    kind = torch.device(device).type
    return {"device": kind, **({"cpu_isa": cpu_isa()} if kind == "cpu" else {})}


def gpu_facts(device: str) -> dict[str, Any]:
    """The GPU a CUDA package's kernels were compiled for (ArtifactFacts fields, as TensorRT engines)."""
    import torch

    index = torch.device(device).index or 0
    return {"gpu": torch.cuda.get_device_name(index),
            "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability(index))}


def compile_package(program: Any, extra_files: dict[str, str]) -> bytes:
    """The package's bytes: AOTInductor's generated files, packaged with `extra_files`."""
    import torch

    try:  # the writer torch.export.save uses: AOTInductor's own packager takes no extra files
        from torch.export.pt2_archive._package import package_pt2
    except ImportError:
        raise ExportError(f"torch {torch.__version__} cannot write AOTInductor packages with extra files "
                          "(torch >= 2.7 can)") from None
    module = program.module(check_guards=False)
    args, kwargs = program.example_inputs
    try:
        files = torch._inductor.aot_compile(module, args, kwargs, options={"aot_inductor.package": True})
    except Exception as exc:  # noqa: BLE001 - inductor lowering, C++ compile or link errors
        raise ExportError(f"AOTInductor could not compile the program: {first_line(exc)}") from None
    if not isinstance(files, list):
        raise ExportError(f"AOTInductor returned {type(files).__name__}, not the package's file list")
    buffer = io.BytesIO()
    package_pt2(buffer, aoti_files=files, extra_files=extra_files)
    return buffer.getvalue()


def export(model: Any, card: ModelCard, output: str | Path, *, precision: str = "fp32",
           batch: BatchRange = DEFAULT_RANGE, device: str = "cpu") -> Path:
    """Compile `model` into an AOTInductor package at `output` (atomically), card and facts inside."""
    with quiet_cuda_home_warning():
        cpp_compiler()  # fail before the slow work
        environment = build_environment(device)
        program = exported_program(model, card, precision, batch, device)
        described = facts(card, "aoti", precision, batch, "AOTInductor", **environment)
        if environment["device"] == "cuda":
            described = described.replace(**gpu_facts(device))
        data = compile_package(program, pt2_extra_files(card, described))
    return atomic_write_bytes(Path(output), data)


# --- `toolkit export --format aoti`: the pipeline's format entry ----------------------------------

def _write(job: ExportJob, path: Path) -> Path:
    return export(job.model, job.card, path, precision=job.precision, batch=BatchRange.of(job),
                  device=job.device)


FORMAT = FormatSpec("aoti", _write, PRECISIONS, options=(BatchRangeOptions,))
