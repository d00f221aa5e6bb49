#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, on a random-weight ChatGLM2-6B (real config.json):
# each training script for a few steps, then merge + int8/int4 quantization of the Trainer's adapter, then
# inference_test.py on bf16, bf16 + adapter, int8 and int4.
#   bash benchmarks/gpu_suite.sh <tokenizer_dir> <work_dir> <results_dir>
set -euo pipefail
tokenizer_dir=$1 work=$2 results=$3
mkdir -p "$results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

python benchmarks/train_6b.py --tokenizer_dir "$tokenizer_dir" --work_dir "$work" --max_steps 20 \
  --json "$results/train.json" 2>&1 | tee "$results/train.log" | grep -E "^\||^#|^\\$|failed|written"
cp "$work"/*.log "$results/" 2>/dev/null || true

adapter=$work/runs/train_trainer-lora-1/adapter_model
for bits in 8 4; do
  rm -rf "$work/merged-int$bits"
  /usr/bin/time -f "merge int$bits: %e s, peak RSS %M KiB" python merge_lora_and_quantize.py --lora_path "$adapter" \
    --model_dir "$work/model" --output_path "$work/merged-int$bits" --qbits $bits --dtype bf16 2>&1 | tail -3 | tee -a "$results/merge.log"
done

python inference_test.py --model_dir="$work/model,$work/merged-int8,$work/merged-int4" --lora_path="$adapter" \
  --max_new_tokens=128 --json="$results/inference.json" 2>&1 | grep -E "^\||^#" | tee "$results/inference.log"
