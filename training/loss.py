"""NCVSD losses (README, Notes on the method): fake-score DSM, discriminator BCE and the generator's VSD + GAN loss.

Network-agnostic: `G` is a GenerativeDenoiser-like callable, `score` and `discriminator` are conditional
networks `net(x, σ, condition_x, condition_sigma, class_labels)`, `teacher` is any Precond-like denoiser,
and `rng` the torch.Generator every draw comes from.
"""

import torch

from torch_utils import persistence
from torch_utils.misc import randn_like_from
from training.noise_levels import KarrasGridSampler, LogNormalSampler, combine_conditions, edm_loss_weight

@persistence.persistent_class
class NCVSDLoss:
    """Per-element (score, generator) and per-sample (discriminator) losses for one NCVSD iteration."""

    fused_discriminator = True      # Real and fake in one discriminator pass sharing the condition's encoding.

    def __init__(self, P_mean=-0.8, P_std=1.6, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0,
        sigma_grid_size=1000, sigma_rho=7.0, gan_loss_scaling=1.0,
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_grid_size = sigma_grid_size
        self.sigma_rho = sigma_rho
        self.gan_loss_scaling = gan_loss_scaling

    def sample_condition(self, images, rng=None):
        """y = x + σn with σ uniform over the Karras grid; returns (y, σ [N, 1, 1, 1])."""
        sampler = KarrasGridSampler(self.sigma_grid_size, self.sigma_min, self.sigma_max, self.sigma_rho)
        sigma = sampler(images.shape[0], images.device, rng=rng)
        return images + randn_like_from(rng)(images) * sigma, sigma

    def sample_t(self, images, rng=None):
        return LogNormalSampler(self.P_mean, self.P_std)(images.shape[0], images.device, rng=rng)

    def score_loss(self, G, score, images, labels=None, rng=None):
        """Fake score S by DSM on the generator's samples: λ(t)/e^u·‖S(x_t, t; y, σ) − x‖² + u."""
        randn_like = randn_like_from(rng)
        y, sigma = self.sample_condition(images, rng)
        with torch.no_grad():
            x = G(y, sigma, labels, randn_like=randn_like)
        t = self.sample_t(images, rng)
        x_t = x + randn_like(x) * t
        denoised, logvar = score(x_t, t, y, sigma, class_labels=labels, return_logvar=True)
        return edm_loss_weight(t, self.sigma_data) / logvar.exp() * (denoised - x).square() + logvar

    def discriminator_loss(self, G, discriminator, images, labels=None, rng=None):
        """BCE of real (x_data + tn) -> 1 and fake (G(y, σ) + tn) -> 0 at the same t, × data dims; [N]."""
        randn_like = randn_like_from(rng)
        y, sigma = self.sample_condition(images, rng)
        with torch.no_grad():
            fake = G(y, sigma, labels, randn_like=randn_like)
        t = self.sample_t(images, rng)
        real, fake = images + randn_like(images) * t, fake + randn_like(fake) * t
        if self.fused_discriminator:
            real_logits, fake_logits = discriminator(torch.cat([real, fake]), torch.cat([t, t]), y, sigma, class_labels=labels).chunk(2)
        else:
            real_logits = discriminator(real, t, y, sigma, class_labels=labels)
            fake_logits = discriminator(fake, t, y, sigma, class_labels=labels)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        loss = 0.5 * (bce(real_logits, torch.ones_like(real_logits), reduction='none')
            + bce(fake_logits, torch.zeros_like(fake_logits), reduction='none'))
        return loss.flatten() * images[0].numel()

    def generator_loss(self, G, score, teacher, images, labels=None, discriminator=None, use_gan=False, rng=None):
        """VSD: λ(t)/e^u·‖x − sg(x − (s − s0))‖² + u, s0 = teacher posterior mean, s = fake score.

        Its gradient in x is 2λ/e^u·(s − s0): descent moves samples from the fake towards the teacher.
        Returns (per-element loss, per-sample GAN loss or None).
        """
        randn_like = randn_like_from(rng)
        y, sigma = self.sample_condition(images, rng)
        x, logvar = G(y, sigma, labels, return_logvar=True, randn_like=randn_like)
        t = self.sample_t(images, rng)
        x_t = x + randn_like(x) * t
        with torch.no_grad():
            y_eff, sigma_eff = combine_conditions(y, sigma, x_t, t)
            teacher_mean = teacher(y_eff, sigma_eff, class_labels=labels)
            fake_mean = score(x_t, t, y, sigma, class_labels=labels)
            target = x - (fake_mean - teacher_mean)
        loss = edm_loss_weight(t, self.sigma_data) / logvar.exp() * (x - target).square() + logvar
        gan_loss = None
        if use_gan and discriminator is not None and self.gan_loss_scaling != 0:
            logits = discriminator(x_t, t, y, sigma, class_labels=labels)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction='none')
            gan_loss = self.gan_loss_scaling * bce.flatten() * images[0].numel()
        return loss, gan_loss
