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

class FakeVAE(torch.nn.Module):
    """Stands in for diffusers' AutoencoderKL: 8× average pooling to 4 channels, and back."""

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        mean = torch.cat([pooled, pooled[:, :1]], dim=1)
        return {'latent_dist': type('Dist', (), dict(mean=mean, std=torch.full_like(mean, 0.01)))()}

    def decode(self, z):
        return {'sample': torch.nn.functional.interpolate(z[:, :3], scale_factor=8)}

def test_encode_to_latents_and_use_them_for_training(tmp_path, monkeypatch):
    import training.encoders as encoders
    from helpers import make_dataset, make_teacher
    from training.dataset import ImageFolderDataset
    from training.dataset_io import encode_dataset
    from training.train_setup import make_data
    from training.run_config import default_config
    from training.train_setup import check_data_matches
    monkeypatch.setattr(encoders, 'load_stability_vae', lambda name, device=None: FakeVAE())
    pixels = make_dataset(tmp_path / 'src', tmp_path / 'pixels.zip', num=5, resolution=32)
    assert encode_dataset(str(pixels), str(tmp_path / 'latents.zip'), batch=2) == 5
    latents = ImageFolderDataset(str(tmp_path / 'latents.zip'))
    item, label = latents[3]
    assert item.shape == (8, 4, 4) and item.dtype == 'float32' and latents.label_dim == 4 and label.argmax() == 3
    import pickle
    with open(make_teacher(tmp_path / 't.pkl', resolution=4, channels=4), 'rb') as f:
        teacher = pickle.load(f)['ema']
    dataset, encoder, _ = make_data(default_config(data=str(tmp_path / 'latents.zip'), cond=True), teacher, None)
    assert type(encoder).__name__ == 'StabilityVAEEncoder'
    check_data_matches(dataset, encoder, teacher, cond=True)
    decoded = encoder.decode(encoder.encode_latents(torch.as_tensor(item)[None]))
    assert decoded.shape == (1, 3, 32, 32) and decoded.dtype == torch.uint8

def test_the_encoding_vae_reaches_training_and_a_failed_one_is_not_retried(tmp_path, monkeypatch):
    import pickle
    import dnnlib
    import training.encoders as encoders
    from helpers import make_dataset, make_teacher
    from training.dataset import ImageFolderDataset
    from training.dataset_io import encode_dataset
    from training.train_setup import make_data
    from training.run_config import default_config
    loads = []
    def fake_loader(name, device=None):
        loads.append(name)
        if name == 'offline/vae':
            raise UserError('cannot load VAE "offline/vae"')
        return FakeVAE()
    monkeypatch.setattr(encoders, 'load_stability_vae', fake_loader)
    pixels = make_dataset(tmp_path / 'src', tmp_path / 'pixels.zip', num=2, resolution=32)
    encode_dataset(str(pixels), str(tmp_path / 'latents.zip'), model_url=str(tmp_path / 'my-vae'), batch=2)
    assert ImageFolderDataset(str(tmp_path / 'latents.zip')).info == {'vae': str(tmp_path / 'my-vae')}
    with open(make_teacher(tmp_path / 't.pkl', resolution=4, channels=4), 'rb') as f:
        teacher = pickle.load(f)['ema']
    config = default_config(data=str(tmp_path / 'latents.zip'), cond=True)
    _, encoder, _ = make_data(config, teacher, StabilityVAEEncoder())          # Even over a teacher pickle's encoder.
    assert encoder.vae_name == str(tmp_path / 'my-vae')
    _, encoder, _ = make_data(dnnlib.EasyDict(config, vae='offline/vae'), teacher, None)
    assert encoder.vae_name == 'offline/vae'
    for _snapshot in range(3):
        with pytest.raises(UserError, match='offline/vae'):
            encoder.decode(torch.zeros(1, 4, 4, 4))
    assert loads.count('offline/vae') == 1

def test_vae_option_needs_a_latent_network(tmp_path):
    from helpers import make_teacher
    from training.network_io import load_network
    with pytest.raises(UserError, match='not a latent-space network; drop --vae'):
        load_network(str(make_teacher(tmp_path / 't.pkl')), torch.device('cpu'), verbose=False, vae='some/vae')
