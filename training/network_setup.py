"""Networks for sampling and evaluation: load a pickle/export, pick the sampler, validate options."""

import torch

from dnnlib.util import UserError
from training import loading
from training.encoders import StandardRGBEncoder, StabilityVAEEncoder
from training.noise_levels import parse_ts
from training.networks_ncvsd import is_generative_denoiser

def load_for_sampling(path_or_url, device, verbose=True, vae=None):
    """(network in eval mode on device, encoder) from an NCVSD snapshot, a released checkpoint, an EDM2
    teacher pickle or a weights-only export; `vae` replaces the VAE of a latent-space network's encoder."""
    data = loading.load_network_data(path_or_url, verbose=verbose)
    net = data['ema']
    if not hasattr(net, 'img_resolution'):
        raise UserError(f'{path_or_url} holds no image network')
    net = net.to(torch.float32).eval().requires_grad_(False).to(device)
    encoder = data.get('encoder', None) or StandardRGBEncoder()
    if vae is not None:
        if not hasattr(encoder, 'vae_name'):
            raise UserError(f'--vae was given but {path_or_url} is not a latent-space network; drop --vae')
        encoder = StabilityVAEEncoder(vae_name=vae)
    encoder.init(device)
    return net, encoder

def check_sampling_options(net, ts, steps, class_idx):
    """Validated ts (students) and class index; a clear error for options that do not fit the network."""
    if is_generative_denoiser(net):
        ts = parse_ts(ts if ts is not None else '10,22,39')
    elif ts is not None:
        raise UserError('--ts is for NCVSD students; this network is a diffusion teacher: use --steps')
    if not is_generative_denoiser(net) and (steps is None or steps < 1):
        raise UserError('--steps must be at least 1 for a diffusion teacher')
    if class_idx is not None:
        if net.label_dim == 0:
            raise UserError('--class was given but the network is unconditional; drop --class')
        if not 0 <= class_idx < net.label_dim:
            raise UserError(f'--class={class_idx} is out of range: the network has {net.label_dim} classes (0 to {net.label_dim - 1})')
    return ts
