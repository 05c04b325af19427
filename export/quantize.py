"""int8 ONNX: static Q/DQ quantisation with ONNX Runtime, calibrated on real images.

Calibration images are a class-balanced, seeded selection from a dataset, fed through the one
`preprocess` function (via `Dataset.batches`), so int8 ranges are measured on exactly what the
model will see. Weights are s8 per output channel, activations u8 (asymmetric): on x86 ONNX Runtime
runs U8S8 with its fast integer kernels, while s8 activations were measured ~2x slower than fp32.
The Q/DQ file is also the TensorRT 11 int8 path (no builder calibrators there).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.artifacts import onnx_facts, onnx_header
from toolkit.card import ModelCard
from toolkit.data import Dataset, balanced_indices
from toolkit.errors import ExportError, UsageError, first_line
from toolkit.names import CALIB_METHODS
from toolkit.quiet import quieted

from . import onnx as onnx_export

DEFAULT_CALIB_SIZE = 512
ACTIVATION_TYPES = ("u8", "s8")


def select_calibration(dataset: Dataset, size: int = DEFAULT_CALIB_SIZE, seed: int = 0) -> Dataset:
    """`size` images, as even across classes as the data allows, chosen by a seeded generator
    (`toolkit.data.balanced_indices`, as `--limit` draws); unlabelled data is drawn uniformly.

    The images keep their source ids (`Dataset.ids`), so verification can prove it never sees them."""
    if size < 1:
        raise UsageError(f"--calib-size must be positive, got {size}")
    if len(dataset) == 0:
        raise UsageError(f"calibration dataset {dataset.name} is empty")
    if dataset.labels is None:
        chosen = np.random.default_rng(seed).permutation(len(dataset))[:size]
    else:
        chosen = balanced_indices(dataset.labels, size, seed)
    return dataset.take(chosen, f"{len(chosen)} of {len(dataset)} images for calibration (seed {seed})")


def calibration_batch_size(card: ModelCard) -> int:
    """Calibration keeps every intermediate tensor of a batch in memory: small batches for big inputs."""
    return 32 if card.height * card.width <= 64 * 64 else 8


def _reader(calib: Dataset, card: ModelCard, input_name: str) -> Any:
    """A reader ONNX Runtime can walk in strides (`CalibStridedMinMax`), one batch per stride, so the
    calibrator folds each batch into its ranges/histograms and memory stays one batch deep."""
    from onnxruntime.quantization import CalibrationDataReader

    size = calibration_batch_size(card)
    count = -(-len(calib) // size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.position, self.end = 0, count

        def __len__(self) -> int:
            return count

        def set_range(self, start_index: int, end_index: int) -> None:
            self.position, self.end = start_index, min(end_index, count)

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.position >= self.end:
                return None
            start = self.position * size
            self.position += 1
            part = calib.take(np.arange(start, min(start + size, len(calib))))
            return {input_name: next(part.batches(card, size))}

    return Reader()


def quantize(fp32_onnx: str | Path, card: ModelCard, output: str | Path, dataset: Dataset | None, *,
             calib_size: int = DEFAULT_CALIB_SIZE, method: str = "minmax", seed: int = 0,
             activations: str = "u8") -> Path:
    """Q/DQ int8 copy of an fp32 ONNX file at `output` (atomic), calibrated on `calib_size` images of
    `dataset` (`select_calibration`)."""
    if dataset is None:
        raise UsageError("int8 needs calibration images: pass --calib-dataset (cifar10, cifar100, folder "
                         "with --data-dir, or sample)")
    _check(method, activations)
    return quantize_selected(fp32_onnx, card, output, select_calibration(dataset, calib_size, seed),
                             method=method, activations=activations, seed=seed)


def _check(method: str, activations: str) -> None:
    if method not in CALIB_METHODS:
        raise UsageError(f"unknown calibration method {method!r}; "
                         f"choose one of {', '.join(CALIB_METHODS)}")
    if activations not in ACTIVATION_TYPES:
        raise UsageError(f"activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}")


def quantize_selected(fp32_onnx: str | Path, card: ModelCard, output: str | Path, calibration: Dataset, *,
                      method: str = "minmax", activations: str = "u8", seed: int = 0) -> Path:
    """`quantize` on images already chosen (`select_calibration`; `seed` is recorded in the facts): the
    export pipeline draws them once, so verification can hold out exactly these."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check(method, activations)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    act_types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    work = Path(tempfile.mkdtemp(prefix="toolkit-quant-"))
    try:
        prepared = work / "prepared.onnx"
        quantized = work / "int8.onnx"
        # ORT's quantizer logs its progress through the root logger and prints to stdout
        with quieted(None), contextlib.redirect_stdout(io.StringIO()):
            try:
                quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
            except Exception:  # noqa: BLE001 - pre-processing only helps; quantise the original instead
                shutil.copyfile(fp32_onnx, prepared)
            try:
                quantize_static(
                    str(prepared), str(quantized), _reader(calibration, card, _input_name(prepared)),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=act_types[activations],
                    weight_type=QuantType.QInt8, calibrate_method=methods[method],
                    extra_options={"ActivationSymmetric": activations == "s8", "WeightSymmetric": True,
                                   "CalibStridedMinMax": 1},  # one batch per stride; any method
                )
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"int8 quantisation failed: {first_line(exc)}") from None
        import onnx

        source = onnx_facts(onnx_header(fp32_onnx), Path(fp32_onnx))
        proto = onnx.load(str(quantized))
        record = (f"{calibration.name}-calib{len(calibration)}; method={method}; activations={activations}; "
                  f"weights=s8 per-channel; seed={seed}")
        exporter = f"{source.exporter or 'onnx'} + onnxruntime.quantization (Q/DQ)"
        facts = onnx_export.facts_of(proto, "int8", exporter=exporter, calibration=record)
        return onnx_export.save(proto, card, output, facts)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name
