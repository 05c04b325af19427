"""torch.export: an `ExportedProgram` with a dynamic batch, saved as a `.pt2` archive with its card inside.

TorchScript's successor upstream (`torch.jit` prints "deprecated, switch to torch.compile or
torch.export" since torch 2.10). `torch.export.save` writes a zip (the PT2 archive: `models/`,
`data/weights/`) whose `extra/` entries hold the card and the facts under the names TorchScript
uses (`card.json`, `artifact.json`), so `toolkit.artifacts.read_pt2` reads them without torch.

The batch dimension is a `torch.export.Dim` in 1..max_batch (default 32, as TensorRT profiles and
Triton models), so the program's guards refuse larger batches and the runner splits them; `--static`
fixes it at `--batch-size`. fp16/bf16 programs hold reduced-precision weights and activations behind
fp32 inputs/outputs (a cast at each edge), as fp16 TorchScript and ONNX files do, so every runner
feeds them the same float32 batches. The AOTInductor writer (`export/aoti.py`) compiles the same
program.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.artifacts import ArtifactFacts, TensorFacts
from toolkit.card import ModelCard
from toolkit.errors import ExportError, UsageError, first_line
from toolkit.fileio import atomic_write_bytes
from toolkit.names import INPUT_NAME, OUTPUT_NAME
from toolkit.pt2_archive import pt2_extra_files

from .pipeline import ExportJob, FormatSpec
from .tensorrt import default_max_batch

PRECISIONS = ("fp32", "fp16", "bf16")
EXAMPLE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1


@dataclass(frozen=True)
class BatchRangeOptions:
    """`--max-batch`: the largest batch a torch.export program or AOTInductor package accepts."""

    max_batch: int | None = None  # default: max(32, --batch-size)

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise UsageError(f"--max-batch must be >= 1, got {self.max_batch}")


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes a program accepts: 1..max when dynamic, exactly one size when static."""

    min: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.max

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "max": self.max}

    @classmethod
    def of(cls, job: ExportJob) -> BatchRange:
        """From the job: --static --batch-size N fixes N; else 1..--max-batch (default max(32, N))."""
        max_batch = job.option(BatchRangeOptions).max_batch
        if not job.dynamic:
            if max_batch is not None and max_batch != job.batch_size:
                raise UsageError("--static fixes the batch at --batch-size; --max-batch is for a dynamic "
                                 "batch (drop one of them)")
            return cls(job.batch_size, job.batch_size)
        return cls(1, max_batch or default_max_batch(job.batch_size))


DEFAULT_RANGE = BatchRange(1, default_max_batch(1))


def torch_dtype(precision: str) -> Any:
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"torch.export precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def at_precision(model: Any, precision: str) -> Any:
    """`model` itself at fp32; else a reduced-precision copy behind fp32 edges (the caller's model stays
    fp32: it is the reference the export is verified against)."""
    import torch

    dtype = torch_dtype(precision)
    if dtype is torch.float32:
        return model.eval()

    class ReducedPrecision(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(dtype)).float()

    return ReducedPrecision(copy.deepcopy(model).to(dtype)).eval()


def exported_program(model: Any, card: ModelCard, precision: str = "fp32",
                     batch: BatchRange = DEFAULT_RANGE, device: str = "cpu") -> Any:
    """`torch.export.export` of `model` at `precision` on `device`, its batch dimension `batch`."""
    import torch

    if batch.min < 1 or batch.max < batch.min:
        raise UsageError(f"the batch range needs 1 <= min <= max, got {batch.min}..{batch.max}")
    module = at_precision(model, precision).to(device)
    size = batch.min if batch.static else max(batch.min, min(EXAMPLE_BATCH, batch.max))
    example = torch.randn(size, *card.input_size, device=device)
    shapes = None
    if not batch.static:
        shapes = ({0: torch.export.Dim("batch", min=batch.min, max=batch.max)},)
    try:
        with torch.no_grad():
            return torch.export.export(module, (example,), dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds (UserError, guards, ...)
        raise ExportError(f"torch.export cannot capture this model: {first_line(exc)}") from None


def facts(card: ModelCard, fmt: str, precision: str, batch: BatchRange, exporter: str,
          **extra: Any) -> ArtifactFacts:
    """What the archive is: precision, I/O (batch symbolic unless static), the batch range, torch version."""
    import torch

    size: int | str = batch.min if batch.static else "batch"
    inputs = (TensorFacts(INPUT_NAME, (size, *card.input_size), "float32"),)
    outputs = (TensorFacts(OUTPUT_NAME, (size, card.num_classes), "float32"),)
    return ArtifactFacts(fmt, precision=precision, inputs=inputs, outputs=outputs,
                         exporter=f"{exporter} (torch {torch.__version__})", profile=batch.to_dict(),
                         extra={"torch_version": torch.__version__, **extra})


def export(model: Any, card: ModelCard, output: str | Path, *, precision: str = "fp32",
           batch: BatchRange = DEFAULT_RANGE, device: str = "cpu") -> Path:
    """Write `output` (a .pt2 archive, atomically) with its card and facts, and return it."""
    import torch

    program = exported_program(model, card, precision, batch, device)
    described = facts(card, "pt2", precision, batch, "torch.export", device=device)
    buffer = io.BytesIO()  # whole archive in memory first: a full disk then fails cleanly, not mid-zip
    torch.export.save(program, buffer, extra_files=pt2_extra_files(card, described))
    return atomic_write_bytes(Path(output), buffer.getvalue())


# --- `toolkit export --format pt2`: the pipeline's format entry -----------------------------------

def _write(job: ExportJob, path: Path) -> Path:
    return export(job.model, job.card, path, precision=job.precision, batch=BatchRange.of(job),
                  device=job.device)


FORMAT = FormatSpec("pt2", _write, PRECISIONS, options=(BatchRangeOptions,))
