"""Time one NCVSD training iteration (three phases, optimizer steps included) on random tensors.

    python bench/train_step.py --preset=bench-a [--batch=32 --iters=10 --warmup=2 --device=cpu]
    python bench/train_step.py --preset=bench-s64 --precision=bf16 --compile=True      # on a GPU

Prints the median ms per phase and per iteration, img/s, peak memory, and the achieved FLOP rate (the
iteration's FLOPs, forward and backward, counted once by torch's FlopCounterMode) as a share of the device's
dense FP16 peak. It compares against the same script with `--off=all` (the straightforward implementation),
run on the same machine in the same session: the published iteration was measured at about 0.8x of that.
"""

import time

import click
import torch

from common import random_teacher, PhaseTimer, peak_memory_mb, peak_tflops, count_flops, flops_report, device_name
from training.loss import NCVSDLoss
from training.networks_edm2 import set_precision
from training.speed import OPTIONS, set_speed_options, get_speed_options, use_device_defaults
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
@click.option('--precision', type=click.Choice(['fp32', 'fp16', 'bf16']), help='UNet bodies [default: the preset\'s fp16 flag]')
@click.option('--compile', 'compile_nets', type=bool, default=False, show_default=True, help='torch.compile the networks (inductor)')
@click.option('--peak-tflops', 'given_peak', type=float, default=None, help='Dense FP16 peak of the device (default: known GPUs)')
def main(preset, batch, iters, warmup, device, threads, off, precision, compile_nets, given_peak):
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    use_device_defaults(device)
    set_speed_options(**{name: False for name in (list(OPTIONS) if off == 'all' else [name for name in off.split(',') if name])})
    teacher, config = random_teacher(preset, device)
    precision = precision or ('fp16' if config.get('fp16', False) else 'fp32')
    G, S, D = build_students(teacher, dict(use_fp16=precision != 'fp32'), device)
    for net in (G, S, D, teacher):
        set_precision(net, precision)
    optimizers = build_optimizers(G, S, D)
    def make_step(compile_backend):
        return NCVSDIteration(G, S, D, teacher, NCVSDLoss(P_mean=config.P_mean, P_std=config.P_std), optimizers, config.gamma,
            num_rounds=1, batch_gpu_total=batch, g_lr_scaling=config.g_lr_scaling, d_lr_scaling=config.d_lr_scaling,
            rng=torch.Generator(device).manual_seed(0), compile_backend=compile_backend)
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    batches = random_batches(shape, teacher.label_dim, device, torch.Generator(device).manual_seed(1))
    flops = count_flops(lambda: make_step(None).run(batches, lr=1e-4, use_gan=True))     # Eager: the counter would recompile.
    step = make_step('inductor' if compile_nets else None)
    start = time.perf_counter()
    step.run(batches, lr=1e-4, use_gan=True)
    first = time.perf_counter() - start
    timer = PhaseTimer(device)
    for it in range(warmup + iters):
        active = timer if it >= warmup else None
        with (timer('iteration') if active else PhaseTimer(device)('warmup')):
            step.run(batches, lr=1e-4, use_gan=True, timer=active)
    total = timer.median('iteration')
    phases = '  '.join(f'{name} {timer.median(name):.0f}' for name in step.phase_names)
    print(f'{preset}: batch {batch}, {teacher.img_resolution}x{teacher.img_resolution}x{teacher.img_channels}, device {device_name(device)}, '
        f'torch {torch.__version__}, {torch.get_num_threads()} threads, precision {precision}, compile {compile_nets}, speed options {get_speed_options()}')
    print(f'first iteration {first:.1f} s{" (compilation included)" if compile_nets else ""}; {flops / batch / 1e9:.1f} GFLOP per image per iteration')
    print(f'median ms/iter {total:.0f}  ({phases})  img/s {batch / total * 1000:.1f}  peak memory {peak_memory_mb(device):.0f} MiB  '
        f'{flops_report(flops, total / 1000, peak_tflops(device, given_peak))}')

if __name__ == '__main__':
    main()
