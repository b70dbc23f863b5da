"""Forward models y = A(x) + σ_y·n of the inverse problems, with exact likelihood steps.

Every linear operator has forward, transpose (its adjoint) and likelihood_step(x, y, sigma_y, rho),
an exact draw of p(u) ∝ exp(−‖A u − y‖²/(2σ_y²) − ‖u − x‖²/(2ρ²)). Images are [N, C, H, W] in [−1, 1].
"""

import math

import numpy as np
import PIL.Image
import torch

from dnnlib.util import UserError
from torch_utils.misc import randn_like_from

def _randn_like(x, generator):
    return randn_like_from(generator)(x)

class Operator:
    name = 'operator'
    linear = False
    lipschitz = 1.0

    def __init__(self, img_size=256, channels=3):
        self.img_size = img_size
        self.channels = channels

    def check_image(self, x):
        if x.shape[1:] != (self.channels, self.img_size, self.img_size):
            raise UserError(f'{self.name} is set up for {self.channels}x{self.img_size}x{self.img_size} images, '
                f'got {x.shape[1]}x{x.shape[2]}x{x.shape[3]}; pass img_size/channels that match the data and the network')

    def forward(self, x):
        raise NotImplementedError

    def measure(self, x, sigma_y, generator=None):
        """A(x) + σ_y·n."""
        self.check_image(x)
        y = self.forward(x)
        return y + sigma_y * _randn_like(y, generator)

    def likelihood_step(self, x, y, sigma_y, rho, generator=None):
        """Unadjusted Langevin (ULA) for non-linear operators; see ULA below."""
        return ula_likelihood_step(self, x, y, sigma_y, rho, generator=generator)

    def to_image(self, y):
        """A picture of the measurement for grids: [N, C, H, W] in [−1, 1], the images' own size."""
        return y

class LinearOperator(Operator):
    linear = True

    def transpose(self, y):
        raise NotImplementedError

    def matrix(self):
        """Dense [M, D] matrix (tests and small exact posteriors), built from forward on the basis."""
        dim = self.channels * self.img_size ** 2
        basis = torch.eye(dim, dtype=torch.float64).reshape(dim, self.channels, self.img_size, self.img_size)
        return self.forward(basis).reshape(dim, -1).T

#----------------------------------------------------------------------------
# Inpainting: elementwise.

class Inpainting(LinearOperator):
    """A u = m ⊙ u with a {0, 1} mask m (1: observed); [1 or C, H, W]."""
    name = 'inpainting'

    def __init__(self, mask, img_size=256, channels=3):
        super().__init__(img_size, channels)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        mask = mask.reshape(1, *mask.shape[-2:]) if mask.ndim == 2 else mask
        if mask.shape[-2:] != (img_size, img_size):
            raise UserError(f'the mask is {mask.shape[-1]}x{mask.shape[-2]} but img_size={img_size}; use a mask of the image size')
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.device, x.dtype)

    def transpose(self, y):
        return y * self.mask.to(y.device, y.dtype)

    def likelihood_step(self, x, y, sigma_y, rho, generator=None):
        mask = self.mask.to(x.device, x.dtype)
        precision = mask / sigma_y ** 2 + 1 / rho ** 2
        mean = (mask * y / sigma_y ** 2 + x / rho ** 2) / precision
        return mean + _randn_like(x, generator) / precision.sqrt()

    def to_image(self, y):
        return self.forward(y)                      # hidden pixels shown as 0 (grey)

class BoxInpainting(Inpainting):
    """A centred box of half the image side is hidden (128×128 on 256×256)."""
    name = 'box_inpainting'

    def __init__(self, img_size=256, channels=3, box_size=None):
        box = box_size or img_size // 2
        mask = torch.ones(1, img_size, img_size)
        start = (img_size - box) // 2
        mask[:, start:start + box, start:start + box] = 0
        super().__init__(mask, img_size, channels)

class MaskFileInpainting(Inpainting):
    """Mask from an image file: bright pixels are observed."""
    name = 'inpainting'

    def __init__(self, mask_path, img_size=256, channels=3):
        try:
            image = PIL.Image.open(mask_path).convert('L')
        except (OSError, FileNotFoundError):
            raise UserError(f'cannot read the mask {mask_path}; generate masks with python -m inverse.masks')
        if image.size != (img_size, img_size):
            image = image.resize((img_size, img_size), PIL.Image.NEAREST)
        super().__init__(torch.as_tensor(np.array(image) > 127, dtype=torch.float32), img_size, channels)

#----------------------------------------------------------------------------
# Circular deblurring: diagonal in the Fourier basis.

def gaussian_kernel(size=61, std=3.0):
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-0.5 * (ax[:, None] ** 2 + ax[None, :] ** 2) / std ** 2)
    return (k / k.sum()).float()

def motion_kernel(size=61, intensity=0.5, seed=0):
    """A random camera-shake trajectory (seeded) drawn into a size×size kernel.

    intensity in [0, 1] sets how much the direction wanders and how long the path is."""
    rng = np.random.default_rng(seed)
    steps = 2000
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.exp(1j * angle)
    position = 0j
    path = [position]
    for _ in range(steps):
        direction *= np.exp(1j * rng.normal(0, 0.05 + 0.4 * intensity))
        direction += 0.1 * intensity * (rng.normal() + 1j * rng.normal())
        direction /= abs(direction)
        position += direction * (size / 2) / steps * (0.5 + intensity)
        path.append(position)
    path = np.array(path) - np.mean(path)
    scale = (size / 2 - 2) / max(np.max(np.abs(path.real)), np.max(np.abs(path.imag)), 1e-6)
    path = path * min(scale, 1.0) + (size - 1) / 2
    kernel = np.zeros((size, size))
    for p in path:
        r, c = int(round(p.imag)), int(round(p.real))
        kernel[r, c] += 1
    return torch.as_tensor(kernel / kernel.sum(), dtype=torch.float32)

class CircularBlur(LinearOperator):
    """A u = k ⊛ u, circular convolution (per channel) with a kernel centred at the origin."""
    name = 'blur_circ'

    def __init__(self, kernel, img_size=256, channels=3):
        super().__init__(img_size, channels)
        kernel = torch.as_tensor(kernel, dtype=torch.float32)
        if kernel.shape[0] > img_size:
            raise UserError(f'the blur kernel ({kernel.shape[0]}) is larger than the image ({img_size}); give a task .json '
                f'(--preset=PATH, a copy of the preset) whose operator sets "kernel_size" to at most {img_size}')
        self.kernel = kernel
        padded = torch.zeros(img_size, img_size, dtype=torch.float64)
        size = kernel.shape[0]
        padded[:size, :size] = kernel.double()
        padded = torch.roll(padded, shifts=(-(size // 2), -(size // 2)), dims=(0, 1))
        self.kernel_fft = torch.fft.fft2(padded)                                  # [H, W] complex128

    def _apply(self, x, spectrum):
        out = torch.fft.ifft2(torch.fft.fft2(x.to(torch.float64)) * spectrum.to(x.device)).real
        return out.to(x.dtype)

    def forward(self, x):
        return self._apply(x, self.kernel_fft)

    def transpose(self, y):
        return self._apply(y, self.kernel_fft.conj())

    def likelihood_step(self, x, y, sigma_y, rho, generator=None):
        K = self.kernel_fft.to(x.device)
        precision = K.abs() ** 2 / sigma_y ** 2 + 1 / rho ** 2                     # [H, W], real
        numerator = torch.fft.fft2(y.to(torch.float64)) * K.conj() / sigma_y ** 2 + torch.fft.fft2(x.to(torch.float64)) / rho ** 2
        mean = torch.fft.ifft2(numerator / precision).real
        noise = torch.fft.ifft2(torch.fft.fft2(_randn_like(x, generator).to(torch.float64), norm='ortho') / precision.sqrt(), norm='ortho').real
        return (mean + noise).to(x.dtype)

class GaussianBlurCirc(CircularBlur):
    name = 'gaussian_deblur_circ'

    def __init__(self, img_size=256, channels=3, kernel_size=61, intensity=3.0):
        super().__init__(gaussian_kernel(kernel_size, intensity), img_size, channels)

class MotionBlurCirc(CircularBlur):
    name = 'motion_deblur_circ'

    def __init__(self, img_size=256, channels=3, kernel_size=61, intensity=0.5, seed=0):
        super().__init__(motion_kernel(kernel_size, intensity, seed), img_size, channels)

#----------------------------------------------------------------------------
# Super-resolution: a separable linear downsampler, exact through the SVD of its 1-D factors.

def downsampling_matrix(size, factor):
    """[size/factor, size] matrix of antialiased bicubic downsampling (torch's interpolate on the basis)."""
    basis = torch.eye(size, dtype=torch.float64).reshape(size, 1, 1, size)
    rows = torch.nn.functional.interpolate(basis, size=(1, size // factor), mode='bicubic', antialias=True, align_corners=False)
    return rows.reshape(size, size // factor).T.contiguous()

class SuperResolution(LinearOperator):
    """A u = D u Dᵀ per channel, D the 1-D antialiased bicubic ×1/factor downsampler."""
    name = 'super_resolution'

    def __init__(self, img_size=256, channels=3, scale_factor=4):
        super().__init__(img_size, channels)
        if img_size % scale_factor:
            raise UserError(f'img_size={img_size} is not divisible by the scale factor {scale_factor}')
        self.scale_factor = scale_factor
        self.D = downsampling_matrix(img_size, scale_factor)                       # [n/f, n] float64
        U, S, Vh = torch.linalg.svd(self.D, full_matrices=True)
        self.U, self.V = U, Vh.T                                                   # [m, m], [n, n]
        self.singular = torch.zeros(img_size, dtype=torch.float64)
        self.singular[:S.shape[0]] = S                                             # [n], zero beyond the rank

    def forward(self, x):
        D = self.D.to(x.device)
        return (D @ x.to(torch.float64) @ D.T).to(x.dtype)

    def transpose(self, y):
        D = self.D.to(y.device)
        return (D.T @ y.to(torch.float64) @ D).to(y.dtype)

    def likelihood_step(self, x, y, sigma_y, rho, generator=None):
        V, s = self.V.to(x.device), self.singular.to(x.device)
        precision = (s[:, None] * s[None, :]) ** 2 / sigma_y ** 2 + 1 / rho ** 2       # [n, n] in the V ⊗ V basis
        rhs = self.transpose(y).to(torch.float64) / sigma_y ** 2 + x.to(torch.float64) / rho ** 2
        rotated = V.T @ rhs @ V
        sample = rotated / precision + _randn_like(x, generator).to(torch.float64) / precision.sqrt()
        return (V @ sample @ V.T).to(x.dtype)

    def to_image(self, y):
        return torch.nn.functional.interpolate(y, scale_factor=self.scale_factor, mode='nearest')

#----------------------------------------------------------------------------
# Phase retrieval: non-linear, Langevin likelihood steps.

class PhaseRetrieval(Operator):
    """|F(pad((x + 1)/2))|: Fourier amplitude of the zero-padded image mapped to [0, 1] (oversampling 4)."""
    name = 'phase_retrieval'
    lipschitz = 0.5

    def __init__(self, img_size=256, channels=3, oversample=4.0):
        super().__init__(img_size, channels)
        self.pad = int(oversample / 8.0 * img_size)

    def forward(self, x):
        padded = torch.nn.functional.pad((x + 1) / 2, [self.pad] * 4)
        return torch.fft.fftshift(torch.fft.fft2(padded, norm='ortho'), dim=(-2, -1)).abs()

    def to_image(self, y):
        """The log-amplitude spectrum, area-downsampled from the padded size to the image size."""
        amplitude = torch.log1p(y)
        amplitude = torch.nn.functional.adaptive_avg_pool2d(amplitude, self.img_size)
        return amplitude / amplitude.flatten(1).amax(dim=1).reshape(-1, 1, 1, 1) * 2 - 1

def ula_likelihood_step(operator, x, y, sigma_y, rho, steps=100, step_scale=0.5, generator=None):
    """Unadjusted Langevin on log p(u) = −‖A(u) − y‖²/(2σ_y²) − ‖u − x‖²/(2ρ²), started at x."""
    step = step_scale / (1 / rho ** 2 + operator.lipschitz ** 2 / sigma_y ** 2)
    u = x.detach().clone()
    for _ in range(steps):
        with torch.enable_grad():
            u.requires_grad_(True)
            log_p = -(operator.forward(u) - y).square().sum() / (2 * sigma_y ** 2) - (u - x).square().sum() / (2 * rho ** 2)
            grad, = torch.autograd.grad(log_p, u)
        u = (u.detach() + step * grad + math.sqrt(2 * step) * _randn_like(u, generator))
    return u.detach()

#----------------------------------------------------------------------------

OPERATORS = {cls.name: cls for cls in (BoxInpainting, MaskFileInpainting, GaussianBlurCirc, MotionBlurCirc, SuperResolution, PhaseRetrieval)}

def get_operator(name, img_size=256, channels=3, **kwargs):
    if name not in OPERATORS:
        raise UserError(f'unknown task "{name}"; choose one of {", ".join(sorted(OPERATORS))}')
    try:
        return OPERATORS[name](img_size=img_size, channels=channels, **kwargs)
    except TypeError as err:
        raise UserError(f'bad parameters for {name}: {err}')
