"""Image-quality metrics of reconstructions: PSNR, SSIM (Gaussian window 11, σ 1.5) and LPIPS (VGG-16)."""

import os

import torch

import dnnlib
from dnnlib.util import UserError

def to_unit(x):
    """[−1, 1] -> [0, 1], clipped."""
    return ((x.to(torch.float64) + 1) / 2).clamp(0, 1)

def psnr(x, ref, data_range=1.0):
    """Per image, in dB, for images in [0, data_range]."""
    mse = (x.to(torch.float64) - ref.to(torch.float64)).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range ** 2 / mse)

def _gaussian_window(size=11, sigma=1.5, dtype=torch.float64, device='cpu'):
    ax = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    return g / g.sum()

def ssim(x, ref, data_range=1.0, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """Mean SSIM per image (Wang et al. 2004): Gaussian-weighted local statistics, valid region, channel mean."""
    x, ref = x.to(torch.float64), ref.to(torch.float64)
    channels = x.shape[1]
    g = _gaussian_window(window, sigma, device=x.device)
    def blur(img):
        img = torch.nn.functional.conv2d(img, g.reshape(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
        return torch.nn.functional.conv2d(img, g.reshape(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(ref * ref) - mu_y ** 2
    cov = blur(x * ref) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)

#----------------------------------------------------------------------------
# LPIPS, VGG-16 variant with average pooling (as piq's LPIPS, the one behind the published numbers).

VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
LPIPS_URL = 'https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/lpips_weights.pt'
VGG16_LAYERS = [64, 64, 'P', 128, 128, 'P', 256, 256, 256, 'P', 512, 512, 512, 'P', 512, 512, 512]
TAP_AFTER = {3, 8, 15, 22, 29}                    # torchvision indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

class LPIPS(torch.nn.Module):
    """Channel-normalised VGG-16 feature differences weighted by the LPIPS linear heads."""
    variant = 'lpips-vgg16-avgpool (piq convention: ImageNet normalisation, average pooling)'

    def __init__(self, vgg_path=None, heads_path=None):
        super().__init__()
        layers, in_ch = [], 3
        for item in VGG16_LAYERS:
            if item == 'P':
                layers.append(torch.nn.AvgPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(in_ch, item, 3, padding=1), torch.nn.ReLU()]
                in_ch = item
        self.features = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(1, c, 1, 1)) for c in (64, 128, 256, 512, 512)])
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))
        if vgg_path is not None or heads_path is not None:
            self.load_weights(vgg_path, heads_path)
        self.eval().requires_grad_(False)

    def load_weights(self, vgg_path=None, heads_path=None):
        vgg_path = vgg_path or os.environ.get('NCVSD_VGG16', VGG16_URL)
        heads_path = heads_path or os.environ.get('NCVSD_LPIPS', LPIPS_URL)
        vgg = _load_tensors(vgg_path, '--lpips-vgg', 'NCVSD_VGG16')
        self.features.load_state_dict({k[len('features.'):]: v for k, v in vgg.items() if k.startswith('features.')})
        heads = _load_tensors(heads_path, '--lpips-heads', 'NCVSD_LPIPS')
        values = list(heads.values()) if isinstance(heads, dict) else list(heads)
        if len(values) != 5:
            raise UserError(f'{heads_path} does not hold the 5 LPIPS linear heads')
        for param, value in zip(self.heads, values):
            param.data.copy_(value.reshape(param.shape))

    def forward(self, x, ref):
        """Per-image distance for images in [0, 1]."""
        total = 0
        a, b = (x.to(torch.float32) - self.mean) / self.std, (ref.to(torch.float32) - self.mean) / self.std
        head = 0
        for idx, layer in enumerate(self.features):
            a, b = layer(a), layer(b)
            if idx in TAP_AFTER:
                na = a / (a.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
                nb = b / (b.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
                total = total + ((na - nb).square() * self.heads[head]).sum(dim=1).mean(dim=(1, 2))
                head += 1
        return total

def _load_tensors(path_or_url, option, env):
    try:
        with dnnlib.util.open_url(path_or_url, verbose=False) as f:
            return torch.load(f, map_location='cpu', weights_only=True)
    except UserError as err:
        raise UserError(f'LPIPS weights unavailable ({err}); pass {option}=PATH or set {env} to a local copy')
