"""Tensor helpers used by the networks, the training loop and EDM2's embedded sources."""

import numpy as np
import torch

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A cached constant tensor, so that e.g. resampling filters are not rebuilt at every call."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else torch.device(device)
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """constant() with dtype and device taken from `ref` unless given."""
    dtype = ref.dtype if dtype is None else dtype
    device = ref.device if device is None else device
    return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless shuffled index stream, split across ranks; `start_idx` resumes mid-stream."""

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start_idx=0):
        assert len(dataset) > 0 and num_replicas > 0 and 0 <= rank < num_replicas
        super().__init__()
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx

    def __iter__(self):
        idx = self.start_idx
        epoch = None
        while True:
            if epoch != idx // self.dataset_size:
                epoch = idx // self.dataset_size
                order = np.arange(self.dataset_size)
                if self.shuffle:
                    np.random.RandomState(hash((self.seed, epoch)) % (1 << 31)).shuffle(order)
            if idx % self.num_replicas == self.rank:
                yield int(order[idx % self.dataset_size])
            idx += 1

def draw_device(generator, device):
    """Where a draw from `generator` happens: torch requires the generator's own device."""
    return generator.device if generator is not None else torch.device(device)

def randn_like_from(generator=None):
    """A randn_like(x) that draws from `generator` (torch.randn_like when None)."""
    if generator is None:
        return torch.randn_like
    return lambda x: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

def params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())

def tile_images(x, w, h):
    """[N, C, H, W] -> one [C, h*H, w*W] grid, row-major."""
    assert x.ndim == 4
    N, C, H, W = x.shape
    assert N == w * h
    return x.reshape(h, w, C, H, W).permute(2, 0, 3, 1, 4).reshape(C, h * H, w * W)
