"""PnP-GD (README, Inverse problems): alternate a generative-denoiser prior step and an exact likelihood step while
the noise level anneals over a Karras schedule."""

import math

import torch

from torch_utils.misc import randn_like_from
from training.noise_levels import karras_sigmas, parse_ts

def pnp_gd(net, y, operator, sigma_y, beta=None, steps=50, sigma_min=0.002, sigma_max=80.0, rho=2.0, ts=None,
    ema_sigma=0.0, ema_decay=None, generator=None, labels=None, progress=None):
    """Samples [N, C, H, W] of p(x | y) for y = A(x) + σ_y·n, one independent chain per batch item.

    Prior step x = G(u, σ_i) (or a short --ts chain from (u, σ_i)); likelihood step
    u ~ exp(−‖A u − y‖²/β − ‖u − x‖²/(2σ_{i+1}²)), β = 2σ_y² by default. Returns the EMA of x over the
    steps with σ_i < ema_sigma (x ← decay·EMA + (1 − decay)·x), else the last x.
    """
    beta = 2 * sigma_y ** 2 if beta is None else beta
    sigma_like = math.sqrt(beta / 2)                                 # exp(−‖·‖²/β) = exp(−‖·‖²/(2σ_like²))
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).tolist()
    ts = parse_ts(ts) if ts is not None else None
    shape = (y.shape[0], net.img_channels, net.img_resolution, net.img_resolution)
    randn_like = randn_like_from(generator)
    u = randn_like(torch.zeros(shape, device=y.device)) * sigmas[0]
    average = None
    for i, sigma in enumerate(sigmas):
        with torch.no_grad():
            x = net(u, sigma, labels=labels, ts=ts, randn_like=randn_like)
        if sigma < ema_sigma and ema_decay is not None:
            average = x if average is None else ema_decay * average + (1 - ema_decay) * x
        if i + 1 < len(sigmas):
            u = operator.likelihood_step(x, y, sigma_like, sigmas[i + 1], generator=generator)
        if progress is not None:
            progress.update(1)
    return x if average is None else average
