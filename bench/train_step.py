"""Time one NCVSD training iteration (three phases, optimizer steps included) on random tensors.

    python bench/train_step.py --preset=bench-a [--batch=32 --iters=10 --warmup=2 --device=cpu]
    python bench/train_step.py --preset=bench-a --variant=off=all --variant=default --variant='precision=bf16 compile=True'

Prints the median ms per phase and per iteration, img/s, peak memory, and the achieved FLOP rate (the
iteration's FLOPs, forward and backward, counted once by torch's FlopCounterMode) as a share of the device's
dense FP16 peak; `--profile=N` then profiles one more iteration of each variant and prints where its time went.
It compares against the straightforward implementation (`off=all`): the published iteration
was measured at about 0.8x of that. Give several `--variant`s to compare them in one process: their iterations
alternate (A B C A B C ...), so a machine whose speed drifts slows them alike, and each gets its ratio to the
first. A variant is `default` or space-separated settings: off=LIST, on=LIST (speed options, or all),
precision=fp32|fp16|bf16, compile=True|False, cuda_graphs=True|False (CUDA graphs: alone of torch's kernels, with
compile=True of inductor's; the first iteration and one warm-up record them). A variant that fails (its compiler,
running out of memory) is left out with its traceback and a one-line reason, the others go on, and the exit status
is 1.
"""

import signal
import statistics
import sys
import traceback

import click
import torch

from common import bench_device, bench_iteration, bench_preset, random_teacher, PhaseTimer, peak_memory_mb, reset_peak_memory, peak_tflops, count_flops, flops_report, device_name, print_profile
import dnnlib
from training.network_io import emulated_precision_note
from training.networks_edm2 import set_precision
from training.speed import OPTIONS, set_speed_options, device_defaults, option_names
from training.train_setup import compile_options
from training.training_loop import PHASES, build_optimizers, build_students, use_published_backends

def random_batches(shape, label_dim, device, generator):
    """Endless random (images, one-hot labels): the step without data loading."""
    while True:
        images = torch.randn(shape, generator=generator, device=device) * 0.5
        labels = torch.eye(label_dim, device=device)[torch.randint(label_dim, shape[:1], generator=generator, device=device)] if label_dim else torch.zeros(shape[0], 0, device=device)
        yield images, labels

def parse_variant(spec, device, default_precision):
    """'off=all precision=bf16 compile=True' -> EasyDict(label, speed={option: bool}, precision, compile_options).
    off= and on= apply in the order written, from the device's defaults, eager or compiled, for the precision
    ('on=all off=masked_clip': all but one)."""
    variant = dnnlib.EasyDict(label=spec or 'default', precision=default_precision, compile='False', cuda_graphs='False')
    switches = []
    for setting in spec.split() if spec != 'default' else []:
        key, _, value = setting.partition('=')
        if key not in ('off', 'on', 'precision', 'compile', 'cuda_graphs') or not value:
            raise click.BadParameter(f'"{setting}" in variant "{spec}": expected off=LIST, on=LIST, precision=fp32|fp16|bf16, '
                'compile=True|False or cuda_graphs=True|False')
        if key in ('off', 'on'):
            switches.append((key, value))
        else:
            variant[key] = value
    variant.speed = device_defaults(device, compiled=variant.compile == 'True', precision=variant.precision)
    for key, value in switches:
        try:
            variant.speed.update({name: key == 'on' for name in option_names(value)})
        except ValueError as err:
            raise click.BadParameter(str(err))
    if variant.precision not in ('fp32', 'fp16', 'bf16') or {variant.compile, variant.cuda_graphs} - {'True', 'False'}:
        raise click.BadParameter(f'variant "{spec}": precision is fp32, fp16 or bf16, compile and cuda_graphs True or False')
    if variant.cuda_graphs == 'True' and device.type != 'cuda':
        raise click.BadParameter(f'variant "{spec}": cuda_graphs=True needs a CUDA device')
    variant.compile_options = compile_options(dnnlib.EasyDict(compile=variant.compile == 'True', cuda_graphs=variant.cuda_graphs == 'True'))
    return variant

@click.command()
@click.option('--preset', default='bench-a', show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--iters', type=int, default=10, show_default=True, help='Timed iterations per variant')
@click.option('--warmup', type=int, default=2, show_default=True)
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
@click.option('--off', help=f'Speed options to turn off: all, or a comma list of {", ".join(OPTIONS)}', default='', metavar='LIST')
@click.option('--on', help='Speed options to turn on (where the device defaults leave them off)', default='', metavar='LIST')
@click.option('--precision', type=click.Choice(['fp32', 'fp16', 'bf16']), help='UNet bodies [default: the preset\'s fp16 flag]')
@click.option('--compile', 'compile_nets', type=bool, default=False, show_default=True, help='torch.compile the networks (inductor)')
@click.option('--cuda-graphs', type=bool, default=False, show_default=True, help='Replay the networks as CUDA graphs (with --compile: of inductor\'s kernels)')
@click.option('--variant', 'variants', multiple=True, metavar='SPEC', help='A configuration to compare (repeatable; replaces --off/--on/--precision/--compile/--cuda-graphs)')
@click.option('--peak-tflops', 'given_peak', type=float, default=None, help='Dense FP16 peak of the device (default: known GPUs)')
@click.option('--profile', 'profile_top', type=int, default=0, metavar='N', help='Then profile one more iteration of each variant: busy time by kind of work, its N largest kernels (CUDA: and operators)')
def main(preset, batch, iters, warmup, device, threads, off, on, precision, compile_nets, cuda_graphs, variants, given_peak, profile_top):
    if threads:
        torch.set_num_threads(threads)
    device = bench_device(device)
    use_published_backends()                                # As the training loop: no TF32, float16 matmuls reduce in float32.
    default_precision = 'fp16' if bench_preset(preset).get('fp16', False) else 'fp32'
    if not variants:
        variants = [' '.join(f'{key}={value}' for key, value in dict(off=off, on=on, precision=precision, compile=compile_nets, cuda_graphs=cuda_graphs).items() if value)]
    variants = [parse_variant(spec, device, default_precision) for spec in variants]
    teacher, config = random_teacher(preset, device)

    # One set of networks for all variants (the timing does not depend on the weights), each with its own iteration.
    G, S, D = build_students(teacher, dict(use_fp16=default_precision != 'fp32'), device)
    optimizers = build_optimizers(G, S, D)
    make_step = lambda options: bench_iteration(G, S, D, teacher, config, optimizers, batch, device, options)
    def activate(variant):
        set_speed_options(**variant.speed)
        for net in (G, S, D, teacher):
            set_precision(net, variant.precision)
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    batches = random_batches(shape, teacher.label_dim, device, torch.Generator(device).manual_seed(1))
    activate(variants[0])
    flops = count_flops(lambda: make_step(None).run(batches, lr=1e-4, use_gan=True))     # Eager: the counter would recompile.

    print(f'{preset}: batch {batch}, {teacher.img_resolution}x{teacher.img_resolution}x{teacher.img_channels}, device {device_name(device)}, '
        f'torch {torch.__version__}, {torch.get_num_threads()} threads; {flops / batch / 1e9:.1f} GFLOP per image per iteration; '
        f'median of {iters} iterations after {warmup} warm-up{" per variant, alternating" if len(variants) > 1 else ""}', flush=True)
    for note in {emulated_precision_note(variant.precision, device) for variant in variants} - {None}:
        print(note)
    signal.signal(signal.SIGTERM, stop)
    stopped = False
    try:
        for variant in variants:
            attempt(variant, lambda: first_iteration(variant, make_step, activate, batches, device))
        for it in range(warmup + iters):
            for variant in variants:                        # Alternating: drift of the machine's speed hits every variant.
                attempt(variant, lambda: timed_iteration(variant, activate, batches, device, timed=it >= warmup))
            print(f'{"warm-up" if it < warmup else "timed"} iteration {it + 1}/{warmup + iters}: ' + ', '.join(
                f'[{variant.label}] {variant.step_ms:.0f} ms' for variant in variants if 'failure' not in variant), flush=True)
    except (Stopped, Exception) as error:
        if not was_stopped(error):
            raise
        stopped = True
        print('Stopped by SIGTERM: the figures below are medians of the iterations finished so far', flush=True)
    timed = [variant for variant in variants if 'failure' not in variant and 'timer' in variant and 'iteration' in variant.timer.times]
    report(timed, batch, flops, peak_tflops(device, given_peak), device)
    if profile_top and not stopped:
        for variant in timed:
            activate(variant)
            print_profile(variant.label, lambda: variant.step.run(batches, lr=1e-4, use_gan=True), device, profile_top,
                step_ms=variant.timer.median('iteration'))
    failed = [variant for variant in variants if 'failure' in variant]
    if failed:
        sys.exit('failed: ' + '; '.join(f'[{variant.label}] {variant.failure}' for variant in failed))

def first_iteration(variant, make_step, activate, batches, device):
    """Build the variant's iteration and run it once (compilation, cuDNN's algorithm search), timed apart."""
    variant.step = make_step(variant.compile_options)
    variant.timer = PhaseTimer(device)
    activate(variant)
    with variant.timer('first'):
        variant.step.run(batches, lr=1e-4, use_gan=True)
    print(f'[{variant.label}] first iteration {variant.timer.median("first") / 1000:.1f} s', flush=True)

def timed_iteration(variant, activate, batches, device, timed):
    """One iteration of the variant, into its timer where `timed` (else a warm-up), with its own peak memory."""
    activate(variant)
    timer = variant.timer if timed else PhaseTimer(device)
    own_peak = reset_peak_memory(device)
    with timer('iteration'):
        variant.step.run(batches, lr=1e-4, use_gan=True, timer=timer)
    variant.step_ms = timer.times['iteration'][-1]
    if own_peak:
        variant.peak_mb = max(variant.get('peak_mb', 0), peak_memory_mb(device))

def attempt(variant, run):
    """run() for a variant not yet failed. An error of its own (a compiler's, running out of memory; not a SIGTERM)
    leaves it out with its traceback and a one-line reason, and the other variants go on: one broken configuration
    does not cost a lent GPU's call the figures of the rest."""
    if 'failure' in variant:
        return
    try:
        run()
    except (Stopped, Exception) as error:
        if was_stopped(error):
            raise
        traceback.print_exc()
        variant.failure = one_line(error)
        variant.pop('step', None)                          # Its graphs and buffers go back to the device.
        print(f'[{variant.label}] failed ({variant.failure}): left out, the other variants go on', flush=True)

def one_line(error):
    """'Type: message' in one line, the message up to its first line not ending in ':' (torch.compile's errors name
    the cause on the line after "backend='inductor' raised:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    end = next((i for i, line in enumerate(lines) if not line.endswith(':')), len(lines) - 1)
    return ' '.join([f'{type(error).__name__}:', *lines[:end + 1]])

class Stopped(BaseException):
    """SIGTERM (e.g. a time limit ran out): report what was measured so far. Not an Exception, as KeyboardInterrupt is
    not: the compiler's own `except Exception` (inductor probing the CPU's vector units, a cache bypass) would take it
    for a failure of its own, go on and finish the compile."""

def stop(_signum, _frame):
    raise Stopped()

def was_stopped(error):
    """Whether `error` is Stopped or was caused by it (torch.compile wraps what is raised while it compiles)."""
    while error is not None and not isinstance(error, Stopped):
        error = error.__cause__ or error.__context__
    return error is not None

def report(variants, batch, flops, peak, device):
    """Each variant's medians, its ratio to the first, FLOP rate and peak memory."""
    for variant in variants:
        total = variant.timer.median('iteration')
        off_options = [name for name, value in variant.speed.items() if not value]
        compiled = ', '.join(map(str, variant.compile_options.values())) if variant.compile_options else 'no'
        print(f'[{variant.label}] precision {variant.precision}, compile {compiled}, speed options off: {", ".join(off_options) or "none"}; '
            f'first iteration {variant.timer.median("first") / 1000:.1f} s{" (compilation included)" if variant.compile_options else ""}; '
            f'{len(variant.timer.times["iteration"])} timed iterations')
        phases = '  '.join(f'{name} {variant.timer.median(name):.0f}' for name in PHASES)
        ratio = f'  {total / variants[0].timer.median("iteration"):.2f}x [{variants[0].label}]{round_ratios(variant, variants[0])}' if len(variants) > 1 else ''
        own_peak = f'  peak memory in its iterations {variant.peak_mb:.0f} MiB' if 'peak_mb' in variant else ''
        print(f'    median ms/iter {total:.0f}  ({phases})  img/s {batch / total * 1000:.1f}{ratio}  '
            f'{flops_report(flops, total / 1000, peak)}{own_peak}')
    if device.type != 'cuda':                               # CUDA: each variant's own peak, above.
        print(f'peak memory {peak_memory_mb(device):.0f} MiB' + (' (all variants together: run one alone for its own)' if len(variants) > 1 else ''))

def round_ratios(variant, first):
    """Median (range) of the variant's time over the first's in each alternating round: drift slower than a round
    cancels in each ratio, where the ratio of medians can still mix a fast window of one with a slow one of the other."""
    ratios = [mine / theirs for mine, theirs in zip(variant.timer.times['iteration'], first.timer.times['iteration'])]
    return f', per round {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})'

if __name__ == '__main__':
    main()
