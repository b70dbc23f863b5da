"""Count the aten operations of one eager NCVSD training iteration, per phase: what the host issues, each one a
kernel launch or more on a GPU (the H200's eager step time followed this count: bench/README.md).

    python bench/ops.py --preset=bench-s64 --channels=64 --defaults=cuda --variant=default --variant=off=grouped_weight_norm

Runs on the CPU. A variant is as in bench/train_step.py (default, off=LIST, on=LIST, precision=...; eager only),
starting from the speed options of --defaults (the device whose defaults to count: a GPU is not needed). The counts
do not depend on the batch, nor on the widths while the same layers have attention (64 channels per head), so
--batch=2 and --channels=64 keep a bench-s64 count small. The optimizers' steps are counted apart: on the CPU they
are foreach Adam, on CUDA the fused kernel (a few operations per step). Each variant also counts a teacher evaluation
and a 1-step student sample as the sampling scripts run them (networks prepared for sampling, no autograd).
"""

import collections
import contextlib

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import bench_iteration, bench_preset, random_teacher, sampling_student
from train_step import parse_variant, random_batches
from training import networks_edm2
from training.networks_edm2 import set_precision
from training.noise_levels import PAPER_CHAINS
from training.speed import set_speed_options
from training.training_loop import PHASES, build_optimizers, build_students

class OperationCount(TorchDispatchMode):
    """aten operations run while active, tallied under `self.bucket` and by operator."""

    def __init__(self):
        super().__init__()
        self.bucket = None
        self.buckets = collections.Counter()
        self.operators = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.buckets[self.bucket] += 1
        self.operators[func.__name__] += 1
        return func(*args, **(kwargs or {}))

def count_iteration(step, batches, optimizers):
    """OperationCount of the second of two iterations (the first fills caches), optimizer steps in their own bucket."""
    step.run(batches, lr=1e-4)
    count = OperationCount()
    def phase(name):
        count.bucket = name
        return optimizer_apart(count, optimizers[name])
    with count:
        step.run(batches, lr=1e-4, timer=phase)
    return count

@contextlib.contextmanager
def optimizer_apart(count, optimizer):
    """While active, the operations of `optimizer`'s steps go to count's 'optimizer' bucket."""
    step = optimizer.step
    def counted_step(*args, **kwargs):
        phase, count.bucket = count.bucket, 'optimizer'
        try:
            return step(*args, **kwargs)
        finally:
            count.bucket = phase
    optimizer.step = counted_step
    try:
        yield
    finally:
        del optimizer.step                                  # The class's method again.

def count_calls(fn):
    """Operations of the second of two calls of fn() (the first fills caches)."""
    fn()
    count = OperationCount()
    with count:
        fn()
    return sum(count.buckets.values())

def kept_mib(net):
    """MiB of the weights that `net`'s layers keep (networks_edm2's weight caches)."""
    layers = set(net.modules())
    return sum(entry.untyped_storage().nbytes() for layer, (_key, entry) in networks_edm2._normalized_weights.items()
        if layer in layers) / 2**20

def count_sampling(teacher, precision, shape):
    """(operations of a teacher evaluation, of a 1-step student sample), the student prepared as generate_images.py
    prepares what it loads; no autograd, as they sample."""
    networks_edm2._normalized_weights.clear()              # What an earlier variant kept is not this one's.
    student = sampling_student(teacher, torch.device('cpu'))
    set_precision(student, precision)
    noise = torch.randn(shape)
    labels = torch.eye(teacher.label_dim)[:shape[0]] if teacher.label_dim else None
    with torch.no_grad():
        return (count_calls(lambda: teacher(noise, torch.ones(shape[0]), labels)),
            count_calls(lambda: student.sample(noise, labels, ts=PAPER_CHAINS[1])))

@click.command()
@click.option('--preset', default='bench-s64', show_default=True)
@click.option('--batch', type=int, default=2, show_default=True)
@click.option('--channels', type=int, help='model_channels [default: the preset\'s]')
@click.option('--defaults', type=click.Choice(['cpu', 'cuda']), default='cuda', show_default=True, help='Whose speed-option defaults to start from')
@click.option('--variant', 'variants', multiple=True, default=['default'], show_default=True, help='Settings to count (repeatable)')
@click.option('--top', type=int, default=0, help='Also list the N most frequent operators of each variant')
def main(preset, batch, channels, defaults, variants, top):
    device = torch.device('cpu')
    default_precision = 'fp16' if bench_preset(preset).get('fp16', False) else 'fp32'
    variants = [parse_variant(spec, torch.device(defaults), default_precision) for spec in variants]
    if any(variant.compile_options for variant in variants):
        raise click.BadParameter('operations are counted eagerly: drop compile= and cuda_graphs=', param_hint='--variant')
    teacher, config = random_teacher(preset, device, **({'model_channels': channels} if channels else {}))
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    print(f'{preset}: model_channels {channels or config.network_arch["model_channels"]}, batch {batch}, speed options from the {defaults} '
        f'defaults; aten operations of one eager iteration (torch {torch.__version__})')
    reference = None
    for variant in variants:
        count = count_training(variant, teacher, config, shape, default_precision)
        networks = sum(count.buckets[name] for name in PHASES)
        reference = reference or networks
        off = [name for name, value in variant.speed.items() if not value]
        print(f'[{variant.label}] ' + '  '.join(f'{name} {count.buckets[name]:,}' for name in PHASES) +
            f'  total {networks:,} ({networks / reference:.2f}x [{variants[0].label}]); optimizer steps {count.buckets["optimizer"]:,}; '
            f'precision {variant.precision}, speed options off: {", ".join(off) or "none"}')
        teacher_ops, student_ops = count_sampling(teacher, variant.precision, shape)
        print(f'    sampling: a teacher evaluation {teacher_ops:,}, a 1-step student sample {student_ops:,}; '
            f'weights the teacher keeps {kept_mib(teacher):.0f} MiB')
        if top:
            print('    ' + ', '.join(f'{name} {n:,}' for name, n in count.operators.most_common(top)))

def count_training(variant, teacher, config, shape, default_precision):
    """OperationCount of an iteration of fresh students under the variant's settings (freed on return)."""
    step, batches, optimizers = variant_iteration(variant, teacher, config, shape, default_precision)
    return count_iteration(step, batches, optimizers)

def variant_iteration(variant, teacher, config, shape, default_precision):
    """(the eager iteration of fresh students on the CPU under the variant's settings, its random batches of
    `shape`, its optimizers)."""
    device = torch.device('cpu')
    set_speed_options(**variant.speed)
    G, S, D = build_students(teacher, dict(use_fp16=default_precision != 'fp32'), device)
    for net in (G, S, D, teacher):
        set_precision(net, variant.precision)
    optimizers = build_optimizers(G, S, D)
    step = bench_iteration(G, S, D, teacher, config, optimizers, shape[0], device)
    return step, random_batches(shape, teacher.label_dim, device, torch.Generator(device).manual_seed(1)), optimizers

if __name__ == '__main__':
    main()
