"""Iteration memory: the peak of what one training iteration holds besides the weights and Adam's states (activations,
gradients, temporaries), per speed-option variant, counted on any device, the CPU included.

    python bench/iteration_memory.py --preset=bench-s64 --batch=2 --variant=off=flat_gradients --variant=default

The second of two eager iterations runs under a tally of tensor storages: each storage an operation makes counts
from then until it is freed (in-place results and views are not new), and the gradients held when the iteration starts count from the start. FlatGradients
buffers, which the loop resizes outside torch's dispatcher, count at their current size. What CUDA's caching
allocator holds is more (rounding, fragmentation), so compare variants, not devices. Speed options start from
--defaults (the device whose defaults to measure: a GPU is not needed).
"""

import weakref

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common import bench_preset, random_teacher
from ops import variant_iteration
from train_step import parse_variant

class LiveStorage(TorchDispatchMode):
    """Bytes of the live storages that operations made (not their inputs': in-place results, views), or that track()
    was given, and their peak; `resized`: buffers counted at their current size instead."""

    def __init__(self, resized=()):
        super().__init__()
        self.resized = list(resized)
        self.live = self.peak = 0
        self.counted = set()

    def track(self, tensor):
        storage = tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or address in self.counted or any(buffer.untyped_storage().data_ptr() == address for buffer in self.resized):
            return
        self.counted.add(address)
        self.live += nbytes
        weakref.finalize(storage, self.freed, address, nbytes)

    def freed(self, address, nbytes):
        self.counted.discard(address)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):                              # In-place results and views are their inputs'.
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in inputs:
                self.track(leaf)
        self.peak = max(self.peak, self.total())
        return out

    def total(self):
        """Bytes live now."""
        return self.live + sum(buffer.untyped_storage().nbytes() for buffer in self.resized)

def iteration_peak_mib(variant, teacher, config, shape, default_precision):
    """(peak MiB of the second iteration, MiB of gradients held at its start) under the variant's settings."""
    step, batches, _optimizers = variant_iteration(variant, teacher, config, shape, default_precision)
    step.run(batches, lr=1e-4)
    tally = LiveStorage(flat.buffer for flat in step.flat_gradients.values())
    for param in (param for net in step.nets.values() for param in net.parameters() if param.grad is not None):
        tally.track(param.grad)
    held = tally.total()
    with tally:
        step.run(batches, lr=1e-4)
    return tally.peak / 2**20, held / 2**20

@click.command()
@click.option('--preset', default='bench-s64', show_default=True)
@click.option('--batch', type=int, default=2, show_default=True)
@click.option('--channels', type=int, help='model_channels [default: the preset\'s]')
@click.option('--defaults', type=click.Choice(['cpu', 'cuda']), default='cuda', show_default=True, help='Whose speed-option defaults to start from')
@click.option('--variant', 'variants', multiple=True, default=['default'], show_default=True, help='Settings to measure (repeatable; eager)')
def main(preset, batch, channels, defaults, variants):
    default_precision = 'fp16' if bench_preset(preset).get('fp16', False) else 'fp32'
    variants = [parse_variant(spec, torch.device(defaults), default_precision) for spec in variants]
    if any(variant.compile_options for variant in variants):
        raise click.BadParameter('iterations are measured eagerly: drop compile= and cuda_graphs=', param_hint='--variant')
    teacher, config = random_teacher(preset, torch.device('cpu'), **({'model_channels': channels} if channels else {}))
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    weights = sum(param.numel() for param in teacher.parameters()) * 4 / 2**20
    print(f'{preset}: model_channels {channels or config.network_arch["model_channels"]}, batch {batch}, speed options from the '
        f'{defaults} defaults (float16 computes in float32 on the CPU); the teacher\'s weights {weights:.0f} MiB in float32')
    for variant in variants:
        peak, held = iteration_peak_mib(variant, teacher, config, shape, default_precision)
        print(f'[{variant.label}] peak {peak:.0f} MiB besides weights and Adam\'s states; gradients held at the start {held:.0f} MiB')

if __name__ == '__main__':
    main()
