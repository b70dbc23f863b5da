"""Artifacts for bench/gpu_check.sh: a random EDM2 teacher pickle of a preset's architecture and a
labelled zip dataset of random images at its resolution (nothing is downloaded).

    python bench/gpu_assets.py --preset=bench-s64 --outdir=/tmp/gpu-assets --images=512
"""

import json
import os
import pickle

import click
import numpy as np
import PIL.Image

from common import random_teacher             # First: puts the repository on sys.path.
import dnnlib
from training.dataset_io import convert_dataset

@click.command()
@click.option('--preset', default='bench-s64', show_default=True)
@click.option('--outdir', required=True, metavar='DIR')
@click.option('--images', type=int, default=512, show_default=True)
def main(preset, outdir, images):
    import torch
    teacher, _config = random_teacher(preset, torch.device('cpu'))
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, 'teacher.pkl'), 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=teacher.half(), loss_fn=None), f)     # float16, like the published teachers
    folder = os.path.join(outdir, 'images')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    res = teacher.img_resolution
    for i in range(images):
        PIL.Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(os.path.join(folder, f'{i:05d}.png'))
    labels = [[f'{i:05d}.png', spread_label(i, images, teacher.label_dim)] for i in range(images)]
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(dict(labels=labels if teacher.label_dim else None), f)
    convert_dataset(folder, os.path.join(outdir, 'data.zip'))
    print(f'Wrote {outdir}/teacher.pkl ({res}x{res}x{teacher.img_channels}, {teacher.label_dim} classes) and data.zip ({images} images)')

def spread_label(index, images, classes):
    """Classes spread over the images, the first and the last among them: a dataset's class count is its largest
    label + 1, so fewer images than classes (512 for ImageNet's 1000) must still hold the last class."""
    return index * max(classes - 1, 0) // max(images - 1, 1)

if __name__ == '__main__':
    main()
