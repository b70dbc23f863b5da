"""Activation memory: what each network's forward pass keeps for the backward pass, per speed-option variant.

    python bench/saved_memory.py --preset=bench-s64 --precision=bf16 --variant=off=all --variant=default

The largest part of a training iteration's peak memory (the generator phase keeps G's activations and, for the GAN
term, the discriminator's, whose weights are then frozen). Counted with autograd's saved-tensor hooks (each storage
once), so it runs on any device, the CPU included, and needs no allocator statistics: a forward pass at two small
batches gives the memory per image, printed at --batch. Weights and their normalised copies are not included
(they do not grow with the batch). Compare against `off=all` (the straightforward implementation). The variants
start from the speed-option defaults of --defaults (CUDA's by default: a GPU is not needed), for the precision.
"""

import click
import torch

from common import bench_device, random_teacher
from torch_utils.misc import kept_for_backward_mib
from train_step import parse_variant
from training.networks_edm2 import set_precision
from training.speed import set_speed_options
from training.training_loop import build_students

def random_inputs(teacher, batch, device, input_grad):
    """(x_t, t, y, σ, labels) of one loss evaluation; x_t requires grad when the network is frozen."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    x, y = (torch.randn(shape, generator=generator, device=device) for _ in range(2))
    labels = torch.eye(teacher.label_dim, device=device)[torch.arange(batch, device=device) % teacher.label_dim] if teacher.label_dim else None
    sigma = torch.ones(batch, 1, 1, 1, device=device)
    return x.requires_grad_(input_grad), sigma * 0.5, y, sigma, labels

def activation_mib(net, teacher, batch, device, trained):
    """Kept MiB per forward pass at `batch`, from passes at batches 2 and 4 (the part that grows with the batch)."""
    net.requires_grad_(trained)
    small, large = (kept_for_backward_mib(net, *random_inputs(teacher, size, device, not trained)) for size in (2, 4))
    return (large - small) / 2 * batch

@click.command()
@click.option('--preset', default='bench-s64', show_default=True)
@click.option('--batch', type=int, default=64, show_default=True, help='Batch the figures are given at')
@click.option('--precision', type=click.Choice(['fp32', 'fp16', 'bf16']), default='bf16', show_default=True, help='UNet bodies (fp16 computes in float32 off CUDA)')
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--defaults', type=click.Choice(['cpu', 'cuda']), default='cuda', show_default=True, help='Whose speed-option defaults to start from')
@click.option('--variant', 'variants', multiple=True, metavar='SPEC', help='As bench/train_step.py\'s: default, off=LIST, on=LIST (repeatable)')
def main(preset, batch, precision, device, defaults, variants):
    device = bench_device(device)
    variants = [parse_variant(spec, torch.device(defaults), precision) for spec in variants or ['off=all', 'default']]
    teacher, _config = random_teacher(preset, device)
    G, _S, D = build_students(teacher, dict(use_fp16=precision != 'fp32'), device)
    print(f'{preset}: activations kept for the backward pass, MiB at batch {batch} (from batches 2 and 4), device {device}, '
        f'bodies {precision}, {defaults} defaults')
    reference = None
    for variant in variants:
        set_speed_options(**variant.speed)
        for net in (G, D):
            set_precision(net, variant.precision)
        G_mib = activation_mib(G, teacher, batch, device, trained=True)
        D_mib = activation_mib(D, teacher, batch, device, trained=True)
        D_frozen_mib = activation_mib(D, teacher, batch, device, trained=False)
        generator_phase = G_mib + D_frozen_mib
        reference = reference or generator_phase
        print(f'[{variant.label}] G trained {G_mib:.0f}, D trained {D_mib:.0f}, D frozen {D_frozen_mib:.0f}; generator phase '
            f'(G + frozen D) {generator_phase:.0f} MiB, {generator_phase / reference:.2f}x [{variants[0].label}]', flush=True)

if __name__ == '__main__':
    main()
