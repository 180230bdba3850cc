#!/usr/bin/env bash
# One prepared GPU session (docs/benchmark.md, sections 2 and 3), sized to finish inside BUDGET seconds:
#   1. training-iteration time and peak GPU memory of the full method (224 and 448 px, fp32 and bf16, batch 1 + 4);
#   2. the inference pipeline (configs/inference.json) on 100 phantom images with the network on the GPU, against
#      the bare forward at the same batch size, with the config's workers and with more;
#   3. a longer schedule at 5 % labels on the demo phantom: the full method against the stronger supervised baseline
#      (same batch through the UNeXt), seeds 0 and 1, paper weights (1.0), 1000 iterations
#      (benchmarks/long_schedule_recipe.json); stopped at the deadline, whatever finished is tabulated, and every run's
#      validation curve comes back.
#   usage: bash benchmarks/gpu_speed.sh WORK_DIR RESULT_DIR [BUDGET_SECONDS]
# Environment: ITERATION=0 / PIPELINE=0 / SCHEDULE=0 skip a part; METHODS; OVERRIDES (train.json values, e.g.
# "{'total_iterations': 4, 'val_interval': 2}" for a dry run); PYTHON; DEVICE (cuda); SIZES ("[224, 448]").
set -u
work=${1:?work dir}; results=${2:?result dir}; budget=${3:-540}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
mkdir -p "$work" "$results"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}; device=${DEVICE:-cuda}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $py -c "import torch, monai, ignite; print('torch', torch.__version__, 'monai', monai.__version__, 'ignite', ignite.__version__, 'cuda', torch.version.cuda)"
  echo "cpu cores: $(nproc)"
} 2>&1 | tee "$results/machine.txt"

# the demo phantom (200 subjects) for parts 2 and 3, written on one core while part 1 runs
$py -m scripts.data phantom --dataset_dir "$work/phantom" > "$work/phantom.log" 2>&1 &
phantom=$!
[ "${ITERATION:-1}" = 1 ] && timeout 200 $py -m scripts.experiments.benchmark iteration --device "$device" --sizes "${SIZES:-[224, 448]}" \
  --runs 5 --warmup 3 --amp "[False, True]" 2>&1 | grep -v Warning | tee "$results/iteration_gpu.txt"
wait $phantom || { echo "phantom generation failed"; tail "$work/phantom.log"; }
echo "$(( $(date +%s) - start )) s: phantom ready"

if [ "${PIPELINE:-1}" = 1 ]; then
  for setting in "" "--num_workers 6 --writer_threads 8"; do
    timeout 150 $py -m scripts.experiments.benchmark pipeline --device "$device" --n_images 100 --runs 2 --threads 4 \
      --input_dir "$work/phantom/training_set" $setting 2>&1 | grep -v -i "warning\|codec" | tee -a "$results/pipeline_gpu.txt"
  done
fi

deadline=$(( $(left) - 40 ))
echo "$(( $(date +%s) - start )) s: the schedule runs get $deadline s"
if [ "${SCHEDULE:-1}" = 1 ] && [ $deadline -gt 60 ]; then
  timeout -k 10 $deadline $py -m scripts.experiments.compare run --output_dir "$work/schedule" --dataset_dir "$work/phantom" \
    --methods "${METHODS:-['supervised_same_batch','full']}" --fractions "[0.05]" --seeds "[0, 1]" --workers 4 --threads 3 \
    --recipe benchmarks/long_schedule_recipe.json --overrides "${OVERRIDES:-None}" \
    > "$results/schedule.log" 2>&1 &
  while [ -n "$(jobs -r)" ]; do
    sleep 20
    echo "$(( $(date +%s) - start )) s: $(ls "$work"/schedule/*/result.json 2>/dev/null | wc -l) runs done;" \
         "$(cat "$work"/schedule/*/eval/validation.csv 2>/dev/null | wc -l) validation rows"
  done
  ls "$work"/schedule/*/result.json > /dev/null 2>&1 && $py -m scripts.experiments.compare table --output_dir "$work/schedule" 2>&1 | tail -12
  tar czf "$results/schedule_runs.tgz" -C "$work" --exclude='*.pt' --exclude=tensorboard --exclude='prepared_*' \
    --exclude='*.nii.gz' --exclude='*.png' schedule
fi
ls -la "$results"
echo "total $(( $(date +%s) - start )) s"
