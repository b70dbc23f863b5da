"""Sampling speed: an NCVSD student at 1/2/4 steps vs its teacher's EDM Heun sampler at 32 steps (63 NFE).

    python bench/sample.py --preset=bench-a [--batch=64 --repeats=3 --device=cpu]

Both networks have the preset's architecture (random weights: speed does not depend on them);
the student is the conditional network (two encoders + one decoder) built from that teacher.
"""

import time

import click
import torch

from common import random_teacher, synchronize
from training.networks_ncvsd import ConditionalPrecond, GenerativeDenoiser
from training.sampling import edm_heun_sampler, StackedRandomGenerator
from training.speed import OPTIONS, set_speed_options

def images_per_second(fn, batch, repeats, device):
    fn()                                                     # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return batch / min(times)

@click.command()
@click.option('--preset', default='bench-a', show_default=True)
@click.option('--batch', type=int, default=64, show_default=True)
@click.option('--repeats', type=int, default=3, show_default=True)
@click.option('--heun-steps', type=int, default=32, show_default=True)
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--off', help=f'Speed options to turn off: all, or a comma list of {", ".join(OPTIONS)}', default='', metavar='LIST')
def main(preset, batch, repeats, heun_steps, device, off):
    torch.set_grad_enabled(False)
    set_speed_options(**{name: False for name in (list(OPTIONS) if off == 'all' else [n for n in off.split(',') if n])})
    device = torch.device(device)
    teacher, _config = random_teacher(preset, device)
    teacher.eval()
    student = GenerativeDenoiser(ConditionalPrecond(**teacher.init_kwargs).init_from_pretrained(teacher).eval().to(device))
    shape = [batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    labels = torch.eye(teacher.label_dim, device=device)[torch.arange(batch, device=device) % teacher.label_dim] if teacher.label_dim else None
    rnd = StackedRandomGenerator(device, range(batch))
    noise = rnd.randn(shape, device=device)
    print(f'{preset}: batch {batch}, {shape[2]}x{shape[3]}x{shape[1]}, device {device}, {torch.get_num_threads()} threads')
    heun = images_per_second(lambda: edm_heun_sampler(teacher, noise, labels, heun_steps), batch, repeats, device)
    print(f'teacher Heun {heun_steps} steps ({2 * heun_steps - 1} NFE): {heun:8.2f} img/s')
    for nfe, ts in ((1, [10, 39]), (2, [10, 22, 39]), (4, [0, 10, 20, 30, 39])):
        speed = images_per_second(lambda: student.sample(noise, labels, ts=ts, randn_like=rnd.randn_like), batch, repeats, device)
        print(f'student {nfe} step(s) --ts={",".join(map(str, ts))}: {speed:8.2f} img/s   speed-up x{speed / heun:.1f}')

if __name__ == '__main__':
    main()
