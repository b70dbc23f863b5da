import builtins

import pytest
import torch

from dnnlib.util import UserError
from training.encoders import StandardRGBEncoder, StabilityVAEEncoder

def test_standard_rgb_round_trip():
    encoder = StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    values = encoder.encode(pixels)
    assert values.min() == -1 and values.max() == 1
    assert torch.equal(encoder.decode(values), pixels)

def test_vae_without_diffusers_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__
    def no_diffusers(name, *args, **kwargs):
        if name.startswith('diffusers'):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_diffusers)
    encoder = StabilityVAEEncoder()
    with pytest.raises(UserError, match='pip install diffusers'):
        encoder.decode(torch.zeros(1, 4, 8, 8))

def test_vae_latent_scaling_is_affine_and_invertible():
    encoder = StabilityVAEEncoder()
    mean = torch.randn(2, 4, 4, 4)
    raw = torch.cat([mean, torch.zeros_like(mean)], dim=1)          # zero std: encode_latents is deterministic
    scaled = encoder.encode_latents(raw)
    scale = torch.as_tensor(encoder.scale).reshape(1, -1, 1, 1)
    bias = torch.as_tensor(encoder.bias).reshape(1, -1, 1, 1)
    assert torch.allclose(scaled, mean * scale + bias)
    assert StabilityVAEEncoder.__getstate__(encoder)['_vae'] is None
