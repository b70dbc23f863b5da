"""Conversion between dataset items and the space the diffusion model works in (EDM2 interface).

StandardRGBEncoder: uint8 pixels <-> [-1, 1] (std ≈ 0.5). StabilityVAEEncoder: uint8 pixels <->
scaled Stable Diffusion VAE latents; datasets store the latent mean and std (8 channels), made by
`dataset_tool.py encode`. diffusers is imported only when a VAE is actually used.
"""

import os

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import misc
from torch_utils import persistence

def pixels_from_unit(x):
    """[-1, 1] -> uint8 pixels (rounded to nearest)."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

class Encoder:
    """Dataset items -> network space (encode = encode_latents ∘ encode_pixels) and back to uint8 (decode)."""

    def init(self, device):
        pass

    def __getstate__(self):
        return self.__dict__

    def encode(self, x):
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):
        """uint8 pixels -> what a dataset stores (the pixels, or VAE latent statistics)."""
        raise NotImplementedError

    def encode_latents(self, x):
        """What a dataset stores -> network space."""
        raise NotImplementedError

    def decode(self, x):
        """Network space -> uint8 pixels."""
        raise NotImplementedError

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixels in [0, 255] <-> [-1, 1]."""

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return pixels_from_unit(x)

@persistence.persistent_class
class IdentityEncoder(Encoder):
    """Items already in network space (e.g. samples of an exact teacher's mixture), shown as [-1, 1] images."""

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32)

    def decode(self, x):
        return pixels_from_unit(x)

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """SD VAE (diffusers AutoencoderKL, from a hub name or a local folder); latents scaled to std ≈ 0.5.

    The raw statistics are per latent channel, measured on ImageNet-512 (EDM2's values)."""

    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15],
        raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8,
    ):
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)              # latent = raw·scale + bias
        self.bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    _load_error = None      # A VAE that could not be loaded is not retried (class default: old pickles lack it).

    def init(self, device):
        if self._load_error is not None:
            raise UserError(self._load_error)
        if self._vae is None:
            try:
                self._vae = load_stability_vae(self.vae_name, device=device)
            except UserError as err:
                self._load_error = str(err)
                raise
        self._vae.to(device)

    def __getstate__(self):
        return dict(self.__dict__, _vae=None, _load_error=None)

    def _in_batches(self, fn, x):
        return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)])

    def encode_pixels(self, x):
        """uint8 [N, 3, H, W] -> the VAE posterior's mean and std, [N, 8, H/8, W/8]."""
        self.init(x.device)
        def moments(chunk):
            posterior = self._vae.encode(chunk)['latent_dist']
            return torch.cat([posterior.mean, posterior.std], dim=1)
        return self._in_batches(moments, x.to(torch.float32) / 127.5 - 1)

    def encode_latents(self, x):
        """Mean and std -> one scaled latent sample."""
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        return (mean + torch.randn_like(mean) * std) * _channel_vector(self.scale, mean) + _channel_vector(self.bias, mean)

    def decode(self, x):
        self.init(x.device)
        raw = (x.to(torch.float32) - _channel_vector(self.bias, x)) / _channel_vector(self.scale, x)
        return pixels_from_unit(self._in_batches(lambda chunk: self._vae.decode(chunk)['sample'], raw))    # VAE output in [-1, 1]

def _channel_vector(values, ref):
    """[1, C, 1, 1] float32 on ref's device, made there once (a copy from the host per batch would make it wait)."""
    return misc.const_like(ref, np.asarray(values, dtype=np.float32).reshape(1, -1, 1, 1), dtype=torch.float32)

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
