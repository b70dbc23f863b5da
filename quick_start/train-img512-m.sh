#!/usr/bin/env bash
# NCVSD img512-m: distill edm2-img512-m-2147483-0.100.pkl (download it into ../model_zoo/edm2, see quick_start/edm2.txt).
# Edit DISTRIBUTED_ARGS for your cluster; --batch-gpu suits an A100-80G; lowering it changes no hyperparameter.
set -e
DISTRIBUTED_ARGS="--standalone --nproc_per_node=8"

torchrun $DISTRIBUTED_ARGS train_ncvsd.py \
    --preset=img512-m \
    --net=../model_zoo/edm2/edm2-img512-m-2147483-0.100.pkl \
    --data=../data/edm2/img512-sd.zip \
    --outdir=training-runs/ncvsd-img512-m \
    --batch-gpu=32 --duration=64Mi --checkpoint=4Mi --snapshot=1Mi \
    "$@"
