"""The training iteration never makes the host wait for the device (no .item() outside the status lines), and makes
every tensor on the device of its data."""

import itertools
import traceback
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import DEVICES
from torch_utils import training_stats
from test_speed import teacher_and_students
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder
from training.loss import NCVSDLoss
from training.phema import PowerFunctionEMA
from training.speed import use_device_defaults
from training.networks_ncvsd import GenerativeDenoiser
from training.sampling import edm_heun_sampler
from training.training_loop import NCVSDIteration, infinite_batches, phase_networks

TENSOR = torch.Tensor
VALUE_READS = {TENSOR.item, TENSOR.__bool__, TENSOR.__float__, TENSOR.__int__, TENSOR.__index__, TENSOR.tolist,
    TENSOR.numpy, TENSOR.cpu, TENSOR.nonzero, torch.nonzero}
FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.linspace, torch.eye, torch.randn,
    torch.rand, torch.randint}

class HostSyncs(TorchFunctionMode):
    """Records the calls that make the host wait on CUDA, whatever the device: values read back to Python, and
    tensors made from host data or without a device (copied to the device afterwards)."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from_host = func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor)
        if func in VALUE_READS or from_host or (func in FACTORIES and kwargs.get('device') is None):
            caller = traceback.extract_stack(limit=2)[0]
            self.sites.append(f'{func.__name__} at {caller.filename}:{caller.lineno}')
        return func(*args, **kwargs)

@pytest.mark.parametrize('defaults', ['cpu', 'cuda'])
@pytest.mark.parametrize('device', DEVICES)
def test_an_iteration_never_waits_for_the_device(device, defaults, speed_options):
    """After a warm-up, one iteration (data copied to the device, three phases with their losses reported and fused
    Adam steps, the EMA update) reads nothing back and copies nothing from the host but its pinned batches, under
    either device's speed options (CUDA's group the weight normalisation: checked here on the CPU too). On CUDA
    torch's sync debug mode sees every synchronising call as well."""
    device = torch.device(device)
    use_device_defaults(torch.device(defaults))                 # A device object needs no GPU.
    teacher, nets = teacher_and_students()
    teacher, (G, S, D) = teacher.to(device), [net.to(device) for net in nets]
    optimizers = {phase: torch.optim.Adam(net.parameters(), lr=0, fused=True) for phase, net in phase_networks(G, S, D).items()}
    step = NCVSDIteration(G, S, D, teacher, NCVSDLoss(), optimizers, 0.414, num_rounds=2, batch_gpu_total=8,
        rng=torch.Generator(device).manual_seed(0))
    ema = PowerFunctionEMA(G)
    gen = torch.Generator().manual_seed(1)
    pixels = [torch.randint(256, [4, 3, 16, 16], generator=gen, dtype=torch.uint8) for _ in range(6)]
    labels = [torch.eye(10)[torch.randint(10, [4], generator=gen)] for _ in range(6)]
    if device.type == 'cuda':
        pixels, labels = [x.pin_memory() for x in pixels], [x.pin_memory() for x in labels]
    batches = infinite_batches(itertools.cycle(list(zip(pixels, labels))), StandardRGBEncoder(), device)

    def iteration(cur_nimg):
        step.run(batches, lr=1e-3)
        ema.update(cur_nimg=cur_nimg, batch_size=8)

    iteration(8)
    syncs = HostSyncs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if device.type == 'cuda':
            torch.cuda.set_sync_debug_mode('warn')
        try:
            with syncs:
                iteration(16)
        finally:
            if device.type == 'cuda':
                torch.cuda.set_sync_debug_mode('default')
    synchronizing = [str(warning.message) for warning in caught if 'synchroniz' in str(warning.message)
        and 'prototype feature' not in str(warning.message)]      # torch 2.11 notes once that the mode is a prototype.
    assert not syncs.sites, sorted(set(syncs.sites))
    assert not synchronizing, synchronizing

@pytest.mark.parametrize('device', DEVICES)
def test_vae_latents_are_scaled_without_host_copies(device):
    """A latent dataset's batches are scaled by per-channel constants made on the device once, not at every batch."""
    encoder = StabilityVAEEncoder()
    moments = torch.rand([2, 8, 4, 4], device=device)
    expected = encoder.encode_latents(moments)
    syncs = HostSyncs()
    with syncs:
        again = encoder.encode_latents(moments)
    assert not syncs.sites, syncs.sites
    assert again.shape == expected.shape == (2, 4, 4, 4) and again.device == moments.device

class DeviceMixes(TorchDispatchMode):
    """Records the operations (but copies) given tensors on two devices, as CUDA refuses them: a CPU tensor beside
    CUDA ones is an error there unless it holds a single number (0-dim)."""

    COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if func not in self.COPIES and len({t.device for t in tensors if t.ndim > 0 or t.device.type != 'cpu'}) > 1:
            self.sites.append(f'{func.__name__} of {sorted(str(t.device) for t in tensors)} at {traceback.format_stack(limit=4)[0].strip()}')
        return func(*args, **kwargs)

@pytest.mark.parametrize('defaults', ['cpu', 'cuda'])
def test_every_tensor_is_made_on_the_data_device(defaults, speed_options, monkeypatch):
    """Two iterations (the second reusing cached and grouped weights) and the samplers, run on the meta device (no
    kernel runs): no operation meets a tensor left on the CPU (made without a device, or kept from construction
    outside the modules' buffers) beside the data, which CUDA would refuse; the CPU suite's check of what breaks on
    a GPU, under either device's speed options."""
    meta = torch.device('meta')
    use_device_defaults(torch.device(defaults))
    monkeypatch.setattr(training_stats, '_pending', {})           # The losses reported on meta stay in this test.
    teacher, nets = teacher_and_students()
    teacher, (G, S, D) = teacher.to(meta), [net.to(meta) for net in nets]
    optimizers = {phase: torch.optim.Adam(net.parameters(), lr=0, foreach=True) for phase, net in phase_networks(G, S, D).items()}
    step = NCVSDIteration(G, S, D, teacher, NCVSDLoss(), optimizers, 0.414, num_rounds=2, batch_gpu_total=8)
    noise, labels = torch.randn(4, 3, 16, 16, device=meta), torch.eye(10, device=meta)[:4]
    student = GenerativeDenoiser(G)
    mixes = DeviceMixes()
    with mixes:
        for _ in range(2):
            step.run(itertools.repeat((noise, labels)), lr=1e-3)
        G.eval().requires_grad_(False)
        with torch.no_grad():
            samples = [edm_heun_sampler(teacher, noise, labels, num_steps=3), student.sample(noise, labels, ts=[0, 10, 20, 30, 39])]
    assert not mixes.sites, sorted(set(mixes.sites))
    assert all(tensor.device == meta for tensor in [*samples, *G.parameters(), *S.parameters(), *D.parameters()])
