#!/bin/bash
# A/B of the one-cycle schedule on the supervised stages, same 4 epochs as :cpu_full.
cd /work/ab-tree
echo "START $(date -Iseconds)"
time python -m rotjax.study --config configs/study.py:cpu_full_onecycle --config.stages='(5,)' \
  --config.workdir=/work/runs/ab-onecycle --config.base.data.cache_dir=/work/runs/decoded-cold
echo "STAGE5 END $(date -Iseconds)"
time python -m rotjax.main --config configs/supervised.py \
  --config.data.source=folder:~/.cache/rotjax/cifar10-jpeg --config.data.cache_dir=/work/runs/decoded-cold \
  --config.num_epochs=4 --config.keep_checkpoints=2 --config.progress=False --config.log_every_steps=50 \
  --config.init_from=/work/runs/cpu-full-idle/cifar10-resnet18-rot4-ls0.1-spcall-seed0/1_pretext \
  --config.optim.schedule=onecycle --config.workdir=/work/runs/ab-onecycle-stage4/4_supervised_pretrained
echo "END $(date -Iseconds)"
