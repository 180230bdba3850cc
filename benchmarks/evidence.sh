#!/usr/bin/env bash
# The evidence study of docs/benchmark.md: does the method beat supervised-only at 25 labelled images?
# Evidence recipe (configs/evidence_recipe.json): benchmark phantom (998 images), 25 labelled of a 500-image training
# pool, 224 px, batch 1 labelled + 4 unlabelled, 300 iterations, ramp to full weight at iteration 150, ICT from 30,
# SGD lr 0.01, fp32. Every run shows progress in its log.txt and resumes: finished runs are skipped.
#   usage: bash benchmarks/evidence.sh [OUT=runs]      (one run at a time, 1 thread each: OMP_NUM_THREADS=1)
set -eu
out=${1:-runs}
data=data/phantom_benchmark
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f $data/phantom.json ] || python -m scripts.data phantom --dataset_dir $data --num_subjects 830
common=(--fractions "['n25']" --recipe configs/evidence_recipe.json --dataset_dir $data --threads 1
        --overrides "{'max_train_images': 500}")
# 1. the full method and both supervised baselines, seeds 0-2 (same splits, same schedule)
python -m scripts.experiments.compare run --output_dir $out/evidence --methods "['supervised','supervised_same_batch','full']" \
  --seeds "[0,1,2]" "${common[@]}"
# 2. the full method with the self-supervised (SimMIM) Swin-Unet start, seed 0: pretrain on seed 0's training pool
python -m scripts.method.pretrain --prepared_dir $out/evidence/prepared_n25_seed0 --output $out/evidence_ssl/swin_simmim_seed0.pt \
  --iterations 300 --batch_size 8
python -m scripts.experiments.compare run --output_dir $out/evidence_ssl --methods "['full']" --seeds "[0]" --fractions "['n25']" \
  --recipe configs/evidence_recipe.json --dataset_dir $data --threads 1 \
  --overrides "{'max_train_images': 500, 'swin_pretrained_path': '$PWD/$out/evidence_ssl/swin_simmim_seed0.pt'}"
# 3. tables: mean ± std over seeds, per-seed paired differences against each baseline; the figure
python -m scripts.experiments.compare table --output_dir $out/evidence --paired "[['full','supervised'],['full','supervised_same_batch']]"
python docs/make_evidence_figure.py --groups "{'': '$out/evidence', 'SimMIM start': '$out/evidence_ssl'}" --out docs/evidence.png
