"""Eager PyTorch from a checkpoint: the reference every export is verified against.

On a GPU it runs at full speed when asked: weights cast once to fp16/bf16 (`precision`), channels-last
memory, uint8 batches uploaded from pinned memory and normalised on the device (`run_uint8`), CUDA
graphs for fixed batch shapes (`cuda_graphs`) or `torch.compile` (`compile`) with inductor's cache in a
reusable folder. Fixed shapes: a smaller batch is padded to the first batch's size, a larger one split.

As every backend: the constructor stores (and places the module on its device), `open` does the work
and ends with `Runner.warm_up`, so timings exclude it (as Polygraphy's runners keep `__init__` cheap
and `activate` heavy).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactFacts, checkpoint_facts
from ..card import ModelCard
from ..card_layers import CardFlags, checkpoint_card
from ..checkpoint import ArchInfo, LoadedCheckpoint, load_checkpoint, load_strict, resolve_architecture
from ..device_preprocess import DTYPES, DeviceNormalizer, PinnedUploader, torch_dtype
from ..errors import BackendUnavailableError, InputError, UsageError, first_line
from ..names import COMPILE_MODES
from .base import Runner

log = logging.getLogger("toolkit")


def default_compile_cache() -> Path:
    """Where inductor keeps compiled kernels between runs: $XDG_CACHE_HOME or ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnet-toolkit" / "inductor"


@dataclass(frozen=True)
class RunOptions:
    """How the module runs, beyond its precision: memory format, capture, and the fixed batch shape."""

    channels_last: bool | None = None  # None: on for cuda
    cuda_graphs: bool = False  # capture one CUDA graph per input path at the fixed shape
    compile: str | None = None  # a torch.compile mode (names.COMPILE_MODES)
    compile_cache: str | Path | None = None  # inductor's cache folder (default: `default_compile_cache()`)
    batch_size: int | None = None  # the shape to warm up, capture and compile at (else the first batch's)


def check_gpu_options(device: str, precision: str, cuda_graphs: bool, compile: str | None) -> None:
    """Refuse combinations that cannot work, before anything is loaded."""
    if precision not in DTYPES:
        raise UsageError(f"--precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if compile is not None and compile not in COMPILE_MODES:
        raise UsageError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if cuda_graphs and not device.startswith("cuda"):
        raise UsageError("--cuda-graphs needs --device cuda")
    if cuda_graphs and compile is not None:
        raise UsageError("--cuda-graphs and --compile both capture the model; use one (compile's "
                         "reduce-overhead and max-autotune modes use CUDA graphs themselves)")


def torch_device(device: str) -> Any:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda needs a CUDA GPU and driver; none is visible here "
                                      "(use --device cpu)")
    return torch.device(device)


def load_state_into(model: Any, state: dict[str, Any]) -> None:
    """Strict load with one readable message (the same fit report `toolkit validate` shows)."""
    load_strict(model, state)


def build_from_checkpoint(
    ckpt: LoadedCheckpoint, *, arch: str | None = None,
    card_flags: CardFlags | Mapping[str, Any] | None = None,
) -> tuple[Any, ModelCard, ArchInfo]:
    """Network with weights loaded, its resolved card (`card_layers.checkpoint_card`) and the
    architecture facts."""
    from ..archs import build_model

    info = resolve_architecture(ckpt.state_dict, arch)
    card, _ = checkpoint_card(ckpt, info, card_flags)
    model = build_model(info.arch, info.num_classes, shortcut=info.shortcut)
    load_state_into(model, ckpt.state_dict)
    return model.eval(), card, info


class TorchRunner(Runner):
    """A torch module in eval mode under `torch.inference_mode`, at the precision and memory format asked."""

    backend = "torch"
    profiling_calls = 0  # extra calls per new input shape (TorchScript's profiling executor needs them)

    def __init__(self, model: Any, card: ModelCard, *, source: str, device: str = "cpu",
                 facts: ArtifactFacts | None = None, precision: str = "fp32",
                 options: RunOptions = RunOptions(), cast: str = "weights") -> None:
        """Store the module, placed on `device` at `precision`; nothing runs until called (`open` warms up).

        `cast`: how `precision` is reached: "weights" (cast once, inputs in that dtype), "autocast"
        (frozen TorchScript, whose weights are graph constants: autocast around fp32 edges) or "none"
        (the module is at that precision already, behind fp32 edges)."""
        super().__init__(card, source=source, device=device, facts=facts)
        import torch

        check_gpu_options(device, precision, options.cuda_graphs, options.compile)
        self._torch = torch
        self._device = torch_device(device)
        cuda = self._device.type == "cuda"
        self.precision = precision
        self.channels_last = cuda if options.channels_last is None else options.channels_last
        self.cuda_graphs = options.cuda_graphs
        self.compile_mode = options.compile
        self.compile_status = "off" if options.compile is None else "pending"
        self.compile_cache = Path(options.compile_cache or default_compile_cache())
        self.batch_size = options.batch_size
        self.accepts_uint8 = cuda  # on the CPU, numpy preprocessing in the prefetch thread is faster
        self._cast = cast
        self._dtype = torch_dtype(precision if cast == "weights" else "fp32")  # the model's input dtype
        self.model = self._prepare(model)
        self._normalize = DeviceNormalizer(card, self._device, precision if cast == "weights" else "fp32",
                                           self.channels_last)
        self._upload = PinnedUploader(self._device)
        self._forward: Callable[[Any], Any] = self.model
        if cast == "autocast" and precision != "fp32":
            self._forward = functools.partial(_autocast_call, self.model, self._device.type,
                                              torch_dtype(precision))
        self._eager: dict[str, Callable[[Any], Any]] = {"uint8": self._from_uint8, "float": self._from_float}
        self._steps = dict(self._eager)
        self._pending: set[str] = set()  # compiled steps not yet run: the first call compiles
        if options.compile is not None:
            self._steps, self._pending = self._compiled(options.compile), set(self._eager)
        self._fixed: int | None = options.batch_size if (options.cuda_graphs or options.compile) else None
        self._graphs: dict[tuple[str, tuple[int, ...]], Any] = {}
        self._seen: set[tuple[str, tuple[int, ...]]] = set()

    # --- preparation ------------------------------------------------------------------------------

    def _prepare(self, model: Any) -> Any:
        """Weights moved and cast once; channels-last where asked (the GPU default)."""
        torch = self._torch
        try:
            model = model.to(self._device)
            if self._dtype is not torch.float32:
                model = model.to(self._dtype)
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
        except (RuntimeError, TypeError) as exc:
            raise BackendUnavailableError(f"cannot place the model on {self.device} at {self.precision}: "
                                          f"{first_line(exc)}") from None
        return model.eval()

    def _compiled(self, mode: str) -> dict[str, Callable[[Any], Any]]:
        """torch.compile of each input path (uint8 -> normalise -> model, float -> model: the
        normalisation fuses into the compiled graph); eager if it cannot. Wrapping compiles nothing:
        the first call of each does (`_guarded`)."""
        torch = self._torch
        try:
            return {kind: torch.compile(step, mode=None if mode == "default" else mode, dynamic=False)
                    for kind, step in self._eager.items()}
        except Exception as exc:  # noqa: BLE001 - unsupported platform/Python: fall back, say why
            self._compile_failed(exc)
            return dict(self._eager)

    def _compile_failed(self, exc: BaseException) -> None:
        self.compile_status = f"fell back to eager: {first_line(exc)}"
        log.warning("warning: torch.compile is not possible here (%s); running eager", first_line(exc))
        self._steps, self._pending = dict(self._eager), set()

    def _warm_up_once(self) -> None:
        """One call at the fixed batch size, on the path real batches take (uint8 where the runner
        normalises on its device): kernels chosen, memory pools grown, graphs captured, code compiled.

        Without a known batch size, graphs and compiled code are made at the first real batch instead
        (the batch evaluate's timing sets apart as warm-up): a batch of one would fix the wrong shape.
        """
        if (self.cuda_graphs or self.compile_mode) and self._fixed is None:
            return
        n = self._fixed or self.batch_size or 1
        if self.accepts_uint8:
            self.run_uint8(np.zeros((n, self.card.height, self.card.width, 3), np.uint8))
        else:
            self(np.zeros((n, *self.card.input_size), np.float32))

    # --- running ----------------------------------------------------------------------------------

    def _from_uint8(self, images: Any) -> Any:
        return self._forward(self._normalize(images))

    def _from_float(self, batch: Any) -> Any:
        memory_format = self._torch.channels_last if self.channels_last else self._torch.contiguous_format
        return self._forward(batch.to(dtype=self._dtype, memory_format=memory_format))

    def _execute(self, kind: str, x: Any) -> np.ndarray:
        """Run the `kind` step on device tensor `x` at the fixed shape (padding/splitting), graph-captured
        if asked."""
        torch = self._torch
        n = len(x)
        fixed = self._fixed
        if fixed is None and (self.cuda_graphs or self.compile_mode):
            fixed = self._fixed = n
        if fixed is not None and n > fixed:
            return np.concatenate([self._execute(kind, x[i:i + fixed]) for i in range(0, n, fixed)])
        with torch.inference_mode():
            if fixed is not None and n < fixed:
                x = torch.cat([x, x[-1:].expand(fixed - n, *x.shape[1:])])
            key = (kind, tuple(x.shape))
            step = self._steps[kind]
            if key not in self._seen:
                self._seen.add(key)
                for _ in range(self.profiling_calls):
                    step(x)
            if self.cuda_graphs:
                graph = self._graphs.get(key) or self._graphs.setdefault(key, _Graph(torch, step, x))
                out = graph(x)
            else:
                out = self._guarded(kind, x)
            return out[:n].float().cpu().numpy()

    def _guarded(self, kind: str, x: Any) -> Any:
        """The step; its first compiled call compiles, and a failure there falls back to eager."""
        if kind not in self._pending:
            return self._steps[kind](x)
        try:
            with _inductor_cache(self.compile_cache):
                out = self._steps[kind](x)
        except Exception as exc:  # noqa: BLE001 - inductor/triton/C++ compiler missing: eager is correct
            self._compile_failed(exc)
            return self._steps[kind](x)
        self._pending.discard(kind)
        self.compile_status = "compiled"
        return out

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if not batch.flags.writeable:  # the server's shared-memory views: torch refuses to alias them
            batch = batch.copy()
        x = self._torch.from_numpy(batch).to(self._device)
        return self._execute("float", x)

    def run_uint8(self, images: Any) -> np.ndarray:
        """uint8 NHWC (numpy on the host, or a tensor already on this device) -> logits; normalised here."""
        torch = self._torch
        expected = (self.card.height, self.card.width, 3)
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected \
                    or not len(images):
                return super().run_uint8(images)  # resizes other sizes, or names what is wrong
            x = self._upload(images)
        elif isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
                raise InputError(f"expected uint8 images shaped (N, {', '.join(map(str, expected))}), "
                                 f"got {images.dtype} {tuple(images.shape)}")
            x = images.to(self._device, non_blocking=True)
        else:
            raise InputError("expected uint8 images as a numpy array or torch tensor, "
                             f"got {type(images).__name__}")
        return self._checked_output(self._execute("uint8", x), len(images))

    # --- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu", arch: str | None = None,
             allow_pickle: bool = False, card_flags: CardFlags | Mapping[str, Any] | None = None,
             precision: str = "fp32", channels_last: bool | None = None, cuda_graphs: bool = False,
             compile: str | None = None, compile_cache: str | Path | None = None,
             batch_size: int | None = None, warmup: int = 2) -> TorchRunner:
        """A checkpoint: `arch` overrides the inferred architecture, `allow_pickle` permits pickled code
        (trusted files only), `card_flags` override card fields (CLI flag > card > preset).

        `precision` fp32|fp16|bf16 (weights cast once), `channels_last` (default: on cuda),
        `cuda_graphs` (cuda, fixed shapes), `compile` default|reduce-overhead|max-autotune with
        inductor's cache in `compile_cache`, `batch_size` the fixed shape to warm up and capture at,
        `warmup` calls at load.
        """
        check_gpu_options(device, precision, cuda_graphs, compile)
        options = RunOptions(channels_last, cuda_graphs, compile, compile_cache, batch_size)
        if compile is not None:
            _make_cache_folder(Path(compile_cache or default_compile_cache()))
        ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
        model, card, _ = build_from_checkpoint(ckpt, arch=arch, card_flags=card_flags)
        return cls(model, card, source=str(path), device=device, facts=checkpoint_facts(card),
                   precision=precision, options=options).warm_up(warmup)

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "precision": self.precision, "channels_last": self.channels_last,
                "cuda_graphs": self.cuda_graphs, "fixed_batch_size": self._fixed}
        if self.compile_mode is not None:
            info.update(compile=self.compile_mode, compile_status=self.compile_status,
                        compile_cache=str(self.compile_cache))
        return info


def read_checkpoint(path: str | Path) -> tuple[ModelCard, ArtifactFacts]:
    """A checkpoint's card, resolved from its weights as `open` resolves it, and its facts (`FORMATS`'
    reader for checkpoints: `toolkit info`). Nothing is placed on a device or run."""
    _, card, _ = build_from_checkpoint(load_checkpoint(path))
    return card, checkpoint_facts(card)


def _make_cache_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--compile-cache {folder}: cannot create it ({exc.strerror})") from None


def _inductor_cache(folder: Path) -> Any:
    """Inductor's cache in `folder` while a step compiles, the process environment restored after.

    Inductor reads its cache folder only from TORCHINDUCTOR_CACHE_DIR (torch 2.14's
    torch._inductor.config has no setting for it), so the least global way is the scoped context
    torch's own `standalone_compile` uses: `cache_dir_utils.temporary_cache_dir`, which also clears
    inductor's cached paths on entry and exit. Compile workers are handed the variable per task.
    """
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    return temporary_cache_dir(str(folder))


def _autocast_call(model: Any, device_type: str, dtype: Any, x: Any) -> Any:
    import torch

    with torch.autocast(device_type, dtype=dtype):
        return model(x)


class _Graph:
    """One CUDA graph of `step` at `example`'s shape: copy in, replay, read the static output."""

    def __init__(self, torch: Any, step: Callable[[Any], Any], example: Any) -> None:
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # cuDNN picks its algorithms outside the capture
                step(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = step(self.static_in)

    def __call__(self, x: Any) -> Any:
        self.static_in.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out
