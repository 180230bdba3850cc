#!/usr/bin/env bash
# One prepared GPU session of the benchmark (docs/benchmark.md), sized to finish inside BUDGET seconds:
#   1. training-iteration time and peak GPU memory of the full method (224 and 448 px, fp32 and bf16, batch 1 + 4);
#   2. the paper's recipe (configs/paper_recipe.json: 448 px, 5 % labels, 400 x labelled iterations) for the full
#      method and supervised-only, seed 0;
#   3. the Swin-Unet methods of the comparison grid (demo schedule, 5 % then 10 % labels, seeds 0-2), three at once.
# Parts 2 and 3 run side by side and stop at the deadline; whatever finished is tabulated and packed.
#   usage: bash benchmarks/gpu_run.sh WORK_DIR RESULT_DIR [BUDGET_SECONDS]
# Environment: ITERATION=0 skips part 1, PAPER=0 skips part 2; GRID_METHODS, GRID_FRACTIONS, GRID_WORKERS choose part 3.
set -u
work=${1:?work dir}; results=${2:?result dir}; budget=${3:-540}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
mkdir -p "$work" "$results"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, monai, ignite; print('torch', torch.__version__, 'monai', monai.__version__, 'ignite', ignite.__version__, 'cuda', torch.version.cuda)"
  nproc
} 2>&1 | tee "$results/machine.txt"

$py -m scripts.data phantom --dataset_dir "$work/phantom" > "$work/phantom.log" 2>&1 &
phantom=$!
[ "${ITERATION:-1}" = 1 ] && timeout 150 $py -m scripts.experiments.benchmark iteration --device cuda --sizes "[224, 448]" --runs 5 --warmup 3 \
  --amp "[False, True]" 2>&1 | grep -v Warning | tee "$results/iteration_gpu.txt"
wait $phantom || { echo "phantom generation failed"; tail "$work/phantom.log"; }

deadline=$(( $(left) - 45 ))
echo "training runs get $deadline s"
[ "${PAPER:-1}" = 1 ] && timeout -k 10 $deadline $py -m scripts.experiments.compare run --output_dir "$work/paper" --dataset_dir "$work/phantom" \
  --recipe configs/paper_recipe.json --methods "['supervised','full']" --fractions "[0.05]" --seeds "[0]" \
  --workers 2 --threads 3 > "$results/paper.log" 2>&1 &
timeout -k 10 $deadline $py -m scripts.experiments.compare run --output_dir "$work/grid" --dataset_dir "$work/phantom" \
  --methods "${GRID_METHODS:-['full','no_divergence','no_ict','no_cps','cross_teaching']}" \
  --fractions "${GRID_FRACTIONS:-[0.05, 0.1]}" --seeds "[0, 1, 2]" --workers ${GRID_WORKERS:-3} --threads 2 > "$results/grid.log" 2>&1 &
while [ -n "$(jobs -r)" ]; do
  sleep 30
  echo "$(( $(date +%s) - start )) s: paper $(ls "$work"/paper/*/result.json 2>/dev/null | wc -l) done," \
       "grid $(ls "$work"/grid/*/result.json 2>/dev/null | wc -l) done"
done
for d in paper grid; do
  ls "$work/$d"/*/result.json > /dev/null 2>&1 && $py -m scripts.experiments.compare table --output_dir "$work/$d" 2>&1 | tail -20
done
tar czf "$results/runs.tgz" -C "$work" --exclude='*.pt' --exclude=tensorboard --exclude='prepared_*' \
  --exclude=phantom --exclude='*.nii.gz' $(cd "$work" && ls -d paper grid 2>/dev/null)
ls -la "$results"
echo "total $(( $(date +%s) - start )) s"
