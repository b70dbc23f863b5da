import pickle

import pytest
import torch

import dnnlib
from conftest import load_fixture
from training import networks_edm2
from training.networks_edm2 import Precond
from training.networks_ncvsd import ConditionalPrecond, ConditionalDiscriminator, GenerativeDenoiser
from training.noise_levels import sampling_grid, parse_ts
from dnnlib.util import UserError

def rel_error(a, b):
    return float((a - b).norm() / b.norm())

@pytest.fixture(scope='module')
def data():
    return load_fixture('ncvsd_networks_small.pt')

def inputs(data):
    return data['x'], data['sigma'], data['cond_x'], data['cond_sigma'], data['class_labels']

def test_generator_matches_published_outputs(data):
    net = ConditionalPrecond(**data['config']).eval()
    assert set(net.state_dict()) == set(data['generator_state_dict'])
    net.load_state_dict(data['generator_state_dict'])
    with torch.no_grad():
        D_x, logvar = net(*inputs(data), return_logvar=True)
    assert rel_error(D_x, data['generator_D_x']) < 1e-5
    assert rel_error(logvar, data['generator_logvar']) < 1e-5

def test_discriminator_matches_published_outputs(data):
    net = ConditionalDiscriminator(**data['config']).eval()
    assert set(net.state_dict()) == set(data['discriminator_state_dict'])
    net.load_state_dict(data['discriminator_state_dict'])
    with torch.no_grad():
        logits = net(*inputs(data))
    assert logits.shape == (5, 1)
    assert rel_error(logits, data['discriminator_logits']) < 1e-5

def test_initialised_generator_equals_teacher(data):
    teacher = Precond(**data['config']).eval()
    teacher.load_state_dict(data['teacher_state_dict'])
    net = ConditionalPrecond(**data['config']).eval().init_from_pretrained(teacher)
    with torch.no_grad():
        D_x = net(*inputs(data))
        assert rel_error(teacher(data['x'], data['sigma'], data['class_labels']), data['teacher_D_x']) < 1e-5
    assert rel_error(D_x, data['initialized_generator_D_x']) < 1e-5
    assert rel_error(D_x, data['teacher_D_x']) < 1e-5
    assert torch.all(net.dec.additional_skips_weight == 0)

def test_condition_matters_once_weights_are_open(data):
    net = ConditionalPrecond(**data['config']).eval()
    net.load_state_dict(data['generator_state_dict'])
    x, sigma, cond_x, cond_sigma, labels = inputs(data)
    with torch.no_grad():
        assert not torch.allclose(net(x, sigma, cond_x, cond_sigma, labels), net(x, sigma, cond_x * 0, cond_sigma, labels))
        net.dec.additional_x_weight.zero_()
        net.dec.additional_skips_weight.zero_()
        assert torch.allclose(net(x, sigma, cond_x, cond_sigma, labels), net(x, sigma, cond_x * 0, cond_sigma, labels))

def test_project_clips_mixing_weights_and_normalises():
    net = ConditionalPrecond(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1],
        num_blocks=1, attn_resolutions=[], logvar_channels=4)
    with torch.no_grad():
        net.dec.additional_skips_weight.copy_(torch.tensor([-0.5, 1.7]))
        net.enc.enc['8x8_conv'].weight.mul_(9)
    net.prepare_for_training()
    assert net.dec.additional_skips_weight.tolist() == [0.0, 1.0]
    weight = net.enc.enc['8x8_conv'].weight
    assert torch.allclose(weight.flatten(1).norm(dim=1), torch.full([8], weight[0].numel() ** 0.5), rtol=1e-3)
    before = weight.clone()
    net.train()(torch.randn(2, 3, 8, 8), torch.ones(2), torch.randn(2, 3, 8, 8), torch.ones(2))
    assert torch.equal(weight, before)            # no in-place update inside forward: safe with two forwards per step

class RecordingNet(torch.nn.Module):
    """Any inner network with the published signature; records its calls."""

    def __init__(self):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = 4, 1, 0
        self.calls = []

    def forward(self, x, sigma, condition_x, condition_sigma, class_labels=None, force_fp32=False, return_logvar=False):
        self.calls.append((sigma.flatten().clone(), condition_sigma.flatten().clone()))
        return condition_x * 0.5

@pytest.mark.parametrize('ts', [[10, 39], [10, 22, 39], [0, 10, 20, 30, 39]])
def test_multistep_calls_at_grid_sigma_eff(ts):
    inner = RecordingNet()
    denoiser = GenerativeDenoiser(inner)
    out = denoiser(torch.randn(3, 1, 4, 4) * 80, 80.0, ts=ts)
    assert out.shape == (3, 1, 4, 4)
    assert len(inner.calls) == len(ts) - 1
    grid = sampling_grid()
    for (sigma_hat, cond_sigma), index in zip(inner.calls, ts):
        sigma_eff = (1 / 80.0 ** 2 + 1 / grid[index] ** 2) ** -0.5
        assert torch.allclose(cond_sigma.double(), sigma_eff.expand(3), rtol=1e-6)
        assert torch.allclose(sigma_hat, cond_sigma * 1.414, rtol=1e-6)

def test_single_step_noise_injection():
    inner = RecordingNet()
    out = GenerativeDenoiser(inner, gamma=0.414)(torch.zeros(2, 1, 4, 4), torch.tensor([1.0, 2.0]))
    assert torch.allclose(inner.calls[0][0], torch.tensor([1.414, 2.828]))
    assert torch.equal(out, torch.zeros(2, 1, 4, 4))

def test_released_layout_compatibility():
    """The released pickle restores only the published attributes (by reference, via nn.Module state)."""
    assert networks_edm2.GenerativeDenoiser is GenerativeDenoiser
    restored = GenerativeDenoiser.__new__(GenerativeDenoiser)
    torch.nn.Module.__init__(restored)
    restored.model = RecordingNet()
    restored.gamma, restored.init_sigma = 0.414, 80.0
    restored.img_resolution, restored.img_channels, restored.label_dim = 4, 1, 0
    assert restored(torch.zeros(1, 1, 4, 4), 1.0, ts=[20, 39]).shape == (1, 1, 4, 4)
    assert len(restored.model.calls) == 1

def test_ts_validation():
    assert parse_ts('10,22,39') == [10, 22, 39]
    for bad, message in [('22,10,39', 'strictly increasing'), ('10,22', 'must end at 39'), ('10,40', r'\[0, 39\]'),
            ('39', 'at least two'), ('a,b', 'comma-separated')]:
        with pytest.raises(UserError, match=message):
            parse_ts(bad)
    grid = sampling_grid()
    assert len(grid) == 40 and float(grid[0]) == pytest.approx(80) and float(grid[-1]) == pytest.approx(0.002)

def test_snapshot_wrapper_pickles(data, tmp_path):
    net = ConditionalPrecond(**data['config']).eval()
    net.load_state_dict(data['generator_state_dict'])
    with open(tmp_path / 'snap.pkl', 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=GenerativeDenoiser(net)), f)
    with open(tmp_path / 'snap.pkl', 'rb') as f:
        restored = pickle.load(f)['ema']
    with torch.no_grad():
        assert rel_error(restored.model(*inputs(data)), data['generator_D_x']) < 1e-5
