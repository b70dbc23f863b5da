"""Small artifacts built inside the tests: a random EDM2 teacher pickle and a labelled image dataset."""

import json
import pickle

import numpy as np
import PIL.Image
import torch

import dnnlib
from training.dataset_io import convert_dataset
from training.networks_edm2 import Precond

TINY_NET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16, logvar_channels=8)

def make_teacher(path, resolution=16, channels=3, label_dim=4, seed=0):
    """A random EDM2 Precond with non-zero gains, pickled like EDM2 (float16, key 'ema')."""
    torch.manual_seed(seed)
    net = Precond(img_resolution=resolution, img_channels=channels, label_dim=label_dim, **TINY_NET)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if 'gain' in name:
                param.fill_(0.3)
    with open(path, 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=net.half(), loss_fn=None), f)
    return path

def make_dataset(folder, dest, num=12, resolution=16, num_classes=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num):
        PIL.Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    (folder / 'dataset.json').write_text(json.dumps({'labels': [[f'{i}.png', i % num_classes] for i in range(num)]}))
    convert_dataset(str(folder), str(dest))
    return dest

def assert_same_weights(a, b, device, what):
    """Bit-identical on the CPU. On CUDA, whose kernels need not be deterministic, all but 1% of the weights within
    float tolerance: Adam's first steps move a weight by about lr whatever its gradient's size, so a gradient near
    zero that rounds to the other sign moves it the other way (seen on an H200); a broken resume or replay moves most weights."""
    if device == 'cpu':
        assert all(torch.equal(a[name], b[name]) for name in a), what
        return
    close = torch.cat([torch.isclose(a[name], b[name], rtol=1e-3, atol=1e-4).flatten() for name in a])
    assert close.float().mean() >= 0.99, (what, f'{(~close).sum()} of {close.numel()} weights differ')
