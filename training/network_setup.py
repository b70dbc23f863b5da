"""Networks for sampling and evaluation: load a pickle/export, pick the sampler, validate options."""

import torch

from dnnlib.util import UserError
from training import loading
from training.encoders import StandardRGBEncoder, StabilityVAEEncoder

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
