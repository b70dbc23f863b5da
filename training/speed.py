"""Switches for the speed options, which change how the networks and losses compute, not what, and the one way
the networks are compiled.

Used by the before/after equivalence test and by bench/train_step.py to measure each option."""

import torch
import torch._functorch.config          # Not loaded by `import torch`: generate_images.py --compile failed on it.

from training import gradients, networks_edm2
from training.loss import NCVSDLoss

OPTIONS = dict(
    cache_frozen_weights=(networks_edm2, 'CACHE_FROZEN_WEIGHTS'),
    cache_constant_weights=(networks_edm2, 'CACHE_CONSTANT_WEIGHTS'),
    fused_attention=(networks_edm2, 'FUSED_ATTENTION'),
    fast_pixel_norm=(networks_edm2, 'FAST_PIXEL_NORM'),
    fused_discriminator=(NCVSDLoss, 'fused_discriminator'),
    channels_last=(networks_edm2, 'CHANNELS_LAST'),
    folded_scales=(networks_edm2, 'FOLDED_SCALES'),
    masked_clip=(networks_edm2, 'MASKED_CLIP'),
    grouped_weight_norm=(networks_edm2, 'GROUPED_WEIGHT_NORM'),
    pooled_resample=(networks_edm2, 'POOLED_RESAMPLE'),
    qkv_blocks=(networks_edm2, 'QKV_BLOCKS'),
    flat_gradients=(gradients, 'FLAT_GRADIENTS'),
)

# Off on CUDA: the cached frozen weights cost 4.7 GiB on an H100 (EDM2 img64-s, batch 64, fp16) for no gain (the
# students' weights change every iteration). Everything else measures as a win on CUDA in time or memory. Each group
# turned on alone from off=all on the H200 (bench-s64, batch 64, alternating; session 16, bench/README.md): channels-
# last, the fused discriminator and the cached constant weights (the teacher's and sampled networks' weights kept as
# applied: 562 MiB in float16 at that size) 0.85x; the masked clip and folded scales 0.95x and 2.0 GiB less; the
# grouped weight normalisation 0.95x; the fast pixel norm and fused attention 1.00x and 2.3 GiB less; the flat
# gradients 1.00x and 0.7 GiB less. On the CPU, channels-last made bench-a's step 6-8% faster (session 9, two
# alternating runs: 0.73x against 0.79-0.80x off=all) and sampling 10-30%, so it is on (eager; compiled: below). The
# grouped weight normalisation is off on the CPU, where the operations it removes are cheap: bench-a measured no gain
# (1.00-1.01x at batch 32 and 2, alternating). The flat gradients leave the CPU step unchanged (bench-a, alternating:
# 1.00x at batch 32 and 2) and keep less: on everywhere. So does the pooled resampling (72 MiB less kept in a bench-s64
# generator forward; the bf16 CPU step 0.54x off=all with it against 0.62x without, fp32 1.00x; session 24), and the
# qkv blocks (eager CPU neutral; compiled CPU bf16 0.43x against 0.60x, fp32 0.70x against 0.82x; session 25), neither
# timed on CUDA yet (`bash bench/gpu_check.sh options`).
DEVICE_OFF = dict(
    cuda=('cache_frozen_weights',),
    cpu=('grouped_weight_norm',),
)

# Off as well where inductor compiles the networks. On the CPU its kernels ran the step slower on channels-last
# activations: bench-a, alternating, per round against off=all, precision=bf16 compile=True 0.62x and 0.68x with them
# against 0.56x and 0.58x without (session 9, two runs; session 6: 0.66x against 0.60x); fp32 compiled 0.79x against
# 0.72x. On CUDA not measured yet (`bash bench/gpu_check.sh timing`).
COMPILED_OFF = dict(
    cuda=(),
    cpu=('channels_last',),
)

# Off as well where the UNet bodies compute in that precision on that device. In bfloat16 on the CPU torch's fused
# (flash) attention kernel is slow: its backward pass took 36.8-40.1 ms of a profiled bench-a iteration (13.4 ms in
# float32), and bench-a's bf16 step was 0.60x off=all with it against 0.54x without (alternating; AVX-512 BF16,
# session 24).
PRECISION_OFF = {
    ('cpu', 'bf16'): ('fused_attention',),
}

def device_defaults(device, compiled=False, precision='fp32'):
    """{option: on} as the options measure best on `device`'s type, eager or compiled by inductor, with the UNet bodies
    in `precision` (devices not measured: as on the CPU)."""
    kind = device.type if device.type in DEVICE_OFF else 'cpu'
    off = DEVICE_OFF[kind] + (COMPILED_OFF[kind] if compiled else ()) + PRECISION_OFF.get((kind, precision), ())
    return {name: name not in off for name in OPTIONS}

def use_device_defaults(device, compiled=False, precision='fp32'):
    """Set the device's defaults; returns the previous settings."""
    return set_speed_options(**device_defaults(device, compiled, precision))

def option_names(names):
    """'all' or 'a,b' (a command-line list) -> option names; an unknown name is a ValueError naming the choices."""
    names = list(OPTIONS) if names == 'all' else [name for name in names.split(',') if name]
    unknown = [name for name in names if name not in OPTIONS]
    if unknown:
        raise ValueError(f'unknown speed option {", ".join(unknown)}; choose from all, {", ".join(OPTIONS)}')
    return names

def get_speed_options():
    return {name: getattr(owner, attr) for name, (owner, attr) in OPTIONS.items()}

def set_speed_options(**flags):
    """Turn options on or off by name; returns the previous settings (to restore them)."""
    previous = get_speed_options()
    for name, value in flags.items():
        owner, attr = OPTIONS[name]
        setattr(owner, attr, bool(value))
    return previous

def compile_network(net, **options):
    """torch.compile(net, **options) as every compiled path does it: static shapes, and our autograd Functions
    (Normalize, MaskedClip, traced whole: the networks compile without graph breaks) admitted to AOT autograd's
    cache, so that a restarted run loads its traced forward and backward graphs instead of tracing them again.
    Every network's forward is one function to dynamo (normalizes_weights_by_group's wrapper), whose graphs share
    dynamo's recompile limit: one iteration traces 7 (G, S, D and the teacher in their grad modes) against its
    default of 8, past which a run would fall back to eager, so the limit is raised."""
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(net, dynamic=False, **options)
