"""Deployable inference and export toolkit for ResNet/ResNeXt image classifiers.

Importing this package is cheap on purpose: heavy dependencies (torch, onnxruntime, tensorrt)
are imported by the modules that need them, so `toolkit --help` and ONNX-only paths stay fast.
"""

__version__ = "0.1.0"
