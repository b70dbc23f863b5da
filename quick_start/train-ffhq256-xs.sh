#!/usr/bin/env bash
# NCVSD ffhq256-xs: distill edm2-ffhq256-xs.pkl (download it into ../model_zoo/edm2, see quick_start/edm2.txt).
# Edit DISTRIBUTED_ARGS for your cluster; --batch-gpu suits an A100-80G; lowering it changes no hyperparameter.
set -e
DISTRIBUTED_ARGS="--standalone --nproc_per_node=8"

torchrun $DISTRIBUTED_ARGS train_ncvsd.py \
    --preset=ffhq256-xs \
    --net=../model_zoo/edm2/edm2-ffhq256-xs.pkl \
    --data=../data/edm2/ffhq256.zip \
    --outdir=training-runs/ncvsd-ffhq256-xs \
    --batch-gpu=16 --duration=4Mi --checkpoint=256Ki --snapshot=64Ki \
    --cond=False --ls=0.1 \
    "$@"
