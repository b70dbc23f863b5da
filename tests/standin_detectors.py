"""A small stand-in detector for the metric tests (no weights to download)."""

import torch

class PoolingDetector:
    """Fixed random projection of 4×4 average-pooled pixels: a deterministic feature map."""
    name = 'pooling-standin'
    feature_dim = 8

    def __init__(self, path_or_url=None):
        self.projection = torch.randn(3 * 16, self.feature_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def __call__(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float64) / 255, 4).flatten(1)
        return torch.tanh(pooled @ self.projection.to(images.device))

class OutOfMemoryDetector(PoolingDetector):
    """The pooling stand-in running out of device memory on its first batch, as a detector too big for the GPU at
    --batch would (its name is the pooling stand-in's, so that the reference's statistics match it)."""

    def __call__(self, images):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

class OtherDetector(PoolingDetector):
    """Another detector, which must never score an image against the pooling stand-in's reference."""
    name = 'other-standin'

    def __call__(self, images):
        raise AssertionError('other-standin scored images')
