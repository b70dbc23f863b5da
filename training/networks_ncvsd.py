"""NCVSD networks: the conditional denoiser (generator G and fake score S), the discriminator,
and the GenerativeDenoiser wrapper that samples p(x | y, σ) in one or a few evaluations.

All of them reuse the EDM2 UNet halves of networks_edm2 and start from a teacher's weights.
"""

import torch

from torch_utils import persistence
from training.networks_edm2 import (UNet, MPConv, MPFourier, mp_sum, mp_sums, mp_cat, precond_coefficients,
    prepare_inputs, compute_dtype, normalize_weights_, disable_forward_normalization_, normalizes_weights_by_group)
from training.noise_levels import as_sigma, combine_conditions, sampling_grid, parse_ts, DEFAULT_TS

#----------------------------------------------------------------------------

@persistence.persistent_class
class ControlledDecoder(UNet):
    """EDM2 decoder half whose input and skips blend in a control encoder's, with learned weights in [0, 1]."""

    def __init__(self, **unet_kwargs):
        super().__init__(parts='decoder', **unet_kwargs)
        self.additional_x_weight = torch.nn.Parameter(torch.zeros([1]))
        self.additional_skips_weight = torch.nn.Parameter(torch.zeros([self.num_skips]))

    @torch.no_grad()
    def clip_weights_(self):
        """Forced clipping of the mixing weights to [0, 1]."""
        self.additional_x_weight.clamp_(0, 1)
        self.additional_skips_weight.clamp_(0, 1)

    def mixed_decode(self, x, skips, ctrl_x, ctrl_skips, emb):
        """Decode mp_sum(enc, ctrl, t=w) of the deepest features and of every skip (w = 0: ctrl ignored)."""
        x_weight = self.additional_x_weight.clip(0, 1).to(x.dtype)
        skip_weights = self.additional_skips_weight.clip(0, 1).to(x.dtype)
        x = mp_sum(x, ctrl_x, t=x_weight)
        skips = mp_sums(list(zip(skips, ctrl_skips)), skip_weights)
        return self.decode(x, skips, emb)

class _TwoEncoderNetwork(torch.nn.Module):
    """Shared part of G/S and the discriminator: `enc` sees (x, σ), `ctrl` sees the condition (y, σ_y)."""

    force_weight_normalization = True   # Renormalise the raw weights in place after every optimizer step.
    reduced_dtype = 'float16'           # Body dtype when use_fp16 (set_precision() may choose bfloat16).

    def __init__(self,
        img_resolution,                         # Height = width of the images.
        img_channels,                           # Channels per pixel.
        label_dim,                              # Number of classes (one-hot labels); 0: unconditional.
        use_fp16        = True,                 # Run the UNet parts in reduced precision (see compute_dtype).
        sigma_data      = 0.5,                  # Expected standard deviation of the data (EDM preconditioning).
        logvar_channels = 128,                  # Fourier features of G's and S's uncertainty head (the discriminator has none).
        **unet_kwargs,                          # UNet arguments, as the teacher's (model_channels, channel_mult, ...).
    ):
        super().__init__()
        self.logvar_channels = logvar_channels
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.ctrl = UNet(parts='encoder', **self.unet_kwargs)
        self.enc = UNet(parts='encoder', **self.unet_kwargs)

    def _encode_both(self, x, sigma, condition_x, condition_sigma, class_labels, force_fp32):
        """Precondition and encode input and condition; returns what the heads need.

        x may hold k inputs per condition ([k·N] vs [N], e.g. real and fake for the discriminator):
        the condition is then encoded once and its features repeated."""
        x, sigma, _ = prepare_inputs(x, sigma, None, 0)
        condition_x, condition_sigma, class_labels = prepare_inputs(condition_x, condition_sigma, class_labels, self.label_dim)
        repeats = x.shape[0] // condition_x.shape[0]
        input_labels = class_labels.repeat(repeats, 1) if class_labels is not None and class_labels.shape[0] > 1 else class_labels
        dtype = compute_dtype(self.use_fp16, x.device, force_fp32, self.reduced_dtype)
        c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, self.sigma_data)
        _, _, cond_c_in, cond_c_noise = precond_coefficients(condition_sigma, self.sigma_data)
        enc_x, enc_skips = self.enc.encode((c_in * x).to(dtype), self.enc.embed(c_noise, input_labels))
        ctrl_x, ctrl_skips = self.ctrl.encode((cond_c_in * condition_x).to(dtype), self.ctrl.embed(cond_c_noise, class_labels))
        if repeats > 1:
            ctrl_x, ctrl_skips = ctrl_x.repeat(repeats, 1, 1, 1), [skip.repeat(repeats, 1, 1, 1) for skip in ctrl_skips]
        class_labels = input_labels
        return dict(x=x, class_labels=class_labels, c_skip=c_skip, c_out=c_out, c_noise=c_noise,
            enc_x=enc_x, enc_skips=enc_skips, ctrl_x=ctrl_x, ctrl_skips=ctrl_skips)

    def init_from_pretrained(self, teacher, copy_logvar=False):
        """Copy the teacher UNet's weights into every part with matching names (new weights keep their init)."""
        unet_state = teacher.unet.state_dict()
        for part in self._pretrained_parts():
            part.load_state_dict(unet_state, strict=False)
        return self

    def prepare_for_training(self):
        """No in-place normalisation inside forward: `project_()` does it once per optimizer step, where forced."""
        disable_forward_normalization_(self)
        self.project_()
        return self

    @torch.no_grad()
    def project_(self):
        """Forced weight normalisation (where the network has it) and weight clipping; call after every optimizer step."""
        if self.force_weight_normalization:
            normalize_weights_(self)
        for module in self.modules():
            if isinstance(module, ControlledDecoder):
                module.clip_weights_()

@persistence.persistent_class
class ConditionalPrecond(_TwoEncoderNetwork):
    """D(x; σ | y, σ_y): the generator G and the fake score S of NCVSD, with a logvar head."""

    def __init__(self, *args, **kwargs):                # The arguments of _TwoEncoderNetwork.
        super().__init__(*args, **kwargs)
        self.dec = ControlledDecoder(**self.unet_kwargs)
        self.logvar_fourier = MPFourier(self.logvar_channels)
        self.logvar_linear = MPConv(self.logvar_channels, 1, kernel=[])

    def _pretrained_parts(self):
        return [self.ctrl, self.enc, self.dec]

    def init_from_pretrained(self, teacher, copy_logvar=False):
        """The UNet parts from the teacher; the logvar head keeps its own initialisation, as published,
        unless copy_logvar (then the teacher's trained uncertainty weights the loss from the first step)."""
        super().init_from_pretrained(teacher)
        if copy_logvar and hasattr(teacher, 'logvar_linear'):
            self.logvar_fourier.load_state_dict(teacher.logvar_fourier.state_dict())
            self.logvar_linear.load_state_dict(teacher.logvar_linear.state_dict())
        return self

    @normalizes_weights_by_group
    def forward(self, x, sigma, condition_x, condition_sigma, class_labels=None, force_fp32=False, return_logvar=False):
        h = self._encode_both(x, sigma, condition_x, condition_sigma, class_labels, force_fp32)
        emb = self.dec.embed(h['c_noise'], h['class_labels'])
        F_x = self.dec.mixed_decode(h['enc_x'], h['enc_skips'], h['ctrl_x'], h['ctrl_skips'], emb)
        D_x = h['c_skip'] * h['x'] + h['c_out'] * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(h['c_noise'])).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

@persistence.persistent_class
class ConditionalDiscriminator(_TwoEncoderNetwork):
    """logit(x, σ | y, σ_y) = out_conv(mean over pixels of mp_cat(ctrl features, enc features)).

    As published, its weights are normalised inside forward only, never in place: their raw norms grow
    during training, and the effective step size shrinks with them."""

    force_weight_normalization = False

    def __init__(self, *args, **kwargs):                # The arguments of _TwoEncoderNetwork.
        super().__init__(*args, **kwargs)
        features = [spec for spec in self.enc.enc.values()][-1].out_channels
        self.out_conv = MPConv(2 * features, 1, kernel=[])

    def _pretrained_parts(self):
        return [self.ctrl, self.enc]

    @normalizes_weights_by_group
    def forward(self, x, sigma, condition_x, condition_sigma, class_labels=None, force_fp32=False):
        h = self._encode_both(x, sigma, condition_x, condition_sigma, class_labels, force_fp32)
        features = mp_cat(h['ctrl_x'], h['enc_x']).to(torch.float32).mean(dim=(2, 3))  # [N, 2C]
        return self.out_conv(features)                                                    # [N, 1]

#----------------------------------------------------------------------------

DEFAULT_GAMMA = 0.414      # Noise inflation σ̂ = σ(1 + γ) of the generative denoiser (the paper's value).

def is_generative_denoiser(net):
    """A GenerativeDenoiser, ours or an unpickled released one (duck-typed: released pickles name their own class)."""
    return hasattr(net, 'gamma') and hasattr(net, 'model')

class GenerativeDenoiser(torch.nn.Module):
    """G(y, σ): a sample of p(x | y = x + σn), from one evaluation of a conditional network.

    Plain (non-persistent) module: released checkpoints pickle it by reference. Attributes added
    after the published ones need class-level defaults.
    """

    def __init__(self, model, gamma=DEFAULT_GAMMA, init_sigma=80.0):
        super().__init__()
        self.model = model
        self.gamma = gamma
        self.init_sigma = init_sigma
        self.img_resolution = model.img_resolution
        self.img_channels = model.img_channels
        self.label_dim = model.label_dim

    def denoise(self, y, sigma, labels=None, return_logvar=False, randn_like=torch.randn_like, force_fp32=False):
        """One evaluation: σ̂ = σ(1+γ), ŷ = y + z·sqrt(σ̂² − σ²), x = net(ŷ, σ̂ | y, σ)."""
        sigma = as_sigma(sigma, y).expand(y.shape[0], 1, 1, 1)
        sigma_hat = sigma * (1 + self.gamma)
        y_hat = y + randn_like(y) * (sigma_hat.square() - sigma.square()).sqrt()
        return self.model(y_hat, sigma_hat, condition_x=y, condition_sigma=sigma, class_labels=labels,
            force_fp32=force_fp32, return_logvar=return_logvar)

    def forward(self, y, sigma, labels=None, return_logvar=False, ts=None, randn_like=torch.randn_like, force_fp32=False):
        """Sample p(x | y, σ). With `ts` (grid indices ending at 39): len(ts) − 1 evaluations of
        G at (y_eff, σ_eff), each combining (y, σ) with a fresh noisy x_t at the grid's next level."""
        if ts is None:
            return self.denoise(y, sigma, labels, return_logvar, randn_like, force_fp32)
        grid = sampling_grid().tolist()
        ts = parse_ts(ts)
        x_t = randn_like(y) * grid[ts[0]]
        for step, (index, next_index) in enumerate(zip(ts[:-1], ts[1:])):
            y_eff, sigma_eff = combine_conditions(y, sigma, x_t, grid[index])
            x0 = self.denoise(y_eff, sigma_eff, labels, return_logvar, randn_like, force_fp32)
            if step < len(ts) - 2:
                x_t = (x0[0] if return_logvar else x0) + randn_like(y) * grid[next_index]
        return x0

    @torch.no_grad()
    def sample(self, noise, labels=None, ts=DEFAULT_TS, randn_like=torch.randn_like):
        """Generation from pure noise: y = init_sigma·noise at σ = init_sigma, then the --ts chain."""
        return self(noise * self.init_sigma, self.init_sigma, labels=labels, ts=ts, randn_like=randn_like)
