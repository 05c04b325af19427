"""The names the CLI offers as choices for `export`, one list each, importable without numpy or torch.

The CLI builds its option enums from these at import time, when it may not import `export/` (nor
anything heavy: `toolkit --help` must answer instantly). The writers are keyed by the same names:
`export.pipeline.format_spec(name)` imports the "module:attribute" given here, only when that
format is asked for.

A new export format is its module under `export/` (a `FormatSpec` named `FORMAT`, see
`export/pipeline.py` "Plugging in a format") plus one line in `EXPORT_FORMATS`; when it is also a
new kind of file, one entry in the artifact-format registry (`toolkit/runtime/registry.py`) tells
`open_model` how to read it.
"""

from __future__ import annotations

# export format name -> "module:attribute" of its FormatSpec (imported on use)
EXPORT_FORMATS: dict[str, str] = {
    "torchscript": "export.pipeline:TORCHSCRIPT",
    "onnx": "export.pipeline:ONNX",
    "tensorrt": "export.tensorrt:FORMAT",
    "triton": "export.triton:FORMAT",
    "pt2": "export.torch_export:FORMAT",
    "aoti": "export.aoti:FORMAT",
}
# numeric precisions an export can carry (fp16/int8 live in the ONNX itself, also on the TensorRT road;
# bf16 only in torch.export programs and AOTInductor packages)
EXPORT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
# what an ONNX file (and the TensorRT engines and Triton models built from one) can carry
ONNX_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
# int8 range estimation, as export.quantize names them
CALIB_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
# datasets for --dataset / --calib-dataset (toolkit.data.load_dataset reads each)
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "folder", "sample")
# compute precisions of the torch/TorchScript runners (--precision of eval, predict, serve, validate)
RUN_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
# torch.compile modes (--compile)
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")
# the tensor names of every export (ONNX graph, TorchScript facts, engines) and of the v2 wire
INPUT_NAME, OUTPUT_NAME = "input", "logits"
