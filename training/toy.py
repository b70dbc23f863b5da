"""The toy teacher, the embedded default of train_ncvsd.py: coloured shapes on a dark background, one class per
shape, as an exact class-conditional Gaussian mixture; and the EDM2 network fitted to it that the students start from.

    python -m training.toy images --dest=toy-test --num=8      # labelled test images for posterior_sample.py
"""

import copy

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

import dnnlib
from torch_utils.misc import randn_like_from
from training.analytic import MixtureDenoiser
from training.dataset_io import write_dataset
from training.encoders import StandardRGBEncoder
from training.networks_edm2 import Precond
from training.noise_levels import edm_loss_weight, LogNormalSampler


TOY_SHAPES = ['circle', 'square', 'triangle', 'cross']
TOY_COLORS = [(230, 60, 50), (60, 200, 80), (70, 110, 240)]

def draw_shape(shape, color, resolution):
    """A uint8 [3, R, R] image of one filled shape on a dark background, drawn with PIL."""
    scale = 8                                           # Draw large, then downsample: smooth edges.
    size = resolution * scale
    image = PIL.Image.new('RGB', (size, size), (20, 20, 30))
    draw = PIL.ImageDraw.Draw(image)
    lo, hi = size * 0.2, size * 0.8
    if shape == 'circle':
        draw.ellipse([lo, lo, hi, hi], fill=color)
    elif shape == 'square':
        draw.rectangle([lo, lo, hi, hi], fill=color)
    elif shape == 'triangle':
        draw.polygon([(size / 2, lo), (hi, hi), (lo, hi)], fill=color)
    elif shape == 'cross':
        bar = size * 0.12
        draw.rectangle([lo, size / 2 - bar, hi, size / 2 + bar], fill=color)
        draw.rectangle([size / 2 - bar, lo, size / 2 + bar, hi], fill=color)
    else:
        raise ValueError(f'unknown shape {shape}')
    image = image.resize((resolution, resolution), PIL.Image.LANCZOS)
    return np.asarray(image).transpose(2, 0, 1)

def toy_teacher(resolution=16, std=0.1, shapes=TOY_SHAPES, colors=TOY_COLORS):
    """Class-conditional mixture: one component per (shape, colour), class = shape, means in [-1, 1]."""
    means, labels = [], []
    for label, shape in enumerate(shapes):
        for color in colors:
            means.append(torch.tensor(draw_shape(shape, color, resolution), dtype=torch.float32) / 127.5 - 1)
            labels.append(label)
    return MixtureDenoiser(torch.stack(means), std, torch.ones(len(means)), labels, label_dim=len(shapes))

def fit_denoiser_network(teacher, network_kwargs, iterations=500, batch=32, lr=0.01, P_mean=-0.8, P_std=1.6, seed=0, device=None,
        verbose=True):
    """An EDM2 Precond regressed onto an exact teacher's denoiser: the weights students start from.

    Plays the part of the pretrained EDM2 network when the teacher is a closed form. Fits on `device` (default: the
    teacher's; a run's own device, since on a GPU machine the CPU is shared by every rank) and returns it on the CPU.
    Its initial weights and data come from `seed` alone; torch's global generator neither decides them nor moves.
    """
    device = torch.device(device) if device is not None else teacher.means.device
    teacher = copy.deepcopy(teacher).to(device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):                         # The initial weights follow `seed` alone.
        torch.manual_seed(seed)
        net = Precond(img_resolution=teacher.img_resolution, img_channels=teacher.img_channels,
            label_dim=teacher.label_dim, use_fp16=False, **network_kwargs)
    net = net.train().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    sampler = LogNormalSampler(P_mean, P_std)
    randn_like = randn_like_from(gen)
    for step in range(iterations):
        labels = None
        if teacher.label_dim:
            labels = torch.eye(teacher.label_dim, device=device)[torch.randint(teacher.label_dim, [batch], generator=gen, device=device)]
        with torch.no_grad():
            x = teacher.sample(batch, labels, randn_like)
            sigma = sampler(batch, device, rng=gen)
            noisy = x + randn_like(x) * sigma
            target = teacher(noisy, sigma, labels)
        loss = (edm_loss_weight(sigma) * (net(noisy, sigma, labels) - target).square()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group['lr'] = lr / max(step / 200, 1) ** 0.5
        optimizer.step()
        if verbose and (step % 100 == 0 or step == iterations - 1):
            print(f'Fitting the initial network to the exact denoiser: step {step + 1}/{iterations}  loss {loss.item():.4f}', flush=True)
    return net.eval().cpu()

def write_toy_images(dest, num, seed=0, resolution=16):
    """`num` exact toy samples (classes in turn) as a labelled dataset folder or zip; returns the count."""
    teacher = toy_teacher(resolution=resolution)
    classes = torch.arange(num) % teacher.label_dim
    images = teacher.sample(num, torch.eye(teacher.label_dim)[classes], randn_like_from(torch.Generator().manual_seed(seed)))
    pixels = StandardRGBEncoder().decode(images).permute(0, 2, 3, 1).numpy()
    return write_dataset(dest, zip(pixels, classes.tolist()), num)

@click.group()
def main():
    """The toy mixture: python -m training.toy images --dest=DIR"""

@main.command()
@click.option('--dest', help='Output folder or .zip', metavar='DIR|ZIP', required=True)
@click.option('--num', help='Number of images', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
def images(dest, num, seed):
    """Write exact samples of the toy mixture, labelled by class, for posterior_sample.py --data."""
    dnnlib.util.run_cli(write_toy_images, dest, num, seed)

if __name__ == '__main__':
    main()
