"""The exact teachers against Monte-Carlo and against each other."""

import pytest
import torch

from conftest import DEVICES
from training.analytic import GaussianMixture, mixture_metrics
from training.toy import toy_teacher

def tiny_mixture(label_dim=0):
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 1, 1, 2, generator=gen) * 1.5
    return GaussianMixture(means, std=torch.tensor([0.3, 0.5, 0.4]), weights=torch.tensor([0.2, 0.5, 0.3]),
        labels=torch.tensor([0, 1, 1]) if label_dim else None, label_dim=label_dim)

def importance_moments(mixture, y, sigma, n=400000):
    """E[x | y] and E[x² | y] by self-normalised importance sampling with prior draws."""
    x = mixture.sample(n, generator=torch.Generator().manual_seed(1)).flatten(1).double()
    log_w = -0.5 * (x - y.flatten().double()).square().sum(dim=1) / sigma ** 2
    w = (log_w - log_w.max()).exp()
    w = w / w.sum()
    return (w[:, None] * x).sum(0), (w[:, None] * x.square()).sum(0)

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('sigma', [0.5, 1.0, 3.0])
def test_exact_denoiser_matches_monte_carlo(sigma, device):
    mixture = tiny_mixture()
    y = torch.tensor([[[[0.4, -0.8]]]])
    mean, _ = importance_moments(mixture, y, sigma)
    D = mixture.teacher().to(device)(y.to(device), sigma).flatten().double().cpu()
    assert torch.allclose(D, mean, atol=0.02)

def test_generative_denoiser_matches_posterior_moments():
    mixture = tiny_mixture()
    y, sigma = torch.tensor([[[[0.4, -0.8]]]]), 1.0
    mean, second = importance_moments(mixture, y, sigma)
    samples = mixture.generative_denoiser()(y.expand(200000, -1, -1, -1), sigma).flatten(1).double()
    assert torch.allclose(samples.mean(0), mean, atol=0.02)
    assert torch.allclose(samples.square().mean(0), second, atol=0.03)

def test_class_conditional_denoiser_uses_only_its_class():
    mixture = tiny_mixture(label_dim=2)
    label0 = torch.tensor([[1.0, 0.0]])
    D = mixture.teacher()(torch.zeros(1, 1, 1, 2), 100.0, label0)
    mean0 = mixture.teacher().means[0]
    assert torch.allclose(D, mean0[None], atol=1e-3)        # σ → ∞ gives the class mean: one component
    samples = mixture.sample(2000, class_labels=label0.expand(2000, -1), generator=torch.Generator().manual_seed(0))
    assert mixture_metrics(mixture.teacher(), samples, label0.expand(2000, -1))['class_accuracy'] > 0.98

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('ts', [[10, 39], [10, 22, 39], [0, 10, 20, 30, 39]])
def test_multistep_sampling_with_exact_denoiser_reproduces_the_mixture(ts, device):
    mixture = toy_teacher(resolution=8, std=0.1).to(device)
    n = 3000
    labels = torch.eye(4, device=device)[torch.arange(n, device=device) % 4]
    gen = torch.Generator(device).manual_seed(0)
    randn_like = lambda x: torch.randn(x.shape, generator=gen, device=x.device)
    from training.analytic import ExactGenerativeDenoiser
    noise = torch.randn(n, 3, 8, 8, generator=gen, device=device)
    samples = ExactGenerativeDenoiser(mixture)(noise * 80, 80.0, labels=labels, ts=ts, randn_like=randn_like)
    assert samples.device.type == device
    metrics = mixture_metrics(mixture, samples, labels)
    # 12 components, 3000 draws: the TV of exact samples is about 0.03; spread error ~ 1/sqrt(n·D).
    assert metrics['tv'] < 0.06 and abs(metrics['spread'] - 1) < 0.02 and metrics['class_accuracy'] == 1.0

def test_metrics_detect_mode_collapse_and_blur():
    mixture = toy_teacher(resolution=8, std=0.1)
    labels = torch.eye(4)[torch.arange(400) % 4]
    exact = mixture.sample(400, labels)
    assert mixture_metrics(mixture, exact, labels)['tv'] < 0.12
    collapsed = mixture.means[torch.arange(400) % 4 * 3]                  # one colour per class
    assert mixture_metrics(mixture, collapsed, labels)['tv'] == pytest.approx(2 / 3, abs=1e-6)
    assert mixture_metrics(mixture, collapsed, labels)['spread'] == pytest.approx(0, abs=1e-3)

@pytest.mark.parametrize('device', DEVICES)
def test_linear_posterior_against_brute_force(device):
    """Dense A: the closed-form mixture posterior equals reweighting prior draws by the likelihood."""
    mixture = tiny_mixture()
    mixture.module.to(device)
    A = torch.tensor([[1.0, 0.5]])
    y, sigma_y = torch.tensor([0.7]), 0.3
    samples = mixture.posterior_sample(A, y, sigma_y, 200000, generator=torch.Generator(device).manual_seed(0)).flatten(1).double().cpu()
    mixture.module.cpu()
    prior = mixture.sample(400000, generator=torch.Generator().manual_seed(1)).flatten(1).double()
    log_w = -0.5 * ((prior @ A.double().T).flatten() - 0.7).square() / sigma_y ** 2
    w = (log_w - log_w.max()).exp()
    w /= w.sum()
    assert torch.allclose(samples.mean(0), (w[:, None] * prior).sum(0), atol=0.02)
    assert torch.allclose(samples.square().mean(0), (w[:, None] * prior.square()).sum(0), atol=0.03)

def test_teacher_pickles_and_loads(tmp_path):
    import pickle
    import dnnlib
    from training.network_io import load_network_data, check_diffusion_network
    teacher = toy_teacher(resolution=8)
    with open(tmp_path / 'toy.pkl', 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=teacher), f)
    loaded = check_diffusion_network(load_network_data(str(tmp_path / 'toy.pkl'), verbose=False)['ema'], 'toy.pkl')
    x = torch.randn(2, 3, 8, 8)
    labels = torch.eye(4)[:2]
    assert torch.equal(loaded(x, 0.5, labels), teacher(x, 0.5, labels))
    assert (loaded.img_resolution, loaded.img_channels, loaded.label_dim, loaded.sigma_data) == (8, 3, 4, 0.5)

@pytest.mark.parametrize('device', DEVICES)
def test_denoiser_fit_runs_on_the_given_device(device):
    """The students' initial network is fitted on the run's device and handed back on the CPU; the CPU fit is the
    same whether its device is given or taken from the teacher, and follows its seed alone (torch's global
    generator neither decides it nor is moved by it: two runs with one --seed start from the same weights)."""
    from training.toy import fit_denoiser_network
    teacher = toy_teacher(resolution=8, std=0.1)
    arch = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16, logvar_channels=8)
    def fit(**kwargs):
        return fit_denoiser_network(teacher, arch, iterations=3, batch=8, verbose=False, **kwargs)
    global_state = torch.get_rng_state()
    net = fit(device=device)
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.randn(100)                                                # The global generator moves between the fits.
    reference = fit()
    assert teacher.means.device.type == 'cpu'
    for (name, param), ref in zip(net.named_parameters(), reference.parameters()):
        assert param.device.type == 'cpu' and torch.isfinite(param).all(), name
        if device == 'cpu':
            assert torch.equal(param, ref), name
    assert any(not torch.equal(param, ref) for param, ref in zip(net.parameters(), fit(seed=1).parameters()))

def test_short_toy_distillation_improves_the_student(tmp_path):
    """A few NCVSD iterations on an 8×8 toy move the student's exact metrics towards the mixture."""
    from training.toy import fit_denoiser_network
    from training.networks_ncvsd import ConditionalPrecond, GenerativeDenoiser
    from training.training_loop import training_loop
    torch.manual_seed(0)
    teacher = toy_teacher(resolution=8, std=0.1)
    arch = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16, logvar_channels=8)
    init_net = fit_denoiser_network(teacher, arch, iterations=150, batch=32, verbose=False)
    n = 512
    labels = torch.eye(4)[torch.arange(n) % 4]
    def score(model):
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            x = GenerativeDenoiser(model.eval())(torch.randn(n, 3, 8, 8, generator=gen) * 80, 80.0, labels, ts=[0, 10, 20, 30, 39],
                randn_like=lambda x: torch.randn(x.shape, generator=gen))
        return mixture_metrics(teacher, x, labels)
    kwargs = dict(init_net.init_kwargs, use_fp16=False)
    before = score(ConditionalPrecond(**kwargs).init_from_pretrained(init_net))
    dataset, encoder = teacher.make_dataset()
    G, _, _, _ = training_loop(run_dir=str(tmp_path), teacher=teacher, dataset=dataset, encoder=encoder, init_net=init_net,
        network_kwargs={'use_fp16': False}, lr_kwargs=dict(ref_lr=0.01, ref_batches=0, rampup_Mimg=0), g_lr_scaling=0.03, d_lr_scaling=0.1,
        batch_size=32, total_nimg=32 * 60, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=0, final_samples=200)
    after = score(G)
    import json
    final = json.loads(open(tmp_path / 'stats.jsonl').readlines()[-1])              # The run ends with its exact metrics.
    for steps in (1, 2, 4):
        assert final[f'Final-0.100/{steps}-step/tv']['num'] == 1 and 0 <= final[f'Final-0.100/{steps}-step/tv']['mean'] <= 1
        assert final[f'Final-0.050/{steps}-step/class_accuracy']['mean'] > 0.5
    # The generator sharpens (spread towards 1) and keeps its classes; diversity (TV) is not asserted:
    # VSD is mode-seeking and this short run loses colours (see the toy benchmark in the README).
    assert abs(after['spread'] - 1) < abs(before['spread'] - 1) - 0.1, (before, after)
    assert after['class_accuracy'] > before['class_accuracy'] - 0.05, (before, after)

def test_mixture_dataset_keeps_its_own_cpu_mixture():
    """The training loop moves the teacher to its device; the dataset (read by DataLoader workers) must
    not follow it: items stay CPU arrays drawn from a CPU copy."""
    teacher = toy_teacher(resolution=8)
    dataset, _encoder = teacher.make_dataset(seed=3)
    before = dataset[5]
    teacher.to('meta')                                      # A device the dataset can never compute on.
    after = dataset[5]
    assert dataset.mixture.means.device.type == 'cpu'
    assert (before[0] == after[0]).all() and (before[1] == after[1]).all()
