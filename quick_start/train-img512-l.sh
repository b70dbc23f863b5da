#!/usr/bin/env bash
# NCVSD img512-l: distill edm2-img512-l-1879048-0.085.pkl (download it into ../model_zoo/edm2, see quick_start/edm2.txt).
# Edit DISTRIBUTED_ARGS for your cluster; --batch-gpu suits an A100-80G; lowering it changes no hyperparameter.
set -e
DISTRIBUTED_ARGS="--standalone --nproc_per_node=8"

torchrun $DISTRIBUTED_ARGS train_ncvsd.py \
    --preset=img512-l \
    --net=../model_zoo/edm2/edm2-img512-l-1879048-0.085.pkl \
    --data=../data/edm2/img512-sd.zip \
    --outdir=training-runs/ncvsd-img512-l \
    --batch-gpu=8 --duration=64Mi --checkpoint=4Mi --snapshot=1Mi \
    "$@"
