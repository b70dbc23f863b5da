#!/usr/bin/env bash
# Inverse problems with PnP-GD on the FFHQ-256 test images:
#   bash quick_start/posterior-sample.sh {box_inpainting|gaussian_deblur_circ|motion_deblur_circ|super_resolution|phase_retrieval}
# Needs ../model_zoo/ncvsd/edm2-ffhq256-xs.pkl and the test images in ../data/test (see README).
set -e
TASK=${1:?usage: bash quick_start/posterior-sample.sh TASK_NAME}
shift
python posterior_sample.py \
    --net=../model_zoo/ncvsd/edm2-ffhq256-xs.pkl \
    --data=../data/test \
    --preset="$TASK" \
    --outdir="results/$TASK" \
    "$@"
