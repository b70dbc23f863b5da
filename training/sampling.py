"""Sampling utilities shared by training snapshots, generate_images.py and the metrics."""

import numpy as np
import PIL.Image
import torch

from torch_utils import misc

class StackedRandomGenerator:
    """One torch.Generator per seed, so that an image depends on its seed only (not on batching)."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

def random_labels(rnd, label_dim, batch_size, device, class_idx=None):
    """One-hot [N, label_dim] labels (a fixed class, or random per seed); None for unconditional nets."""
    if label_dim == 0:
        return None
    labels = torch.zeros([batch_size, label_dim], device=device)
    if class_idx is None:
        idx = rnd.randint(label_dim, size=[batch_size], device=device)
    else:
        idx = torch.full([batch_size], class_idx, device=device)
    labels[torch.arange(batch_size, device=device), idx.flatten()] = 1
    return labels

@torch.no_grad()
def generate_student(net, noise, labels, ts, randn_like):
    """NCVSD generation: y = init_sigma·noise at σ = init_sigma, then the --ts chain."""
    return net(noise * net.init_sigma, net.init_sigma, labels=labels, ts=ts, randn_like=randn_like)

def save_image_grid(images, path, grid_w=None):
    """uint8 [N, C, H, W] -> one PNG grid."""
    images = torch.as_tensor(images)
    n = images.shape[0]
    grid_w = grid_w or int(np.ceil(np.sqrt(n)))
    grid_h = int(np.ceil(n / grid_w))
    pad = grid_w * grid_h - n
    if pad:
        images = torch.cat([images, torch.zeros([pad, *images.shape[1:]], dtype=images.dtype)])
    grid = misc.tile_images(images.cpu(), grid_w, grid_h).permute(1, 2, 0).numpy()
    PIL.Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid[:, :, :3]).save(path)
