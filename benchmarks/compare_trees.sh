#!/bin/bash
# The speed-table rows, chat's first answer and predict.py over an instruction file, for two checkouts of this
# repository, alternating, in one call (host-bound rows vary between calls; compare within one). Needs CUDA.
#
#   bash benchmarks/compare_trees.sh OLD_CHECKOUT NEW_CHECKOUT TOKENIZERS_DIR MODEL_DIR DEV_FILE OUT_DIR [ROWS] [EXTRAS]
#
# EXTRAS (default first,predict): which of chat's first answer and predict.py to compare after the rows ("none": the
# rows only, e.g. to split a long comparison over several calls).
# OLD_CHECKOUT, e.g. `git worktree add /tmp/old <commit>`; TOKENIZERS_DIR: <version>/config.json and tokenizer files
# (../shared/assets/tokenizers); MODEL_DIR: a small model for predict.py (model_hub/chatglm2-small); DEV_FILE:
# instruction records (process.py's MSRA test set). Each tree's logs and JSON go to OUT_DIR; the predictions of the two
# trees are compared byte for byte.
set -o pipefail
old=$(realpath "$1"); new=$(realpath "$2"); cfg=$(realpath "$3"); model=$(realpath "$4"); dev=$(realpath "$5")
out=$(realpath "$6"); rows=${7:-decode-v2-b1,decode-v1-b1,decode-v2-b16,decode-v2-int4-b1,lora-v2,ptuning-v2,decode-glm4-b1}
extras=${8:-first,predict}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
tree_dir() { [ "$1" = old ] && echo "$old" || echo "$new"; }
for row in ${rows//,/ }; do
  for tree in old new; do
    (cd "$(tree_dir $tree)" && timeout 300 python benchmarks/speed_table.py --config_dir "$cfg" --work_dir /tmp/st-$tree \
       --rows "$row" --json "$out/$row-$tree.json") > "$out/$row-$tree.log" 2>&1
    echo "$row $tree (exit $?): $(grep -E '^\|' "$out/$row-$tree.log" | tail -1)"
  done
done
for tree in old new; do
  [[ $extras == *first* ]] || break
  (cd "$(tree_dir $tree)" && timeout 200 python benchmarks/first_answer.py --config_dir "$cfg" --options graph \
     --json "$out/first-$tree.json") > "$out/first-$tree.log" 2>&1
  echo "first answer $tree (exit $?): $(grep -E '^\|' "$out/first-$tree.log" | tail -1)"
done
for tree in old new; do
  [[ $extras == *predict* ]] || break
  start=$(date +%s.%N)
  (cd "$(tree_dir $tree)" && timeout 300 python predict.py --model_dir="$model" --lora_path=none --dev_file="$dev" \
     --data_name=compare --output_dir=/tmp/predict-$tree --batch_size=32 --max_new_tokens=32 --task=ner \
     $(grep -q max_input_tokens predict.py && echo --max_input_tokens=512 || echo --max_source_length=512)) \
     > "$out/predict-$tree.log" 2>&1
  echo "predict $tree (exit $?): $(awk "BEGIN{print $(date +%s.%N) - $start}") s wall; $(grep -m1 'samples from' "$out/predict-$tree.log")"
done
if [[ $extras == *predict* ]]; then
  cmp /tmp/predict-old/predictions.jsonl /tmp/predict-new/predictions.jsonl && echo "predictions identical"
fi
