"""Sampling utilities shared by training snapshots, generate_images.py and the metrics."""

import numpy as np
import torch

from dnnlib.util import UserError
from torch_utils import misc
from training.networks_ncvsd import is_generative_denoiser
from training.noise_levels import parse_ts, DEFAULT_TS

class StackedRandomGenerator:
    """One torch.Generator per seed, so that an image depends on its seed only (not on batching)."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

def random_labels(rnd, label_dim, batch_size, device, class_idx=None):
    """One-hot [N, label_dim] labels (a fixed class, or random per seed); None for unconditional nets."""
    if label_dim == 0:
        return None
    labels = torch.zeros([batch_size, label_dim], device=device)
    if class_idx is None:
        idx = rnd.randint(label_dim, size=[batch_size], device=device)
    else:
        idx = torch.full([batch_size], class_idx, device=device)
    labels[torch.arange(batch_size, device=device), idx.flatten()] = 1
    return labels

def save_image_grid(images, path, grid_w=None):
    """uint8 [N, C, H, W] -> one PNG grid."""
    images = torch.as_tensor(images)
    n = images.shape[0]
    grid_w = grid_w or int(np.ceil(np.sqrt(n)))
    grid_h = int(np.ceil(n / grid_w))
    pad = grid_w * grid_h - n
    if pad:
        images = torch.cat([images, torch.zeros([pad, *images.shape[1:]], dtype=images.dtype)])
    misc.save_png(misc.tile_images(images.cpu(), grid_w, grid_h), path)

DEFAULT_HEUN_STEPS = 32                 # A diffusion teacher's Heun steps when --steps is not given (63 NFE).

@torch.no_grad()
def edm_heun_sampler(net, noise, labels=None, num_steps=DEFAULT_HEUN_STEPS, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's deterministic 2nd-order Heun sampler for a Precond-like teacher (2·num_steps − 1 NFE)."""
    from training.noise_levels import karras_sigmas
    t_steps = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    x = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x - net(x, t_cur, labels).to(torch.float64)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - net(x_next, t_next, labels).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)

def check_sampling_options(net, ts, steps, class_idx):
    """(ts, steps) as the network samples: a student's validated ts and no steps, or a teacher's steps (None: the
    default) and no ts; a clear error for options that do not fit the network, or a class index out of range."""
    if is_generative_denoiser(net):
        if steps is not None:
            raise UserError(f'--steps={steps} is for diffusion teachers; this network is an NCVSD student: use --ts, e.g. --ts=10,22,39')
        ts = parse_ts(ts if ts is not None else DEFAULT_TS)
    elif ts is not None:
        raise UserError('--ts is for NCVSD students; this network is a diffusion teacher: use --steps')
    else:
        steps = DEFAULT_HEUN_STEPS if steps is None else steps
        if steps < 1:
            raise UserError('--steps must be at least 1 for a diffusion teacher')
    if class_idx is not None:
        if net.label_dim == 0:
            raise UserError('--class was given but the network is unconditional; drop --class')
        if not 0 <= class_idx < net.label_dim:
            raise UserError(f'--class={class_idx} is out of range: the network has {net.label_dim} classes (0 to {net.label_dim - 1})')
    return ts, steps

def sample_batch(net, noise, labels, rnd, ts=None, steps=None):
    """Student (--ts) or teacher (--steps) samples in network space."""
    if is_generative_denoiser(net):
        return net.sample(noise, labels, ts=ts, randn_like=rnd.randn_like)
    return edm_heun_sampler(net, noise, labels, num_steps=steps)

def rank_batches(seeds, batch_size, rank, world_size):
    """Split seeds into batches of at most batch_size and deal them to ranks round-robin."""
    num_batches = max((len(seeds) - 1) // (batch_size * world_size) + 1, 1) * world_size
    batches = np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)
    return [list(map(int, b)) for b in batches[rank::world_size]]

@torch.no_grad()
def generate_images(net, encoder, seeds, ts=None, steps=DEFAULT_HEUN_STEPS, class_idx=None, batch_size=32, device=torch.device('cpu'),
    rank=0, world_size=1, progress=None):
    """Yield dict(images=uint8 [N, C, H, W], seeds, labels) for this rank's share of the seeds.

    Noise and labels come from per-seed generators: an image depends on its seed only.
    """
    for batch_seeds in rank_batches(seeds, batch_size, rank, world_size):
        if len(batch_seeds) == 0:
            yield dict(images=None, seeds=[], labels=None)
            continue
        rnd = StackedRandomGenerator(device, batch_seeds)
        noise = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        labels = random_labels(rnd, net.label_dim, len(batch_seeds), device, class_idx)
        with misc.memory_advice(device, f'--batch={batch_size}', 'use a smaller --batch (each image depends on its seed only)'):
            samples = sample_batch(net, noise, labels, rnd, ts, steps)
            misc.refuse_nonfinite(samples, f'sampling the batch of seeds {batch_seeds[0]} to {batch_seeds[-1]}',
                'where the network computes in float16 or bfloat16, try --precision=fp32')
            images = encoder.decode(samples)
        misc.advance_progress(progress, len(batch_seeds), world_size)
        yield dict(images=images, seeds=batch_seeds, labels=labels)
