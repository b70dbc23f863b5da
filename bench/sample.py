"""Sampling speed: an NCVSD student at 1/2/4 steps vs its teacher's EDM Heun sampler at 32 steps (63 NFE).

    python bench/sample.py --preset=bench-a [--batch=64 --repeats=3 --device=cpu]

Both networks have the preset's architecture (random weights: speed does not depend on them);
the student is the conditional network (two encoders + one decoder) built from that teacher, both prepared as
generate_images.py prepares a loaded network (frozen, marked constant). Each row gives img/s,
the best time per batch and (CUDA) that sampler's own peak memory; the CPU's peak is the process's. The 1-step
row also gives the achieved FLOP rate (FlopCounterMode's count) as a share of the device's dense FP16 peak;
`--profile=N` then profiles one batch of the 1-step student and prints where its time went.
"""

import time

import click
import torch

from common import bench_device, random_teacher, sampling_student, synchronize, peak_tflops, count_flops, flops_report, device_name, reset_peak_memory, peak_memory_mb, print_profile
import dnnlib
from training.network_io import emulated_precision_note
from training.networks_edm2 import set_precision
from training.noise_levels import PAPER_CHAINS
from training.sampling import edm_heun_sampler, StackedRandomGenerator
from training.speed import OPTIONS, set_speed_options, device_defaults, option_names, compile_network

def measure(fn, batch, repeats, device):
    """fn() timed after a warm-up: best ms per batch, img/s, and on CUDA its own peak memory (MiB)."""
    fn()                                                     # warm-up
    own_peak = reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return dnnlib.EasyDict(ms=min(times) * 1000, img_s=batch / min(times), peak_mb=peak_memory_mb(device) if own_peak else None)

def speed_line(speed, batch):
    peak = f', peak memory {speed.peak_mb:.0f} MiB' if speed.peak_mb is not None else ''
    return f'{speed.img_s:8.2f} img/s ({speed.ms:.1f} ms per batch of {batch}{peak})'

@click.command()
@click.option('--preset', default='bench-a', show_default=True)
@click.option('--batch', type=int, default=64, show_default=True)
@click.option('--repeats', type=int, default=3, show_default=True)
@click.option('--heun-steps', type=int, default=32, show_default=True)
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--off', help=f'Speed options to turn off: all, or a comma list of {", ".join(OPTIONS)}', default='', metavar='LIST')
@click.option('--precision', type=click.Choice(['fp32', 'fp16', 'bf16']), help='UNet bodies [default: the preset\'s fp16 flag]')
@click.option('--compile', 'compile_nets', type=bool, default=False, show_default=True, help='torch.compile the networks (inductor)')
@click.option('--peak-tflops', 'given_peak', type=float, default=None, help='Dense FP16 peak of the device (default: known GPUs)')
@click.option('--profile', 'profile_top', type=int, default=0, metavar='N', help='Then profile one batch of the 1-step student: busy time by kind of work, its N largest kernels (CUDA: and operators)')
def main(preset, batch, repeats, heun_steps, device, off, precision, compile_nets, given_peak, profile_top):
    torch.set_grad_enabled(False)
    device = bench_device(device)
    try:
        turned_off = option_names(off)
    except ValueError as err:
        raise click.BadParameter(str(err))
    teacher, config = random_teacher(preset, device)
    precision = precision or ('fp16' if config.get('fp16', False) else 'fp32')
    set_speed_options(**{**device_defaults(device, compiled=compile_nets, precision=precision), **{name: False for name in turned_off}})
    student = sampling_student(teacher, device)
    for net in (teacher, student):
        set_precision(net, precision)
    shape = [batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    labels = torch.eye(teacher.label_dim, device=device)[torch.arange(batch, device=device) % teacher.label_dim] if teacher.label_dim else None
    rnd = StackedRandomGenerator(device, range(batch))
    noise = rnd.randn(shape, device=device)
    one_step_flops = count_flops(lambda: student.sample(noise, labels, ts=[10, 39], randn_like=rnd.randn_like))
    if compile_nets:
        teacher, student.model = (compile_network(net) for net in (teacher, student.model))
    peak = peak_tflops(device, given_peak)
    print(f'{preset}: batch {batch}, {shape[2]}x{shape[3]}x{shape[1]}, device {device_name(device)}, torch {torch.__version__}, '
        f'{torch.get_num_threads()} threads, precision {precision}, compile {compile_nets}')
    note = emulated_precision_note(precision, device)
    if note:
        print(note)
    heun = measure(lambda: edm_heun_sampler(teacher, noise, labels, heun_steps), batch, repeats, device)
    print(f'teacher Heun {heun_steps} steps ({2 * heun_steps - 1} NFE): {speed_line(heun, batch)}')
    speeds = {}
    for nfe, ts in PAPER_CHAINS.items():
        speeds[nfe] = speed = measure(lambda: student.sample(noise, labels, ts=ts, randn_like=rnd.randn_like), batch, repeats, device)
        rate = f'   {flops_report(one_step_flops, speed.ms / 1000, peak)}' if nfe == 1 else ''
        print(f'student {nfe} step(s) --ts={",".join(map(str, ts))}: {speed_line(speed, batch)}   speed-up x{speed.img_s / heun.img_s:.1f}{rate}')
    if device.type != 'cuda':                               # CUDA: each sampler's own peak, above.
        print(f'peak memory {peak_memory_mb(device):.0f} MiB (the whole process)')
    if profile_top:
        print_profile('student 1 step', lambda: student.sample(noise, labels, ts=PAPER_CHAINS[1], randn_like=rnd.randn_like), device, profile_top,
            step_ms=speeds[1].ms)

if __name__ == '__main__':
    main()
