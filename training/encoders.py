"""Conversion between dataset items and the space the diffusion model works in (EDM2 interface).

StandardRGBEncoder: uint8 pixels <-> [-1, 1] (std ≈ 0.5). StabilityVAEEncoder: uint8 pixels <->
scaled Stable Diffusion VAE latents; datasets store the latent mean and std (8 channels), made by
`dataset_tool.py encode`. diffusers is imported only when a VAE is actually used.
"""

import os
import warnings

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import persistence

class Encoder:
    def init(self, device):
        pass

    def __getstate__(self):
        return self.__dict__

    def encode(self, x):
        """Dataset items -> training space."""
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):
        raise NotImplementedError

    def encode_latents(self, x):
        raise NotImplementedError

    def decode(self, x):
        """Training space -> uint8 pixels."""
        raise NotImplementedError

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    def encode_pixels(self, x):                 # uint8 -> the same values as float32
        return x

    def encode_latents(self, x):                # [0, 255] -> [-1, 1]
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):                        # [-1, 1] -> uint8
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

@persistence.persistent_class
class IdentityEncoder(Encoder):
    """Items already in network space (e.g. samples of an exact teacher's mixture), shown as [-1, 1] images."""

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32)

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """SD VAE (diffusers AutoencoderKL, from a hub name or a local folder); latents scaled to std ≈ 0.5."""

    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15],
        raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8,
    ):
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def init(self, device):
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device=device)
        else:
            self._vae.to(device)

    def __getstate__(self):
        return dict(self.__dict__, _vae=None)

    def _run_vae(self, fn, x):
        return torch.cat([fn(batch) for batch in x.split(self.batch_size)])

    def encode_pixels(self, x):                 # uint8 [N, 3, H, W] -> raw latent mean and std [N, 8, H/8, W/8]
        self.init(x.device)
        x = x.to(torch.float32) / 127.5 - 1
        def encode(batch):
            dist = self._vae.encode(batch)['latent_dist']
            return torch.cat([dist.mean, dist.std], dim=1)
        return self._run_vae(encode, x)

    def encode_latents(self, x):                # raw mean/std -> a sample, scaled
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        return x * _channel_vector(self.scale, x) + _channel_vector(self.bias, x)

    def decode(self, x):                        # scaled latents -> uint8 pixels
        self.init(x.device)
        x = x.to(torch.float32)
        x = (x - _channel_vector(self.bias, x)) / _channel_vector(self.scale, x)
        x = self._run_vae(lambda batch: self._vae.decode(batch)['sample'], x)
        return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)      # the VAE decodes to [-1, 1]

def _channel_vector(values, ref):
    return torch.as_tensor(values, dtype=torch.float32, device=ref.device).reshape(1, -1, 1, 1)

def load_stability_vae(vae_name='stabilityai/sd-vae-ft-mse', device=torch.device('cpu')):
    """diffusers AutoencoderKL from a local folder or (cached) from the hub."""
    try:
        import diffusers
    except ImportError:
        raise UserError('latent-space models need diffusers: pip install diffusers')
    cache_dir = dnnlib.make_cache_dir_path('diffusers')
    os.environ.setdefault('HF_HUB_DISABLE_SYMLINKS_WARNING', '1')
    if os.path.isdir(vae_name):
        vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name)
    else:
        try:
            vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir, local_files_only=True)
        except Exception:
            try:
                vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir)
            except Exception as err:
                raise UserError(f'cannot load VAE "{vae_name}" ({type(err).__name__}); give a local folder with the '
                    f'diffusers AutoencoderKL files, or go online once to fill {cache_dir}')
    return vae.eval().requires_grad_(False).to(device)
