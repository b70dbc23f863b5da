"""Tensor helpers used by the networks, the training loop and EDM2's embedded sources (misc.const_like), and PNG output."""

import contextlib
import io

import numpy as np
import PIL.Image
import torch

from dnnlib.util import UserError, atomic_file

_constants = {}         # (value bytes, dtype, shape, ...) -> tensor

@contextlib.contextmanager
def memory_advice(device, setting, advice):
    """Running out of device memory inside the block becomes a UserError naming the setting ('--batch=64') and what to
    do about it, instead of a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(f'{device} ran out of memory at {setting}; {advice}') from None

def refuse_nonfinite(values, what, advice):
    """A UserError where `values` hold NaN or Inf (one host sync), instead of writing them out as black images:
    `what` gave them, `advice` says what to try."""
    if not torch.isfinite(values).all():
        raise UserError(f'{what} gave non-finite values (NaN or Inf); {advice}')

def advance_progress(progress, images, world_size):
    """Count a batch of `images` on each of `world_size` ranks in rank 0's bar, at most up to its total: the ranks'
    shares differ by up to one batch, and rank 0's is the largest."""
    if progress is not None:
        progress.update(min(images * world_size, progress.total - progress.n))

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A tensor of `value` (broadcast to `shape`), built once per distinct request and then reused,
    so that e.g. resampling filters are not rebuilt at every call."""
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = torch.device(device if device is not None else 'cpu')
    if torch.compiler.is_compiling():              # A traced graph holds its constants: no cache to consult.
        made = torch.as_tensor(value, dtype=dtype, device=device)
        return made.expand(shape) if shape is not None else made
    array = np.asarray(value)
    memory_format = memory_format if memory_format is not None else torch.contiguous_format
    shape = None if shape is None else tuple(shape)
    key = (array.tobytes(), array.shape, array.dtype, shape, dtype, device, memory_format)
    if key not in _constants:
        made = torch.as_tensor(array.copy(), dtype=dtype, device=device)
        if shape is not None:
            made = made.expand(shape)
        _constants[key] = made.contiguous(memory_format=memory_format)
    return _constants[key]

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """constant() on the dtype and device of `ref`, unless given."""
    return constant(value, shape=shape, dtype=ref.dtype if dtype is None else dtype,
        device=ref.device if device is None else device, memory_format=memory_format)

class InfiniteSampler(torch.utils.data.Sampler):
    """An endless stream of dataset indices, reshuffled every epoch (seeded by (seed, epoch)); rank r of
    W takes every W-th position, and `start_idx` resumes the stream mid-way."""

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start_idx=0):
        assert len(dataset) > 0 and num_replicas > 0 and 0 <= rank < num_replicas
        super().__init__()
        self.size = len(dataset)
        self.rank, self.world = rank, num_replicas
        self.shuffle, self.seed, self.start_idx = shuffle, seed, start_idx

    def epoch_order(self, epoch):
        order = np.arange(self.size)
        if self.shuffle:
            np.random.RandomState(hash((self.seed, epoch)) % (1 << 31)).shuffle(order)
        return order

    def __iter__(self):
        position = self.start_idx - (self.start_idx - self.rank) % self.world   # Last position of ours at or before start.
        position += self.world if position < self.start_idx else 0
        epoch, order = None, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.epoch_order(epoch)
            yield int(order[position % self.size])
            position += self.world

def draw_device(generator, device):
    """Where a draw from `generator` happens: torch requires the generator's own device."""
    return generator.device if generator is not None else torch.device(device)

def randn_like_from(generator=None):
    """A randn_like(x) that draws from `generator` (torch.randn_like when None)."""
    if generator is None:
        return torch.randn_like
    return lambda x: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

def encode_png(array, **options):
    """uint8 [H, W, C] array (C = 1, 3 or 4: a 4th channel is dropped) -> the bytes of a PNG file (PIL's `options`)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3]).save(buffer, format='png', **options)
    return buffer.getvalue()

def save_png(image, path):
    """uint8 [C, H, W] tensor -> a PNG file at `path`, written atomically: a killed run leaves no torn image, a full
    disk is a one-line error."""
    with atomic_file(path) as f:
        f.write(encode_png(image.permute(1, 2, 0).cpu().numpy()))

def tile_images(x, w, h):
    """[N, C, H, W] -> one [C, h*H, w*W] grid, row-major."""
    count, channels, height, width = x.shape
    assert count == w * h
    return x.reshape(h, w, channels, height, width).permute(2, 0, 3, 1, 4).reshape(channels, h * height, width * w)

def kept_for_backward_mib(fn, *args):
    """Run fn(*args) and return the MiB of the storages autograd keeps for its backward pass (each storage once)."""
    storages = {}
    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor.detach()          # Not the tensor itself: a saved output would hold its own node (a leak).
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        fn(*args)
    return sum(storages.values()) / 2**20
