"""FLOPs of one network evaluation (the floor for sampling and training time), counted by torch's FlopCounterMode.

    python bench/flops.py

Counts multiply-adds as 2 FLOPs (convolutions, matmuls, attention) at batch 1.
"""

import click
import torch

from common import random_teacher, count_flops as count
from training.networks_edm2 import Precond
from training.networks_ncvsd import ConditionalPrecond, ConditionalDiscriminator

EDM2_IMG64_S = dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4],
    num_blocks=3, attn_resolutions=[16, 8], use_fp16=False)

@click.command()
def main():
    torch.set_grad_enabled(False)
    configs = []
    for preset in ('bench-a', 'bench-b'):
        teacher, _ = random_teacher(preset, torch.device('cpu'))
        configs.append((preset, teacher))
    configs.append(('EDM2 img64-s architecture', Precond(**EDM2_IMG64_S)))
    print('| network | teacher D(x; σ) | student G (ctrl + enc + dec) | discriminator |')
    print('| --- | --- | --- | --- |')
    for name, teacher in configs:
        kwargs = dict(teacher.init_kwargs, use_fp16=False)
        student, disc = ConditionalPrecond(**kwargs).eval(), ConditionalDiscriminator(**kwargs).eval()
        shape = [1, teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
        x, sigma = torch.randn(shape), torch.ones(1)
        labels = torch.eye(teacher.label_dim)[:1] if teacher.label_dim else None
        flops = [count(lambda: teacher.eval()(x, sigma, labels)), count(lambda: student(x, sigma, x, sigma, labels)),
            count(lambda: disc(x, sigma, x, sigma, labels))]
        print(f'| {name} | ' + ' | '.join(f'{f / 1e9:.3f} GFLOP' for f in flops) + ' |')

if __name__ == '__main__':
    main()
