"""TorchScript archives from `toolkit export --format torchscript` (card and facts in `_extra_files`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..artifacts import read_torchscript
from ..errors import ModelFormatError, UsageError, first_line
from .torch_runner import RunOptions, TorchRunner, check_gpu_options, torch_device


class TorchScriptRunner(TorchRunner):
    """A `torch.jit.ScriptModule`, run exactly as the eager reference is (same device handling and call).

    Its weights are frozen graph constants, so `precision` fp16/bf16 runs under `torch.autocast` (an
    archive exported at fp16 runs as it is), and channels-last is off unless asked. The profiling
    executor optimises a graph only after it has seen a shape run: the runner warms up at load and
    runs each new batch shape `profiling_calls` extra times on its first call, so the loop's timed
    batches run the optimised graph (evaluate sets the first batch apart as warm-up).
    """

    backend = "torchscript"
    profiling_calls = 2

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu",  # type: ignore[override]
             precision: str = "fp32", channels_last: bool | None = None, cuda_graphs: bool = False,
             batch_size: int | None = None, warmup: int = 3) -> TorchScriptRunner:
        """Card and facts are read from the archive's extra files before torch loads the module.
        `precision`, `channels_last`, `cuda_graphs`, `batch_size`, `warmup`: as the torch backend's."""
        import torch

        check_gpu_options(device, precision, cuda_graphs, None)
        path = Path(path)
        card, facts = read_torchscript(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
                module = torch.jit.load(str(path), map_location=torch_device(device))
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelFormatError(f"{path}: not a readable TorchScript archive "
                                   f"({first_line(exc)})") from None
        # a frozen archive's weights are graph constants: reduced precision comes from autocast, unless
        # the archive was exported at it (fp32 edges around an fp16 body)
        own = facts.precision or "fp32"
        if own != "fp32" and precision not in ("fp32", own):
            raise UsageError(f"{path} is a {own} TorchScript archive; --precision {precision} needs the fp32 "
                             "export (or the checkpoint with --backend torch)")
        options = RunOptions(channels_last=bool(channels_last), cuda_graphs=cuda_graphs,
                             batch_size=batch_size)
        return cls(module, card, source=str(path), device=device, facts=facts,
                   precision=own if own != "fp32" else precision, options=options,
                   cast="none" if own != "fp32" else "autocast").warm_up(warmup)

    def close(self) -> None:
        self.model = None
        self._forward = None  # type: ignore[assignment]
        self._graphs.clear()
