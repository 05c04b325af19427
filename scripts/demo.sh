#!/usr/bin/env bash
# `make demo`: the main job on the bundled sample, start to finish, printing what a user sees.
#   validate -> export (TorchScript, ONNX fp32, ONNX int8) -> eval -> compare fp32 vs int8 -> predict -> info
set -euo pipefail
TOOLKIT=${1:-toolkit}
OUT=${2:-demo-out}
SAMPLE=toolkit/sample/resnet20_digits.pt
mkdir -p "$OUT"

step() { printf '\n\033[1;36m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "1. Validate the sample weights (architecture, health, accuracy gate)" \
  "$TOOLKIT" validate -m "$SAMPLE" --dataset sample --min-accuracy 0.95
step "2a. Export to TorchScript (verified against eager PyTorch)" \
  "$TOOLKIT" export -m "$SAMPLE" --format torchscript -o "$OUT/resnet20_digits.ts"
step "2b. Export to ONNX fp32 (verified against eager PyTorch)" \
  "$TOOLKIT" export -m "$SAMPLE" --format onnx -o "$OUT/resnet20_digits.onnx"
step "2c. Export to ONNX int8 (QDQ, calibrated on real sample images)" \
  "$TOOLKIT" export -m "$SAMPLE" --format onnx --precision int8 --calib-dataset sample -o "$OUT/resnet20_digits.int8.onnx"
step "2d. Export a Triton model repository" \
  "$TOOLKIT" export -m "$SAMPLE" --format triton -o "$OUT/triton"
step "3a. Evaluate the ONNX model on the sample test set (report files in $OUT/eval-onnx)" \
  "$TOOLKIT" eval -m "$OUT/resnet20_digits.onnx" --dataset sample --output-dir "$OUT/eval-onnx"
step "3b. Evaluate the int8 ONNX model" \
  "$TOOLKIT" eval -m "$OUT/resnet20_digits.int8.onnx" --dataset sample --output-dir "$OUT/eval-int8"
step "3c. Compare fp32 and int8: side by side, where they disagree, McNemar's test (report in $OUT/compare)" \
  "$TOOLKIT" compare -m "$OUT/resnet20_digits.onnx" -m "$OUT/resnet20_digits.int8.onnx" --dataset sample \
  --output-dir "$OUT/compare"
step "4. Predict arbitrary image files" \
  "$TOOLKIT" predict -m "$OUT/resnet20_digits.onnx" toolkit/sample/images --top-k 3
step "5. What is inside an artifact" \
  "$TOOLKIT" info -m "$OUT/resnet20_digits.int8.onnx"
printf '\n\033[1;36m== 6. Serve it over HTTP (Open Inference Protocol v2 + /predict), then stop it\033[0m\n'
"$(dirname "$TOOLKIT")/python" scripts/demo_serve.py "$TOOLKIT" "$OUT/resnet20_digits.onnx" toolkit/sample/images/digit_7.png
printf '\n\033[1;32mDemo finished.\033[0m Reports: %s/eval-onnx/report.html, %s/eval-int8/report.html, %s/compare/report.html\n' \
  "$OUT" "$OUT" "$OUT"
printf 'Serve it yourself: %s serve -m %s/resnet20_digits.onnx, then open http://127.0.0.1:8000/\n' "$TOOLKIT" "$OUT"
