"""Noise-level grids, multi-step timesteps (--ts) and the posterior identity of NCVSD."""

import functools

import torch

from dnnlib.util import UserError
from torch_utils.misc import draw_device

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
NUM_GRID_STEPS = 40     # The grid that --ts indexes.
PAPER_CHAINS = {1: (10, 39), 2: (10, 22, 39), 4: (0, 10, 20, 30, 39)}     # The paper's 1-, 2- and 4-step --ts.
DEFAULT_TS = PAPER_CHAINS[2]                                               # --ts when none is given.

def karras_sigmas(num, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0, dtype=torch.float64):
    """[num] noise levels from sigma_max down to sigma_min, uniform in σ^(1/ρ)."""
    steps = torch.arange(num, dtype=torch.float64) / max(num - 1, 1)
    return ((sigma_max ** (1 / rho) + steps * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho).to(dtype)

def sampling_grid():
    """The 40-point Karras grid t_0 = 80 > ... > t_39 = 0.002 of multi-step sampling."""
    return karras_sigmas(NUM_GRID_STEPS)

def parse_ts(ts):
    """'10,22,39' or a list -> validated list of grid indices (strictly increasing, in [0, 39], ending at 39)."""
    if ts is None:
        return None
    if isinstance(ts, str):
        try:
            ts = [int(part) for part in ts.split(',') if part.strip() != '']
        except ValueError:
            raise UserError(f'--ts="{ts}" is not a comma-separated list of integers; e.g. --ts=10,22,39')
    ts = [int(i) for i in ts]
    last = NUM_GRID_STEPS - 1
    if len(ts) < 2:
        raise UserError(f'--ts={",".join(map(str, ts))} needs at least two indices and must end at {last}; e.g. --ts=10,{last} for one step')
    if any(i < 0 or i > last for i in ts):
        raise UserError(f'--ts={",".join(map(str, ts))}: indices must lie in [0, {last}]; e.g. --ts=10,22,{last}')
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise UserError(f'--ts={",".join(map(str, ts))}: indices must be strictly increasing; e.g. --ts=10,22,{last}')
    if ts[-1] != last:
        raise UserError(f'--ts={",".join(map(str, ts))} must end at {last} (it marks the end); e.g. --ts={",".join(map(str, ts))},{last}')
    return ts

def as_sigma(sigma, ref):
    """A scalar, [N] or [N, 1, 1, 1] noise level -> float32 [N or 1, 1, 1, 1] on ref's device."""
    return torch.as_tensor(sigma, dtype=torch.float32, device=ref.device).reshape(-1, 1, 1, 1)

def combine_conditions(y, sigma, x_t, t):
    """Posterior identity: E[x | x_t, y] = D(y_eff; σ_eff) for y = x + σn, x_t = x + tn'.

    σ_eff = (1/σ² + 1/t²)^(-1/2), y_eff = σ_eff²·(y/σ² + x_t/t²).
    """
    sigma, t = as_sigma(sigma, y), as_sigma(t, y)
    sigma_eff = (sigma.square().reciprocal() + t.square().reciprocal()).rsqrt()
    y_eff = sigma_eff.square() * (y / sigma.square() + x_t / t.square())
    return y_eff, sigma_eff

def edm_loss_weight(sigma, sigma_data=0.5):
    """λ(t) = (t² + σ_data²) / (t·σ_data)²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

#----------------------------------------------------------------------------
# Samplers of noise levels for training.

@functools.lru_cache(maxsize=None)
def karras_grid_on(device, num, sigma_min, sigma_max, rho):
    """The float32 Karras grid on `device`, made there once: a copy from the host at every draw would make the
    host wait for the device."""
    return karras_sigmas(num, sigma_min, sigma_max, rho, dtype=torch.float32).to(device)

class KarrasGridSampler:
    """σ drawn uniformly from a `num`-point Karras grid (ρ = 7) over [sigma_min, sigma_max]."""

    def __init__(self, num=1000, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0):
        self.grid_args = (num, sigma_min, sigma_max, rho)

    def __call__(self, n, device, rng=None):
        idx = torch.randint(self.grid_args[0], [n], generator=rng, device=draw_device(rng, device))
        return karras_grid_on(idx.device, *self.grid_args)[idx].to(device).reshape(-1, 1, 1, 1)

class LogNormalSampler:
    """t = exp(P_mean + P_std·n)."""

    def __init__(self, P_mean=-0.8, P_std=1.6):
        self.P_mean = P_mean
        self.P_std = P_std

    def __call__(self, n, device, rng=None):
        normal = torch.randn([n, 1, 1, 1], generator=rng, device=draw_device(rng, device)).to(device)
        return (normal * self.P_std + self.P_mean).exp()
