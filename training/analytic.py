"""Exact teachers: Gaussian mixtures p(x) = Σ_k π_k N(μ_k, s_k² I) over image-shaped tensors.

Their denoiser, denoising posterior p(x | y, σ) and linear-Gaussian posteriors are closed-form, so
distillation, multi-step sampling and PnP-GD can be checked exactly on a CPU (README, Exact teachers).
"""

import copy
import math

import torch

from torch_utils import persistence
from torch_utils.misc import draw_device, randn_like_from
from training.networks_ncvsd import GenerativeDenoiser, DEFAULT_GAMMA
from training.noise_levels import as_sigma

#----------------------------------------------------------------------------

def _standard_uniform_from_normal(normal):
    """Φ(n) ~ U(0, 1) for n ~ N(0, 1): categorical draws from the same per-seed normal streams."""
    return 0.5 * (1 + torch.erf(normal / math.sqrt(2)))

def _draw_categorical(log_weights, randn_like):
    """[N, K] unnormalised log-weights -> [N] component indices (inverse CDF)."""
    probs = log_weights.softmax(dim=1)
    u = _standard_uniform_from_normal(randn_like(probs[:, :1]))               # [N, 1]
    return (probs.cumsum(dim=1) < u).sum(dim=1).clamp(max=probs.shape[1] - 1)

@persistence.persistent_class
class MixtureDenoiser(torch.nn.Module):
    """Exact denoiser of a Gaussian mixture with the EDM2 Precond interface (and exact samplers)."""

    def __init__(self, means, stds, weights, component_labels=None, label_dim=0, sigma_data=0.5):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32)
        self.img_channels, self.img_resolution = means.shape[1], means.shape[2]
        self.label_dim = int(label_dim)
        self.sigma_data = sigma_data
        self.register_buffer('means', means)                                                      # [K, C, H, W]
        self.register_buffer('stds', torch.as_tensor(stds, dtype=torch.float32).expand(means.shape[0]).clone())
        weights = torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer('log_weights', (weights / weights.sum()).log())
        labels = torch.zeros(means.shape[0], dtype=torch.long) if component_labels is None else torch.as_tensor(component_labels)
        self.register_buffer('component_labels', labels.long())

    @property
    def num_components(self):
        return self.means.shape[0]

    def _label_log_mask(self, class_labels, n):
        """[N, K]: 0 for components of each sample's class, −inf elsewhere (all 0 without labels)."""
        if self.label_dim == 0 or class_labels is None:
            return torch.zeros(n, self.num_components, device=self.means.device)
        labels = class_labels.to(self.means.device).reshape(-1, self.label_dim).argmax(dim=1).expand(n)
        allowed = self.component_labels[None, :] == labels[:, None]
        return torch.where(allowed, 0.0, -math.inf)

    def component_log_posterior(self, x, sigma, class_labels=None):
        """[N, K] log π_k N(x; μ_k, (s_k² + σ²) I) restricted to the class (unnormalised)."""
        x = x.to(torch.float32).flatten(1)                                                       # [N, D]
        var = self.stds.square()[None, :] + as_sigma(sigma, x).reshape(-1, 1).square()           # [N, K]
        sq_dist = torch.cdist(x.double(), self.means.flatten(1).double()).square().float()      # [N, K]
        dim = x.shape[1]
        log_prob = -0.5 * sq_dist / var - 0.5 * dim * torch.log(2 * math.pi * var)
        return log_prob + self.log_weights[None, :] + self._label_log_mask(class_labels, x.shape[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False):
        """D(x; σ) = Σ_k w_k(x, σ)·(s_k² x + σ² μ_k) / (s_k² + σ²)."""
        x = x.to(torch.float32)
        sigma = as_sigma(sigma, x).expand(x.shape[0], 1, 1, 1)
        resp = self.component_log_posterior(x, sigma, class_labels).softmax(dim=1)            # [N, K]
        s2 = self.stds.square().reshape(1, -1, 1, 1, 1)                                       # [1, K, 1, 1, 1]
        sig2 = sigma.square()[:, None]                                                        # [N, 1, 1, 1, 1]
        comp_means = (s2 * x[:, None] + sig2 * self.means[None]) / (s2 + sig2)                # [N, K, C, H, W]
        D_x = (resp[:, :, None, None, None] * comp_means).sum(dim=1)
        if return_logvar:
            return D_x, torch.zeros(x.shape[0], 1, 1, 1, device=x.device)
        return D_x

    def posterior_sample(self, y, sigma, class_labels=None, randn_like=torch.randn_like):
        """An exact sample of p(x | y = x + σn): pick k by its posterior weight, then a Gaussian draw."""
        y = y.to(torch.float32)
        sigma = as_sigma(sigma, y).expand(y.shape[0], 1, 1, 1)
        k = _draw_categorical(self.component_log_posterior(y, sigma, class_labels), randn_like)
        s2, sig2 = self.stds[k].square().reshape(-1, 1, 1, 1), sigma.square()
        mean = (s2 * y + sig2 * self.means[k]) / (s2 + sig2)
        std = (s2 * sig2 / (s2 + sig2)).sqrt()
        return mean + std * randn_like(y)

    def sample(self, n, class_labels=None, randn_like=torch.randn_like):
        """n exact samples of p(x) (or of p(x | class))."""
        log_w = self.log_weights[None].expand(n, -1) + self._label_log_mask(class_labels, n)
        noise_ref = torch.zeros(n, *self.means.shape[1:], device=self.means.device)
        k = _draw_categorical(log_w, randn_like)
        return self.means[k] + self.stds[k].reshape(-1, 1, 1, 1) * randn_like(noise_ref)

    #------------------------------------------------------------------------
    # Hooks used by the training loop.

    def make_dataset(self, seed=0):
        from training.encoders import IdentityEncoder
        return MixtureDataset(self, seed=seed), IdentityEncoder()

    @torch.no_grad()
    def exact_metrics(self, samples, class_labels=None):
        return mixture_metrics(self, samples, class_labels)

#----------------------------------------------------------------------------

@torch.no_grad()
def mixture_metrics(mixture, samples, class_labels=None):
    """Sample quality against the mixture, exactly computable.

    tv: total variation between the frequencies of the nearest components and the expected weights.
    spread: RMS distance to the assigned mean over its std, sqrt(mean ‖x − μ_k‖² / (D s_k²)) (1 for exact samples).
    class_accuracy: share of samples whose component has the requested class (conditional mixtures).
    """
    samples = samples.to(torch.float32).to(mixture.means.device)
    n = samples.shape[0]
    assign = mixture.component_log_posterior(samples, 1e-3).argmax(dim=1)                      # [N] unconditional
    freq = torch.bincount(assign, minlength=mixture.num_components).float() / n
    expected = (mixture.log_weights[None].expand(n, -1) + mixture._label_log_mask(class_labels, n)).softmax(dim=1).mean(dim=0)
    mean_square = (samples.flatten(1) - mixture.means[assign].flatten(1)).square().mean(dim=1)
    spread = (mean_square / mixture.stds[assign].square()).mean().sqrt()
    metrics = dict(tv=0.5 * float((freq - expected).abs().sum()), spread=float(spread))
    if mixture.label_dim != 0 and class_labels is not None:
        wanted = class_labels.reshape(-1, mixture.label_dim).argmax(dim=1).to(assign.device)
        metrics['class_accuracy'] = float((mixture.component_labels[assign] == wanted).float().mean())
    return metrics

class MixtureDataset(torch.utils.data.Dataset):
    """An endless-looking dataset of exact mixture samples; item i depends only on (seed, i).

    It keeps its own CPU copy of the mixture: data stays on the CPU, and DataLoader workers never touch CUDA."""

    def __init__(self, mixture, seed=0, size=1 << 20):
        self.mixture = copy.deepcopy(mixture).cpu()
        self.seed = seed
        self.size = size
        self.label_dim = mixture.label_dim

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        gen = torch.Generator().manual_seed(self.seed * 1000003 + int(idx))
        randn_like = randn_like_from(gen)
        label = torch.zeros(1, self.label_dim)
        if self.label_dim:
            label[0, int(torch.randint(self.label_dim, [1], generator=gen))] = 1
        with torch.no_grad():
            x = self.mixture.sample(1, label if self.label_dim else None, randn_like)
        return x[0].numpy(), label[0].numpy()

class ExactGenerativeDenoiser(GenerativeDenoiser):
    """GenerativeDenoiser interface whose every evaluation is an exact draw of p(x | y, σ)."""

    def denoise(self, y, sigma, labels=None, return_logvar=False, randn_like=torch.randn_like, force_fp32=False):
        x = self.model.posterior_sample(y, sigma, labels, randn_like)
        return (x, torch.zeros(x.shape[0], 1, 1, 1, device=x.device)) if return_logvar else x

#----------------------------------------------------------------------------

class GaussianMixture:
    """User-facing API over MixtureDenoiser: sampling, the exact teacher, exact posteriors and metrics."""

    def __init__(self, means, std, weights=None, labels=None, label_dim=0):
        means = torch.as_tensor(means, dtype=torch.float32)
        weights = torch.ones(means.shape[0]) if weights is None else weights
        self.module = MixtureDenoiser(means, std, weights, labels, label_dim).eval()

    @classmethod
    def from_teacher(cls, module):
        """Wrap an existing MixtureDenoiser (e.g. toy_teacher() or one loaded from a pickle)."""
        mixture = cls.__new__(cls)
        mixture.module = module.eval()
        return mixture

    def sample(self, n, class_labels=None, generator=None):
        randn_like = randn_like_from(generator)
        with torch.no_grad():
            return self.module.sample(n, class_labels, randn_like)

    def teacher(self):
        return self.module

    def generative_denoiser(self, gamma=DEFAULT_GAMMA):
        return ExactGenerativeDenoiser(self.module, gamma=gamma)

    def metrics(self, samples, class_labels=None):
        return mixture_metrics(self.module, samples, class_labels)

    @torch.no_grad()
    def linear_posterior(self, operator, y, sigma_y, class_labels=None):
        """p(x | y) for y = A x + σ_y·n: (component weights [K], means [K, D], Cholesky factors [K, D, D]).

        `operator`: a dense matrix [M, D], or anything with `.matrix()` returning one; y: M values;
        class_labels: one one-hot row to condition on a class as well.
        """
        A = (operator.matrix() if hasattr(operator, 'matrix') else torch.as_tensor(operator)).to('cpu', torch.float64)
        means = self.module.means.flatten(1).to('cpu', torch.float64)                    # [K, D], solved on the CPU
        stds = self.module.stds.to('cpu', torch.float64)
        y = torch.as_tensor(y).reshape(-1).to('cpu', torch.float64)                      # [M]
        eye_d, eye_m = torch.eye(means.shape[1], dtype=torch.float64), torch.eye(A.shape[0], dtype=torch.float64)
        log_w, post_means, post_chols = [], [], []
        for k in range(means.shape[0]):
            cov_y = stds[k] ** 2 * A @ A.T + sigma_y ** 2 * eye_m                        # y | k ~ N(A μ_k, s_k² A Aᵀ + σ_y² I)
            evidence = torch.distributions.MultivariateNormal(A @ means[k], covariance_matrix=cov_y).log_prob(y)
            log_w.append(self.module.log_weights[k].cpu().double() + evidence)
            cov = torch.linalg.inv(eye_d / stds[k] ** 2 + A.T @ A / sigma_y ** 2)
            post_means.append(cov @ (means[k] / stds[k] ** 2 + A.T @ y / sigma_y ** 2))
            post_chols.append(torch.linalg.cholesky((cov + cov.T) / 2))
        log_w = torch.stack(log_w) + self.module._label_log_mask(class_labels, 1)[0].cpu().double()
        return log_w.softmax(0), torch.stack(post_means), torch.stack(post_chols)

    @torch.no_grad()
    def posterior_sample(self, operator, y, sigma_y, n, generator=None, class_labels=None):
        """n exact samples [n, C, H, W] of p(x | y) for y = A x + σ_y·n (see linear_posterior)."""
        weights, means, chols = self.linear_posterior(operator, y, sigma_y, class_labels)
        device = draw_device(generator, self.module.means.device)
        ks = torch.multinomial(weights.float().to(device), n, replacement=True, generator=generator)
        normal = torch.randn(n, means.shape[1], 1, generator=generator, dtype=torch.float64, device=device)
        out = means.to(device)[ks] + (chols.to(device)[ks] @ normal)[:, :, 0]
        return out.reshape(n, *self.module.means.shape[1:]).float().to(self.module.means.device)
