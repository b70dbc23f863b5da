"""The NCVSD losses against closed forms on a Gaussian world: data p = N(0, s²), generator q = N(m, s²)."""

import math

import torch

from training.loss import NCVSDLoss
from training.noise_levels import combine_conditions, karras_sigmas, edm_loss_weight

S = 0.5

def gaussian_posterior_mean(mean, x_noisy, sigma):
    """E[x | x + σn = x_noisy] for x ~ N(mean, S²)."""
    return mean + S ** 2 / (S ** 2 + sigma ** 2) * (x_noisy - mean)

class ShiftedGenerator(torch.nn.Module):
    """Outputs x ~ N(m, S²) whatever the condition, with a learnable shift m."""

    def __init__(self, shift):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(float(shift)))

    def forward(self, y, sigma, labels=None, return_logvar=False, randn_like=torch.randn_like):
        x = self.shift + S * randn_like(y)
        return (x, torch.zeros(y.shape[0], 1, 1, 1)) if return_logvar else x

def exact_score_net(mean):
    """E_q[x | x_t, y] for the conditional score network slot: the posterior identity under N(mean, S²)."""
    def score(x_t, t, y, sigma, class_labels=None, return_logvar=False):
        y_eff, sigma_eff = combine_conditions(y, sigma, x_t, t)
        out = gaussian_posterior_mean(mean, y_eff, sigma_eff)
        return (out, torch.zeros(x_t.shape[0], 1, 1, 1)) if return_logvar else out
    return score

def teacher(x, sigma, class_labels=None):
    return gaussian_posterior_mean(0.0, x, sigma.reshape(-1, 1, 1, 1))

def test_generator_gradient_points_towards_the_teacher():
    loss_fn = NCVSDLoss()
    for shift in (0.7, -0.4):
        gen = ShiftedGenerator(shift)
        images = torch.zeros(512, 1, 2, 2)
        loss, gan = loss_fn.generator_loss(gen, exact_score_net(shift), teacher, images, rng=torch.Generator().manual_seed(0))
        assert gan is None
        loss.sum().backward()
        # d loss / d m = Σ 2λ(t)(s − s0) with s − s0 = m·σ_eff²/(S² + σ_eff²): same sign as m.
        assert gen.shift.grad * shift > 0

def test_generator_gradient_closed_form():
    """With q = p the gradient vanishes exactly (the fake score equals the teacher)."""
    gen = ShiftedGenerator(0.0)
    loss, _ = NCVSDLoss().generator_loss(gen, exact_score_net(0.0), teacher, torch.zeros(64, 1, 2, 2))
    loss.sum().backward()
    assert abs(float(gen.shift.grad)) < 1e-4

def test_score_loss_is_smallest_for_the_exact_fake_score():
    loss_fn = NCVSDLoss()
    gen = ShiftedGenerator(0.6)
    images = torch.zeros(2048, 1, 2, 2)
    exact = loss_fn.score_loss(gen, exact_score_net(0.6), images, rng=torch.Generator().manual_seed(1)).mean()
    wrong = loss_fn.score_loss(gen, exact_score_net(0.0), images, rng=torch.Generator().manual_seed(1)).mean()
    assert exact < wrong

def test_score_loss_value_matches_formula():
    """λ(t)/e^u·‖S − x‖² + u: with S ≡ x + 1 and u = 0 the loss is λ(t) per element."""
    loss_fn = NCVSDLoss(P_mean=0.0, P_std=0.0)        # t = 1 exactly
    score = lambda x_t, t, y, sigma, class_labels=None, return_logvar=False: (x_t * 0 + 1 + gen_out[0], torch.zeros(x_t.shape[0], 1, 1, 1))
    gen_out = [None]
    def recording_gen(y, sigma, labels=None, return_logvar=False, randn_like=torch.randn_like):
        gen_out[0] = torch.zeros_like(y)
        return gen_out[0]
    loss = loss_fn.score_loss(recording_gen, score, torch.zeros(4, 1, 2, 2))
    assert torch.allclose(loss, torch.full_like(loss, float(edm_loss_weight(torch.tensor(1.0)))))

def test_discriminator_loss_at_chance_is_log2_per_dimension():
    loss_fn = NCVSDLoss()
    disc = lambda x, t, y, sigma, class_labels=None: torch.zeros(x.shape[0], 1)
    loss = loss_fn.discriminator_loss(ShiftedGenerator(0.0), disc, torch.zeros(3, 2, 4, 4))
    assert torch.allclose(loss, torch.full([3], math.log(2) * 32))

def test_sigma_sampler_uses_the_karras_grid():
    grid = karras_sigmas(1000).float()
    y, sigma = NCVSDLoss().sample_condition(torch.zeros(256, 1, 1, 1), rng=torch.Generator().manual_seed(0))
    assert all(torch.isclose(grid, s).any() for s in sigma.flatten())
    assert float(grid.max()) == 80.0 and abs(float(grid.min()) - 0.002) < 1e-7

def test_posterior_identity_closed_form():
    """For p = N(0, S²): E[x | y, x_t] by conditioning on both equals D(y_eff; σ_eff)."""
    sigma, t = torch.tensor(0.7), torch.tensor(0.3)
    y, x_t = torch.randn(5, 1, 1, 1), torch.randn(5, 1, 1, 1)
    precision = 1 / S ** 2 + 1 / sigma ** 2 + 1 / t ** 2
    direct = (y / sigma ** 2 + x_t / t ** 2) / precision
    y_eff, sigma_eff = combine_conditions(y, sigma, x_t, t)
    assert torch.allclose(gaussian_posterior_mean(0.0, y_eff, sigma_eff), direct, atol=1e-6)
