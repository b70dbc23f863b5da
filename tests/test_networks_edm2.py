import numpy as np
import torch

from conftest import load_fixture
from training.networks_edm2 import Precond, UNet, mp_sum, mp_cat, normalize

def rel_error(a, b):
    return float((a - b).norm() / b.norm())

def test_precond_matches_published_outputs():
    data = load_fixture('edm2_precond_small.pt')
    net = Precond(**data['config']).eval()
    assert set(net.state_dict().keys()) == set(data['state_dict'].keys())
    for name, tensor in net.state_dict().items():
        assert tensor.shape == data['state_dict'][name].shape, name
    net.load_state_dict(data['state_dict'])
    with torch.no_grad():
        D_x, logvar = net(data['x'], data['sigma'], data['class_labels'], return_logvar=True)
    assert rel_error(D_x, data['D_x']) < 1e-5
    assert rel_error(logvar, data['logvar']) < 1e-5

def test_unet_halves_compose_to_the_whole():
    data = load_fixture('edm2_precond_small.pt')
    cfg = {k: v for k, v in data['config'].items() if k != 'logvar_channels'}
    full = UNet(**cfg).eval()
    enc, dec = UNet(parts='encoder', **cfg).eval(), UNet(parts='decoder', **cfg).eval()
    for part in (full, enc, dec):
        part.load_state_dict({k[5:]: v for k, v in data['state_dict'].items() if k.startswith('unet.')}, strict=False)
    x, noise, labels = data['x'], data['sigma'].log() / 4, data['class_labels']
    with torch.no_grad():
        h, skips = enc.encode(x, enc.embed(noise, labels))
        assert torch.equal(dec.decode(h, skips, dec.embed(noise, labels)), full(x, noise, labels))
    assert not hasattr(enc, 'dec') and not hasattr(dec, 'enc') and not hasattr(enc, 'out_gain')

def test_magnitude_preserving_primitives():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 8, generator=gen), torch.randn(4096, 24, generator=gen)
    for t in (0.0, 0.3, 0.5, 1.0):
        assert abs(mp_sum(a, b[:, :8], t).std().item() - 1) < 0.03
        assert abs(mp_cat(a, b, t=t).std().item() - 1) < 0.05 or t in (0.0, 1.0)
    w = torch.randn(5, 3, 3, 3, generator=gen) * 7
    rms = normalize(w).reshape(5, -1).square().mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones(5), atol=1e-3)

def test_mpconv_forced_normalization_in_training_only():
    from training.networks_edm2 import MPConv
    conv = MPConv(3, 4, kernel=[3, 3])
    with torch.no_grad():
        conv.weight.mul_(5)
    x = torch.randn(2, 3, 8, 8)
    conv.eval()(x)
    assert conv.weight.reshape(4, -1).norm(dim=1).mean() > 10
    conv.train()(x)
    norms = conv.weight.reshape(4, -1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, np.sqrt(27)), rtol=1e-3)

def test_precision_sets_the_body_dtype():
    """bf16 computes in bfloat16 on any device (outputs move, a little); fp16 falls back to float32 off CUDA."""
    from training.networks_edm2 import set_precision
    data = load_fixture('edm2_precond_small.pt')
    net = Precond(**data['config']).eval()
    net.load_state_dict(data['state_dict'])
    args = (data['x'], data['sigma'], data['class_labels'])
    with torch.no_grad():
        exact = set_precision(net, 'fp32')(*args)
        assert torch.equal(set_precision(net, 'fp16')(*args), exact)
        bf16 = set_precision(net, 'bf16')(*args)
    assert not torch.equal(bf16, exact) and float((bf16 - exact).norm() / exact.norm()) < 0.05
    assert torch.allclose(exact, data['D_x'], rtol=1e-5, atol=1e-6)
