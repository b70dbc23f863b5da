"""Correctness benchmark against closed forms: every sampler of the project on the exact toy mixture.

    python bench/exact.py [--student=training-runs/toy/network-snapshot-....pkl]

Prints one table: sampler, NFE, TV (component frequencies vs the exact weights), spread (1 = exact),
class accuracy. Rows: (a) EDM Heun with the exact teacher, (b) the exact generative denoiser with
1/2/4-step --ts, (c) a trained student with the same --ts, (d) PnP-GD on box inpainting (exact
generative denoiser, student) against the exact posterior of each measurement.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click
import numpy as np
import torch

from dnnlib.util import run_cli
from inverse.operators import get_operator
from torch_utils.distributed import choose_device
from torch_utils.misc import randn_like_from
from inverse.pnp import pnp_gd
from training.analytic import GaussianMixture, ExactGenerativeDenoiser, mixture_metrics
from training.toy import toy_teacher
from training.network_io import load_network_data
from training.noise_levels import PAPER_CHAINS
from training.sampling import edm_heun_sampler

def row(name, nfe, metrics):
    acc = metrics.get('class_accuracy')
    print(f'| {name:<34s} | {nfe:>4} | {metrics["tv"]:.3f} | {metrics["spread"]:.3f} | {"-" if acc is None else f"{acc:.3f}":>5} |', flush=True)

def labels_for(n, label_dim, device):
    return torch.eye(label_dim, device=device)[torch.arange(n, device=device) % label_dim]

def sample_rows(mixture, student, n, gen):
    teacher = mixture.teacher()
    labels = labels_for(n, teacher.label_dim, gen.device)
    noise = lambda: torch.randn(n, teacher.img_channels, teacher.img_resolution, teacher.img_resolution, generator=gen, device=gen.device)
    randn_like = randn_like_from(gen)
    for steps in (2, 4, 8, 16, 32):
        row('(a) EDM Heun, exact teacher', 2 * steps - 1, mixture.metrics(edm_heun_sampler(teacher, noise(), labels, steps), labels))
    exact_gd = ExactGenerativeDenoiser(teacher)
    for nfe, ts in PAPER_CHAINS.items():
        row(f'(b) exact G, --ts={",".join(map(str, ts))}', nfe, mixture.metrics(exact_gd(noise() * 80, 80.0, labels, ts=ts, randn_like=randn_like), labels))
    if student is not None:
        for nfe, ts in PAPER_CHAINS.items():
            with torch.no_grad():
                x = student(noise() * 80, 80.0, labels, ts=ts, randn_like=randn_like)
            row(f'(c) student, --ts={",".join(map(str, ts))}', nfe, mixture.metrics(x, labels))

def pnp_rows(mixture, student, images, chains, sigma_y, gen):
    """TV between chain components and exact posterior weights, averaged over measurements."""
    teacher = mixture.teacher()
    op = get_operator('box_inpainting', img_size=teacher.img_resolution, channels=teacher.img_channels)
    labels = labels_for(images, teacher.label_dim, gen.device)
    truths = mixture.sample(images, labels, generator=gen)
    samplers = [('(d) PnP-GD, exact G', ExactGenerativeDenoiser(teacher))] + ([('(d) PnP-GD, student', student)] if student is not None else [])
    for name, net in samplers:
        tvs, spreads, accs = [], [], []
        for truth, label in zip(truths, labels):
            y = op.measure(truth[None], sigma_y, generator=gen)
            weights, _, _ = mixture.linear_posterior(op, y, sigma_y, class_labels=label[None])
            chain_labels = label[None].expand(chains, -1)
            with torch.no_grad():
                x = pnp_gd(net, y.expand(chains, -1, -1, -1), op, sigma_y, steps=50, generator=gen, labels=chain_labels)
            assign = teacher.component_log_posterior(x, 1e-3).argmax(dim=1)
            freq = torch.bincount(assign, minlength=teacher.num_components).double().cpu() / chains
            tvs.append(0.5 * float((freq - weights).abs().sum()))
            metrics = mixture_metrics(teacher, x, chain_labels)
            spreads.append(metrics['spread'])
            accs.append(metrics.get('class_accuracy', float('nan')))
        row(name, 50, dict(tv=np.mean(tvs), spread=np.mean(spreads), class_accuracy=np.mean(accs)))

@click.command()
@click.option('--student', help='Trained toy student snapshot (path)', metavar='PKL')
@click.option('--n', help='Samples per row', type=int, default=2000, show_default=True)
@click.option('--pnp-images', help='Measurements for the PnP-GD rows', type=int, default=4, show_default=True)
@click.option('--chains', help='PnP-GD chains per measurement', type=int, default=200, show_default=True)
@click.option('--sigma-y', help='Measurement noise', type=float, default=0.05, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--device', help='Device (default: CUDA if available, else CPU)', metavar='STR')
def main(**options):
    """Exact sample-quality metrics of every sampler on the toy mixture (see module docstring)."""
    run_cli(exact_rows, **options)

def exact_rows(student, n, pnp_images, chains, sigma_y, seed, device):
    torch.set_grad_enabled(False)
    device, _note = choose_device(device)
    gen = torch.Generator(device).manual_seed(seed)
    mixture = GaussianMixture.from_teacher(toy_teacher().to(device))
    net = load_network_data(student, verbose=False)['ema'].float().eval().to(device) if student else None
    print(f'Toy mixture on {device}: {mixture.module.num_components} components, 16x16x3, std {float(mixture.module.stds[0]):.2f}; {n} samples per row '
        f'(rows (a, b) show the sampling error of exact samplers); PnP-GD: {pnp_images} measurements x {chains} chains, sigma_y {sigma_y}.')
    print('| sampler                            |  NFE |   TV  | spread | class acc |')
    print('| --- | --- | --- | --- | --- |')
    sample_rows(mixture, net, n, gen)
    pnp_rows(mixture, net, pnp_images, chains, sigma_y, gen)

if __name__ == '__main__':
    main()
