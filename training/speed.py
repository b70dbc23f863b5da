"""Switches for the speed options, which change how the networks and losses compute, not what.

Used by the before/after equivalence test and by bench/train_step.py to measure each option."""

from training import networks_edm2
from training.loss import NCVSDLoss

OPTIONS = dict(
    cache_frozen_weights=(networks_edm2, 'CACHE_FROZEN_WEIGHTS'),
    fused_attention=(networks_edm2, 'FUSED_ATTENTION'),
    fast_pixel_norm=(networks_edm2, 'FAST_PIXEL_NORM'),
    fused_discriminator=(NCVSDLoss, 'fused_discriminator'),
)

def get_speed_options():
    return {name: getattr(owner, attr) for name, (owner, attr) in OPTIONS.items()}

def set_speed_options(**flags):
    """Turn options on or off by name; returns the previous settings (to restore them)."""
    previous = get_speed_options()
    for name, value in flags.items():
        owner, attr = OPTIONS[name]
        setattr(owner, attr, bool(value))
    return previous
