"""Switches for the speed options, which change how the networks and losses compute, not what.

Used by the before/after equivalence test and by bench/train_step.py to measure each option."""

from training import networks_edm2
from training.loss import NCVSDLoss

OPTIONS = dict(
    cache_frozen_weights=(networks_edm2, 'CACHE_FROZEN_WEIGHTS'),
    fused_attention=(networks_edm2, 'FUSED_ATTENTION'),
    fast_pixel_norm=(networks_edm2, 'FAST_PIXEL_NORM'),
    fused_discriminator=(NCVSDLoss, 'fused_discriminator'),
    channels_last=(networks_edm2, 'CHANNELS_LAST'),
)

# Off on CUDA: caching the frozen networks' normalised weights cost 4.7 GiB at EDM2-S size on an H100 for no
# measurable gain (1360 vs 1276-1378 ms/iter); on the CPU it is neutral to 4% faster.
CUDA_OFF = ('cache_frozen_weights',)

# Off everywhere until a device measures a win: channels-last activations made the CPU step 0-5% slower at bench-a
# (faster convolutions, slower broadcasting divisions and attention); not yet measured on a GPU.
OFF = ('channels_last',)

def use_device_defaults(device):
    """The speed options as they measure best on `device`'s type; returns the previous settings."""
    return set_speed_options(**{name: name not in OFF and not (device.type == 'cuda' and name in CUDA_OFF) for name in OPTIONS})

def get_speed_options():
    return {name: getattr(owner, attr) for name, (owner, attr) in OPTIONS.items()}

def set_speed_options(**flags):
    """Turn options on or off by name; returns the previous settings (to restore them)."""
    previous = get_speed_options()
    for name, value in flags.items():
        owner, attr = OPTIONS[name]
        setattr(owner, attr, bool(value))
    return previous
