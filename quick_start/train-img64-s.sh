#!/usr/bin/env bash
# NCVSD img64-s: distill edm2-img64-s-1073741-0.075.pkl (download it into ../model_zoo/edm2, see quick_start/edm2.txt).
# Edit DISTRIBUTED_ARGS for your cluster; --batch-gpu suits an A100-80G; lowering it changes no hyperparameter.
set -e
DISTRIBUTED_ARGS="--standalone --nproc_per_node=8"

torchrun $DISTRIBUTED_ARGS train_ncvsd.py \
    --preset=img64-s \
    --net=../model_zoo/edm2/edm2-img64-s-1073741-0.075.pkl \
    --data=../data/edm2/img64.zip \
    --outdir=training-runs/ncvsd-img64-s \
    --batch-gpu=64 --duration=64Mi --checkpoint=4Mi --snapshot=1Mi \
    "$@"
