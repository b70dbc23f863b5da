"""Time one NCVSD training iteration (three phases, optimizer steps included) on random tensors.

    python bench/train_step.py --preset=bench-a [--batch=32 --iters=10 --warmup=2 --device=cpu]

Prints the median ms per phase and per iteration, img/s and peak memory. The reference is the
published implementation's iteration for bench-a at batch 32 on a 2-core CPU: ~830 ms
(score 265, discriminator 209, generator 361), as given in the performance issue.
"""

import click
import torch

from common import random_teacher, PhaseTimer, peak_memory_mb
from training.loss import NCVSDLoss
from training.speed import OPTIONS, set_speed_options, get_speed_options
from training.training_loop import NCVSDIteration, build_optimizers, build_students

def random_batches(shape, label_dim, device, generator):
    """Endless random (images, one-hot labels): the step without data loading."""
    while True:
        images = torch.randn(shape, generator=generator, device=device) * 0.5
        labels = torch.eye(label_dim, device=device)[torch.randint(label_dim, shape[:1], generator=generator, device=device)] if label_dim else torch.zeros(shape[0], 0, device=device)
        yield images, labels

@click.command()
@click.option('--preset', default='bench-a', show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--iters', type=int, default=10, show_default=True)
@click.option('--warmup', type=int, default=2, show_default=True)
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
@click.option('--off', help=f'Speed options to turn off: all, or a comma list of {", ".join(OPTIONS)}', default='', metavar='LIST')
def main(preset, batch, iters, warmup, device, threads, off):
    if threads:
        torch.set_num_threads(threads)
    names = list(OPTIONS) if off == 'all' else [name for name in off.split(',') if name]
    set_speed_options(**{name: False for name in names})
    device = torch.device(device)
    teacher, config = random_teacher(preset, device)
    teacher.eval().requires_grad_(False)
    G, S, D = build_students(teacher, dict(use_fp16=bool(config.get('fp16', False))), device)
    step = NCVSDIteration(G, S, D, teacher, NCVSDLoss(P_mean=config.P_mean, P_std=config.P_std), build_optimizers(G, S, D), config.gamma,
        num_rounds=1, batch_gpu_total=batch, g_lr_scaling=config.g_lr_scaling, d_lr_scaling=config.d_lr_scaling,
        rng=torch.Generator(device).manual_seed(0))
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    batches = random_batches(shape, teacher.label_dim, device, torch.Generator(device).manual_seed(1))
    timer = PhaseTimer(device)
    for it in range(warmup + iters):
        active = timer if it >= warmup else None
        with (timer('iteration') if active else PhaseTimer(device)('warmup')):
            step.run(batches, lr=1e-4, use_gan=True, timer=active)
    total = timer.median('iteration')
    phases = '  '.join(f'{name} {timer.median(name):.0f}' for name in step.phase_names)
    print(f'{preset}: batch {batch}, {teacher.img_resolution}x{teacher.img_resolution}x{teacher.img_channels}, device {device}, '
        f'{torch.get_num_threads()} threads, speed options {get_speed_options()}')
    print(f'median ms/iter {total:.0f}  ({phases})  img/s {batch / total * 1000:.1f}  peak memory {peak_memory_mb(device):.0f} MiB')

if __name__ == '__main__':
    main()
