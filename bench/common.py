"""Shared set-up of the benchmarks: a random teacher of a preset's architecture, timing helpers."""

import collections
import contextlib
import os
import pickle
import platform
import re
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click
import torch
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

import dnnlib
from torch_utils import distributed as dist
from training import network_io
from training.loss import NCVSDLoss
from training.networks_edm2 import Precond, computes_natively
from training.networks_ncvsd import ConditionalPrecond, GenerativeDenoiser
from training.run_config import load_preset
from training.training_loop import NCVSDIteration

def bench_device(name):
    """torch.device(name); a click usage error (one line) where this machine has no such device."""
    try:
        return dist.choose_device(name)[0]
    except dnnlib.util.UserError as err:
        raise click.UsageError(str(err))

def bench_preset(preset):
    """The preset's config; a click usage error (one line) for a name that is unknown or lacks the teacher's architecture."""
    try:
        config = load_preset(preset)
    except dnnlib.util.UserError as err:
        raise click.UsageError(str(err))
    if not {'img_resolution', 'img_channels', 'label_dim'} <= set(config.get('network_arch', {})):
        raise click.UsageError(f'preset {preset} does not give the teacher\'s whole architecture (img_resolution, '
            'img_channels, label_dim): the benchmarks build a random teacher from one of bench-a, bench-b, bench-s64')
    return config

def random_teacher(preset, device, **arch_overrides):
    """An EDM2 Precond with the preset's network_arch (updated by arch_overrides) and non-zero gains (so every layer
    contributes), pickled and loaded back the way a training run gets its teacher (network_io.load_network, then
    frozen on the device)."""
    config = bench_preset(preset)
    arch = dict(config.network_arch, **arch_overrides)
    torch.manual_seed(0)
    net = Precond(img_resolution=arch.pop('img_resolution'), img_channels=arch.pop('img_channels'),
        label_dim=arch.pop('label_dim'), use_fp16=bool(config.get('fp16', False)), **arch)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if 'gain' in name:
                param.fill_(0.3)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'teacher.pkl')
        with open(path, 'wb') as f:
            pickle.dump(dnnlib.EasyDict(ema=net), f)
        teacher, _encoder = network_io.load_network(path, device, role='teacher', verbose=False)
    return network_io.prepare_frozen(teacher, device), config

def sampling_student(teacher, device):
    """The conditional network built from `teacher`, as a GenerativeDenoiser prepared as generate_images.py prepares a
    loaded network (frozen, marked constant)."""
    return network_io.prepare_frozen(GenerativeDenoiser(ConditionalPrecond(**teacher.init_kwargs).init_from_pretrained(teacher)), device)

def bench_iteration(G, S, D, teacher, config, optimizers, batch, device, compile_options=None):
    """The training loop's iteration with the preset's loss settings: one accumulation round of `batch` images."""
    return NCVSDIteration(G, S, D, teacher, NCVSDLoss(P_mean=config.P_mean, P_std=config.P_std), optimizers, config.gamma,
        num_rounds=1, batch_gpu_total=batch, g_lr_scaling=config.g_lr_scaling, d_lr_scaling=config.d_lr_scaling,
        rng=torch.Generator(device).manual_seed(0), compile_options=compile_options)

# Vendor datasheet figures, dense tensor-core FP16/BF16 (no sparsity), TFLOP/s; matched against the device name.
DENSE_FP16_TFLOPS = {'H200': 989.4, 'H100 PCIe': 756.0, 'H100': 989.4, 'A100': 312.0, 'L40S': 362.1, 'A10G': 125.0}

def peak_tflops(device, given=None):
    """The device's dense FP16 peak (TFLOP/s): `given`, else the table for CUDA devices, else None (unknown)."""
    if given:
        return given
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        return next((rate for key, rate in DENSE_FP16_TFLOPS.items() if key in name), None)
    return None

def count_flops(fn):
    """FLOPs of running fn() once (a multiply-add counts 2), forward and backward, by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

def flops_report(flops, seconds, peak):
    """'N TFLOP/s (x% of the dense FP16 peak)' for `flops` done in `seconds`."""
    rate = flops / seconds / 1e12
    return f'{rate:.2f} TFLOP/s' + (f' ({100 * rate / peak:.1f}% of the {peak:g} TFLOP/s dense FP16 peak)' if peak else ' (peak unknown: pass --peak-tflops)')

def device_name(device):
    """The device as the benchmarks print it: a GPU's name and CUDA version; a CPU's model, the vector instructions
    torch uses and whether it has bfloat16 units (the CPU figures of bench/README.md came from several machines)."""
    if device.type == 'cuda':
        return f'{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})'
    if device.type == 'cpu':
        bfloat16 = 'native' if computes_natively('bf16', device) else 'emulated'
        return f'cpu ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, bfloat16 {bfloat16})'
    return str(device)

def cpu_model():
    """The CPU's model name as the system gives it (Linux: /proc/cpuinfo), else platform's, else 'unknown model'."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            return next(line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown model'

def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

# Kinds of device work, matched in order against kernel (CUDA) or operator (CPU) names: cuDNN names its convolution
# kernels fprop / dgrad / wgrad, inductor its fused kernels triton_* on CUDA (on the CPU they run inside its
# 'Call CompiledFxGraph' regions); the rest is elementwise operations, reductions and copies.
WORK_KINDS = (('convolution', r'conv|fprop|dgrad|wgrad'), ('attention', r'attention|flash|fmha|sdpa'),
    ('matmul', r'gemm|matmul|\bmm\b|addmm|bmm|cublas|nvjet'), ('fused by inductor', r'triton_|CompiledFxGraph'))

def work_kind(name):
    return next((kind for kind, pattern in WORK_KINDS if re.search(pattern, name)), 'elementwise and other')

def print_profile(label, fn, device, top, step_ms=None):
    """Run fn once under torch.profiler and print profile_lines() of it."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        synchronize(device)
    print(f'[{label}] profiled once: ' + '\n'.join(profile_lines(profile.key_averages(), device.type, top, step_ms)))

def profile_lines(events, device_type, top, step_ms=None):
    """The busy time of the profiled device (CUDA: its kernels', also as a share of `step_ms`, the profiled call's
    time unprofiled; the CPU: its operators' own time), split by kind of work, and its `top` kernels (CUDA: then the
    `top` operators that launched the most kernel time)."""
    if device_type == 'cuda':       # An operator's device time is that of the kernels it launched: count kernels once.
        own_time = lambda event: event.self_device_time_total
        work = [event for event in events if event.device_type != DeviceType.CPU and not event.is_user_annotation]
        launchers = [event for event in events if event.device_type == DeviceType.CPU]
    else:
        own_time = lambda event: event.self_cpu_time_total
        work, launchers = list(events), []
    total = sum(map(own_time, work))
    # Kernels run apart from the host, whose profiling overhead does not lengthen them; operators on the CPU it does.
    busy = f', {100 * total / 1000 / step_ms:.0f}% of the {step_ms:.1f} ms it takes unprofiled' if step_ms and launchers else ''
    kinds = collections.Counter()
    for event in work:
        kinds[work_kind(event.key)] += own_time(event)
    lines = [f'{total / 1000:.1f} ms of {device_type} time{busy}',
        '    by kind: ' + ', '.join(f'{kind} {time / 1000:.1f} ms ({100 * time / max(total, 1):.0f}%)' for kind, time in kinds.most_common())]
    for title, listed in (('kernels' if launchers else 'operators', work), ('operators launching them', launchers)):
        if listed:
            lines.append(f'    the {top} largest {title}:')
            lines += [f'    {own_time(event) / 1000:8.1f} ms {100 * own_time(event) / max(total, 1):5.1f}%  {event.count:6d} calls  {event.key[:110]}'
                for event in sorted(listed, key=own_time, reverse=True)[:top]]
    return lines

class PhaseTimer:
    """Collects wall-clock milliseconds per named phase."""

    def __init__(self, device):
        self.device = device
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, name):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.times.setdefault(name, []).append((time.perf_counter() - start) * 1000)

    def median(self, name):
        return statistics.median(self.times[name])

def reset_peak_memory(device):
    """Start a new peak-memory measurement where the device allows it (CUDA); returns whether it did."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    return device.type == 'cuda'

def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB -> MiB
