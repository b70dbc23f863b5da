"""EDM2 network (Karras et al. 2024, config G): magnitude-preserving UNet and its preconditioning.

Numerically identical to the published EDM2 code (state-dict keys, shapes and outputs), so EDM2
teacher pickles and our students share one implementation. The UNet can be built as its encoder
half, its decoder half or both, so the NCVSD networks reuse the same layers.
"""

import collections
import functools
import math
import weakref

import torch

from torch_utils import misc
from torch_utils import persistence

# Speed options (same mathematics; tests compare both settings).
CACHE_FROZEN_WEIGHTS = True     # Reuse normalised weights of parameters that do not require grad until they change.
CACHE_CONSTANT_WEIGHTS = True   # The same for networks marked constant (mark_constant: the teacher, a sampled network).
FUSED_ATTENTION = True          # torch's scaled_dot_product_attention instead of two einsums and a softmax.
FAST_PIXEL_NORM = True          # Pixel normalisation as one autograd node (Normalize): fewer passes, backward included.
CHANNELS_LAST = True            # UNet activations in channels-last memory (NHWC): faster convolutions, no layout reorders.
FOLDED_SCALES = True            # Constant activation scales (mp_silu's, mp_sum's) applied to the next layer's weight.
MASKED_CLIP = True              # Activation clipping as one autograd node keeping a one-byte mask, not a copy of x.
GROUPED_WEIGHT_NORM = False     # Normalise, scale and cast a UNet level's same-shaped weights together: one node per group.
POOLED_RESAMPLE = True          # The box filter's resampling as average pooling and nearest upsampling, not depthwise convs.
QKV_BLOCKS = True               # q, k, v projected as three channel blocks: normalised over unit-stride channels, read as views.
_normalized_weights = weakref.WeakKeyDictionary()       # MPConv -> ((version, pointer, ...), weight it keeps)
_pending_groups = {}                                    # MPConv -> its group, in a grouped forward pass until first used
_grouped_weights = {}                                   # MPConv -> (weight as its group prepared it, (scale, dtype))
_applied_forms = weakref.WeakKeyDictionary()            # MPConv -> (scale, dtype) its last call applied (prepared_form)
NORMALIZED_ONLY = (1, torch.float32)                    # The (scale, dtype) form of a weight normalised and no more
_row_scales = {}                                        # (device, ndim, sizes, scales) -> a group's scales per row
_constant_layers = weakref.WeakSet()                    # MPConvs of networks that never train (mark_constant)

#----------------------------------------------------------------------------
# Magnitude-preserving primitives.

def normalize(x, dim=None, eps=1e-4, layout=None):
    """Scale to unit RMS over `dim` (all but the first by default: a weight's rows); eps scaled by the element ratio.
    layout (with FAST_PIXEL_NORM): the output's dimensions in memory order, outermost first (default: as x)."""
    if dim is not None and FAST_PIXEL_NORM:
        return Normalize.apply(x, dim, eps, layout)
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

class Normalize(torch.autograd.Function):
    """normalize(x, dim) as one autograd node: the norm in float32, and a backward pass of four passes over x, where
    autograd's chain (norm, addition, division) takes about ten. Keeps the output (which the next layer keeps anyway),
    not x. The norm is torch's one-pass vector_norm where `dim` is innermost in memory (NHWC channels), and a sum of
    squares where it is strided (NCHW channels), over which vector_norm runs ~10x slower on the CPU. Given a layout
    (attention's q, k, v: channels innermost), x is first copied into it and normalised there in place: the strided
    sum of squares was slow in bfloat16 on the CPU (bench-a's bf16 step 0.55x off=all before, 0.53x after; session 24)."""

    @staticmethod
    def forward(ctx, x, dim, eps, layout=None):
        relaid = layout is not None and not torch.compiler.is_compiling()     # Compiled graphs choose their own layouts.
        if relaid:                                  # A copy in the output's layout, normalised in place.
            x = torch.empty_permuted(x.shape, layout, dtype=x.dtype, device=x.device).copy_(x)
        accumulation = torch.float64 if x.dtype == torch.float64 else torch.float32     # promote_types, without its op
        if x.stride(dim) == 1:
            norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=accumulation)                    # r = ‖x‖
        else:
            norm = x.to(accumulation).square().sum(dim=dim, keepdim=True).sqrt()
        ctx.alpha = math.sqrt(norm.numel() / x.numel())
        denominator = torch.add(eps, norm, alpha=ctx.alpha)                              # n = eps + α·r
        y = x.div_(denominator.to(x.dtype)) if relaid else x / denominator.to(x.dtype)
        ctx.dim = dim
        ctx.save_for_backward(y, norm, denominator)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, norm, denominator = ctx.saved_tensors
        # dL/dx = g/n − y·α·Σ(g·y)/r; the sum's term vanishes where x = 0 (y = 0), so r is kept from 0.
        coefficient = (grad * y).sum(dim=ctx.dim, keepdim=True, dtype=norm.dtype) * ctx.alpha / norm.clamp_min(1e-30)
        return torch.addcmul(grad / denominator.to(grad.dtype), y, coefficient.to(grad.dtype), value=-1), None, None, None

class MaskedClip(torch.autograd.Function):
    """x.clip(-limit, limit) keeping for the backward pass the one-byte mask of the unclipped elements (where the
    result equals x: the bounds included, NaN excluded, as torch's own backward), where torch's in-place clip keeps
    a copy of x, and masking the gradient in one pass instead of four; no mask where no gradient is wanted."""

    @staticmethod
    def forward(ctx, x, limit):
        y = x.clip(-limit, limit)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(y == x)
        return y

    @staticmethod
    def backward(ctx, grad):
        unclipped, = ctx.saved_tensors
        return torch.where(unclipped, grad, 0), None

def clip_activation(x, limit):
    return MaskedClip.apply(x, limit) if MASKED_CLIP else x.clip_(-limit, limit)

class GroupNormalize(torch.autograd.Function):
    """normalize() of same-shaped float32 weights [N_i, ...] (over all but the first dimension), each then multiplied
    by its scale and all cast to `dtype`, as one concatenation, norm, division, scaling and cast for the group, and one
    backward node that recomputes the normalised rows from the weights: it keeps no normalised copy, only the norms.
    The products and casts are those of the per-layer path (normalize(w) · scale, then cast), bitwise."""

    @staticmethod
    def forward(ctx, eps, scales, dtype, *weights):
        x = torch.cat(weights)                                                          # [ΣN_i, ...], our own copy
        ctx.dim = list(range(1, x.ndim))
        norm = torch.linalg.vector_norm(x, dim=ctx.dim, keepdim=True, dtype=torch.float32)       # r = ‖x‖ per row
        ctx.alpha = math.sqrt(norm.numel() / x.numel())
        denominator = torch.add(eps, norm, alpha=ctx.alpha)                              # n = eps + α·r
        ctx.sizes, ctx.scales = [weight.shape[0] for weight in weights], scales
        ctx.save_for_backward(norm, denominator, *weights)
        return scale_rows_(x.div_(denominator), ctx.sizes, scales).to(dtype).split(ctx.sizes)

    @staticmethod
    def backward(ctx, *grads):
        norm, denominator, *weights = ctx.saved_tensors
        grad = scale_rows_(torch.cat(grads).to(torch.float32), ctx.sizes, ctx.scales)     # g: our own copy
        y = torch.cat(weights).div_(denominator)
        # dL/dx = g/n − y·α·Σ(g·y)/r, as Normalize's; zero rows (y = 0) keep r from 0.
        coefficient = (grad * y).sum(dim=ctx.dim, keepdim=True).mul_(ctx.alpha).div_(norm.clamp_min(1e-30))
        return None, None, None, *grad.div_(denominator).addcmul_(y, coefficient, value=-1).split(ctx.sizes)

def scale_rows_(x, sizes, scales):
    """x with its row blocks of `sizes` multiplied in place by `scales` (one multiplication; none if all are 1)."""
    if all(scale == 1 for scale in scales):
        return x
    key = (x.device, x.ndim, tuple(sizes), tuple(scales))
    if key not in _row_scales:                                  # Made on the device once per group and form.
        _row_scales[key] = torch.cat([torch.full([size] + [1] * (x.ndim - 1), scale, device=x.device) for size, scale in zip(sizes, scales)])
    return x.mul_(_row_scales[key])

def resample(x, f=(1, 1), mode='keep'):
    """Down- or upsample by 2 with the separable filter `f` (depthwise conv; for the box filter [1, 1], under
    POOLED_RESAMPLE, average pooling and nearest upsampling: the same sums, taps 1/4 down and 1 up)."""
    if mode == 'keep':
        return x
    if POOLED_RESAMPLE and tuple(f) == (1, 1):        # torch's bfloat16 CPU depthwise convs are slow (bench/README.md).
        if mode == 'down':
            return torch.nn.functional.avg_pool2d(x, 2)
        assert mode == 'up'
        return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
    assert len(f) % 2 == 0
    pad = (len(f) - 1) // 2
    total = sum(f)
    taps = [value / total for value in f]       # Python floats, not numpy: a compiled graph holds them as constants.
    kernel = misc.const_like(x, [[[[a * b for b in taps] for a in taps]]])
    channels = x.shape[1]
    if mode == 'down':
        return torch.nn.functional.conv2d(x, kernel.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))
    assert mode == 'up'
    return torch.nn.functional.conv_transpose2d(x, (kernel * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))

def mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    """Magnitude-preserving interpolation: t=0 gives a, t=1 gives b (t a float or a 0-dim tensor). With FOLDED_SCALES
    a tensor t (a learned weight) goes into two scalar weights, a·(1−t)/n + b·t/n, whose backward keeps a and b
    only, not the interpolation too."""
    if FOLDED_SCALES and isinstance(t, torch.Tensor):
        return weighted_sum(a, b, *blend_weights(t))
    return a.lerp(b, t) / balance_norm(t)

def mp_sums(pairs, t):
    """[mp_sum(a, b, t_i) for (a, b), t_i in zip(pairs, t)] for a tensor t of blends: with FOLDED_SCALES their weights
    computed for all at once."""
    if not FOLDED_SCALES:
        return [mp_sum(a, b, t=blend) for (a, b), blend in zip(pairs, t)]
    return [weighted_sum(a, b, weight_a, weight_b) for (a, b), weight_a, weight_b in zip(pairs, *blend_weights(t))]

def blend_weights(t):
    """The weights (1 − t)/n and t/n of mp_sum's a and b for a tensor t of blends (elementwise; n as one hypot, fewer
    operations than balance_norm's)."""
    rest = 1 - t
    norm = torch.hypot(rest, t)
    return rest / norm, t / norm

def weighted_sum(a, b, weight_a, weight_b):
    return torch.addcmul(a * weight_a, b, weight_b)

def balance_norm(t):
    """RMS gain of the blend (1 − t)·a + t·b of unit-RMS uncorrelated a and b (t a float or a tensor)."""
    return ((1 - t) ** 2 + t ** 2) ** 0.5

def mp_silu_for_layer(x):
    """(input, gain) with layer(input, gain) = layer(mp_silu(x)) for a linear layer: with FOLDED_SCALES the 1/0.596
    scales the layer's (small) weight instead of the activation."""
    if FOLDED_SCALES:
        return torch.nn.functional.silu(x), 1 / 0.596
    return mp_silu(x), 1

def mp_sum_branch(a, layer, x, t, gain=1):
    """mp_sum(a, layer(x, gain), t) for a float t; with FOLDED_SCALES the branch's weight t/norm rides on the
    layer's weight and a's is applied in the addition: one pass over the activation instead of two."""
    if not FOLDED_SCALES:
        return mp_sum(a, layer(x, gain=gain), t=t)
    norm = balance_norm(t)
    return torch.add(layer(x, gain=gain * t / norm), a, alpha=(1 - t) / norm)

def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation with balance t between a and b."""
    size_a, size_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((size_a + size_b) / ((1 - t) ** 2 + t ** 2))
    weight_a = scale / math.sqrt(size_a) * (1 - t)
    weight_b = scale / math.sqrt(size_b) * t
    return torch.cat([weight_a * a, weight_b * b], dim=dim)

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Fourier features cos(2π(f·x + φ))·√2 with frozen random f, φ."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        features = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (features.cos() * math.sqrt(2)).to(x.dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Convolution (kernel [k, k]) or linear layer (kernel []) with normalised weights."""

    forced_normalization = True     # EDM2 renormalises in each training forward; students do it per optimizer step.

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain=1):
        """Normalised, magnitude-preserving float32 weight; forced normalisation in training."""
        if self.training and self.forced_normalization:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        return self.normalized_weight() * self.weight_scale(gain)

    def weight_scale(self, gain):
        """gain / sqrt(fan_in): the factor of the normalised weight (a number, or a tensor for a learned gain)."""
        return gain / math.sqrt(math.prod(self.weight.shape[1:]))

    def keeps_normalized_weight(self):
        """Whether the normalised weight is cached: frozen, outside inference mode and compiled graphs (which fuse the
        normalisation), and either of a network marked constant (the teacher, a sampled network) or, under
        CACHE_FROZEN_WEIGHTS, of any frozen network (students outside their phase)."""
        if torch.compiler.is_compiling() or self.weight.requires_grad or torch.is_inference_mode_enabled():
            return False
        return CACHE_FROZEN_WEIGHTS or (CACHE_CONSTANT_WEIGHTS and self in _constant_layers)

    def normalized_weight(self):
        """normalize(weight) in float32: reused until the weight changes where keeps_normalized_weight(), or on its
        own."""
        if not self.keeps_normalized_weight():
            return normalize(self.weight.to(torch.float32))
        return self.kept((), lambda: normalize(self.weight.to(torch.float32)))

    def applied_weight(self, gain, dtype):
        """effective_weight(gain) in `dtype` as the layer applies it (a linear layer's transposed): in a grouped pass
        from its group, which prepared it in the form of the layer's last call (prepared_form); where
        keeps_normalized_weight() and the gain is a number (constant per call site) or a frozen parameter, kept in
        place of the normalised weight: the cast and scaled copy costs no more memory than the float32 one and saves
        their operations; else computed."""
        learned = isinstance(gain, torch.Tensor)
        grouped = None
        if not torch.compiler.is_compiling() and GROUPED_WEIGHT_NORM:                   # Compiled: ungrouped.
            form = (self.weight_scale(1), torch.float32) if learned else (self.weight_scale(gain), dtype)
            grouped = take_grouped_weight(self, form)
        if grouped is not None:
            weight, prepared = grouped
            if prepared == form:                                # A learned gain multiplies the scaled weight.
                return transpose_linear((weight * gain).to(dtype) if learned else weight)
            if prepared == NORMALIZED_ONLY:                     # Scaled and cast as effective_weight() would.
                return transpose_linear((weight * self.weight_scale(gain)).to(dtype))
        apply_form = lambda: transpose_linear(self.effective_weight(gain).to(dtype))
        if not self.keeps_normalized_weight() or (learned and not constant_parameter(gain)):
            return apply_form()
        return self.kept((gain._version, gain.data_ptr(), dtype) if learned else (gain, dtype), apply_form)

    def kept(self, key, compute):
        """compute() outside autograd, reused while the weight and `key` stay the same (one entry per layer)."""
        key = (self.weight._version, self.weight.data_ptr(), *key)
        entry = _normalized_weights.get(self, None)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, compute())
            _normalized_weights[self] = entry
        return entry[1]

    def forward(self, x, gain=1):
        return apply_weight(x, self.applied_weight(gain, x.dtype))

def apply_weight(x, weight):
    """x through a layer of applied weight `weight`: a linear layer's [in, out] or a convolution's [out, in, k, k]."""
    if weight.ndim == 2:
        return x @ weight
    assert weight.ndim == 4
    return torch.nn.functional.conv2d(x, weight, padding=(weight.shape[-1] // 2,))

def constant_parameter(gain):
    """Whether a learned gain is a frozen parameter (its network's, frozen with it: its value changes only in place,
    which its version tells), so that a weight scaled by it can be kept as the weight is."""
    return isinstance(gain, torch.nn.Parameter) and not gain.requires_grad

def transpose_linear(weight):
    """A linear layer's weight [out, in] as x @ weight applies it ([in, out], a view); a convolution's as it is."""
    return weight.t() if weight.ndim == 2 else weight

def mark_constant(net):
    """Declare that `net` never trains (a teacher, a network loaded for sampling): under CACHE_CONSTANT_WEIGHTS its
    normalised weights are cached even where CACHE_FROZEN_WEIGHTS (students frozen outside their phase) is off. A
    cached weight is still recomputed if it changes."""
    _constant_layers.update(layer for layer in net.modules() if isinstance(layer, MPConv))
    return net

@torch.no_grad()
def normalize_weights_(module):
    """Forced weight normalisation of every MPConv in `module`, outside autograd (GROUPED_WEIGHT_NORM: all
    same-shaped weights at once)."""
    layers = [layer for layer in module.modules() if isinstance(layer, MPConv)]
    groups = same_shaped(layers, lambda layer: ()) if GROUPED_WEIGHT_NORM else []
    for group in groups:
        torch._foreach_copy_([layer.weight for layer in group], normalize_group(group))
    grouped = {layer for group in groups for layer in group}
    for layer in layers:
        if layer not in grouped:
            layer.weight.copy_(normalize(layer.weight.to(torch.float32)))

def normalize_group(layers, forms=None, eps=1e-4):
    """normalize() of the weights of same_shaped() `layers`, as one GroupNormalize; forms: each layer's (scale,
    dtype) to apply (one dtype for all), default NORMALIZED_ONLY."""
    forms = forms or [NORMALIZED_ONLY] * len(layers)
    return GroupNormalize.apply(eps, [scale for scale, _dtype in forms], forms[0][1], *[layer.weight for layer in layers])

def prepared_form(layer):
    """(scale, dtype) in which a grouped pass prepares the layer's weight: as its last call applied it (the gain is
    constant per call site; a learned gain's layer gets 1/sqrt(fan_in) in float32), NORMALIZED_ONLY before any."""
    return _applied_forms.get(layer) or NORMALIZED_ONLY

def same_shaped(layers, place):
    """Lists of two or more of the MPConvs `layers` with float32 weights of the same shape but for the rows (they
    are concatenated along them), device and requires_grad, and the same place(layer)."""
    groups = collections.defaultdict(list)
    for layer in layers:
        weight = layer.weight
        if weight.dtype == torch.float32:
            groups[(place(layer), weight.shape[1:], weight.device, weight.requires_grad)].append(layer)
    return [group for group in groups.values() if len(group) > 1]

def level_weight_groups(net):
    """same_shaped() groups of the MPConvs in `net` that normalise in forward (not cached, not forced), within one
    UNet level (encoder or decoder, one resolution): a level's weight gradients are ready as its backward pass ends,
    so data-parallel training still exchanges them while the rest runs. Under QKV_BLOCKS attention's qkv layers stay
    out: their reordered rows are a copy of their own, beside which the group would keep their rows as well."""
    reordered = {module.attn_qkv for module in net.modules() if isinstance(module, Block)} if QKV_BLOCKS else set()
    places = {}
    for unet in (module for module in net.modules() if isinstance(module, UNet)):
        for part in ('enc', 'dec'):
            for name, layer_or_block in getattr(unet, part, {}).items():
                for layer in layer_or_block.modules():
                    if isinstance(layer, MPConv) and layer not in reordered:
                        places[layer] = (id(unet), part, name.split('_')[0], prepared_form(layer)[1])
    layers = [layer for layer in places if not layer.keeps_normalized_weight() and not (layer.training and layer.forced_normalization)]
    return same_shaped(layers, places.get)

def normalizes_weights_by_group(forward):
    """Decorator of a network's forward: under GROUPED_WEIGHT_NORM, each of its level_weight_groups() is normalised
    at once when the pass first uses one of its layers (eager only: compiled graphs fuse the normalisation)."""
    @functools.wraps(forward)
    def grouped_forward(net, *args, **kwargs):
        if torch.compiler.is_compiling() or not GROUPED_WEIGHT_NORM or _pending_groups or _grouped_weights:
            return forward(net, *args, **kwargs)
        try:
            _pending_groups.update((layer, group) for group in level_weight_groups(net) for layer in group)
            return forward(net, *args, **kwargs)
        finally:
            _pending_groups.clear()
            _grouped_weights.clear()
    return grouped_forward

def take_grouped_weight(layer, form):
    """(weight, its (scale, dtype) form) from the layer's group, normalising the group at its first use (so only the
    groups in use hold copies), or None outside a grouped pass; remembers `form` for the passes to come (after
    preparing the group in the forms its grouping saw: one dtype)."""
    group = _pending_groups.get(layer)
    if group is not None:
        forms = [prepared_form(member) for member in group]
        for member, prepared, weight in zip(group, forms, normalize_group(group, forms)):
            del _pending_groups[member]
            _grouped_weights[member] = (weight, prepared)
    _applied_forms[layer] = form
    return _grouped_weights.pop(layer, None)

def disable_forward_normalization_(module):
    """Leave the weights untouched in forward (normalize_weights_ is then called after each optimizer step)."""
    for layer in module.modules():
        if isinstance(layer, MPConv):
            layer.forced_normalization = False

#----------------------------------------------------------------------------
# UNet block.

@persistence.persistent_class
class Block(torch.nn.Module):
    """Residual block; 'enc' blocks map channels before the residual, 'dec' blocks after it."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
        resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0, res_balance=0.3,
        attn_balance=0.3, clip_act=256,
    ):
        super().__init__()
        self.flavor, self.out_channels, self.clip_act, self.dropout = flavor, out_channels, clip_act, dropout
        self.resample_mode, self.resample_filter = resample_mode, resample_filter
        self.num_heads = out_channels // channels_per_head if attention else 0           # 0: no attention layer
        self.res_balance, self.attn_balance = res_balance, attn_balance                  # mp_sum weights of the branches
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        residual, gain = mp_silu_for_layer(x)
        residual = self.conv_res0(residual, gain=gain)
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        residual, gain = mp_silu_for_layer(residual * scale.view(*scale.shape, 1, 1).to(residual.dtype))
        if self.training and self.dropout != 0:
            residual = torch.nn.functional.dropout(residual, p=self.dropout)

        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum_branch(x, self.conv_res1, residual, self.res_balance, gain)

        if self.num_heads != 0:
            x = mp_sum_branch(x, self.attn_proj, self.attention_heads(x), self.attn_balance)
        if self.clip_act is not None:
            x = clip_activation(x, self.clip_act)
        return x

    def attention_heads(self, x):
        """Self-attention over pixels with pixel-normalised q, k, v, before the output projection."""
        batch, channels, height, width = x.shape
        out = attend(self.normalized_qkv(x))                       # [N, heads, HW, c]
        if CHANNELS_LAST:                                           # Stay in NHWC memory.
            return out.transpose(1, 2).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return out.transpose(2, 3).reshape(*x.shape)

    def normalized_qkv(self, x):
        """Pixel-normalised q, k, v [N, heads, 3, HW, c], each with unit-stride channels (as fused attention reads them).
        EDM2's qkv channel is (head, channel within the head, q/k/v). Under QKV_BLOCKS the layer's rows are reordered
        as applied, so that its output channels are (q/k/v, head, channel): in NHWC memory (or the layouts inductor
        chooses) q, k, v are then normalised over unit-stride channels and read as views of the result. Otherwise the
        normalisation writes them into that layout (strided channels in, unit-stride out)."""
        batch, _channels, height, width = x.shape
        if QKV_BLOCKS:
            qkv = apply_weight(x, qkv_blocks(self.attn_qkv.applied_weight(1, x.dtype), self.num_heads))
            if CHANNELS_LAST:                                       # [N, HW, 3, heads, c]: a view of NHWC memory
                qkv = qkv.permute(0, 2, 3, 1).reshape(batch, height * width, 3, self.num_heads, -1)
                return normalize(qkv, dim=4).permute(0, 3, 2, 1, 4)
            qkv = qkv.reshape(batch, 3, self.num_heads, -1, height * width)               # [N, 3, heads, c, HW]
            return normalize(qkv, dim=3, layout=(0, 1, 2, 4, 3)).permute(0, 2, 1, 4, 3)
        if CHANNELS_LAST:
            qkv = self.attn_qkv(x).permute(0, 2, 3, 1).reshape(batch, height * width, self.num_heads, -1, 3)
            return normalize(qkv, dim=3, layout=(0, 2, 4, 1, 3)).permute(0, 2, 4, 1, 3)
        qkv = self.attn_qkv(x).reshape(batch, self.num_heads, -1, 3, height * width)
        return normalize(qkv, dim=2, layout=(0, 1, 3, 4, 2)).permute(0, 1, 3, 4, 2)

def qkv_blocks(weight, num_heads):
    """A qkv layer's weight [heads·c·3, C, 1, 1] with its rows, EDM2's (head, channel, q/k/v), as (q/k/v, head, channel)."""
    return weight.unflatten(0, (num_heads, -1, 3)).movedim(2, 0).flatten(0, 2)

def attend(qkv):
    """softmax(q·kᵀ/sqrt(c))·v for queries, keys and values qkv [N, heads, 3, HW, c] -> [N, heads, HW, c]."""
    if FUSED_ATTENTION:     # torch's fused kernels need unit-stride channels; strided ones fall back to unfused math.
        return torch.nn.functional.scaled_dot_product_attention(*(qkv if qkv.stride(4) == 1 else qkv.contiguous()).unbind(2))
    q, k, v = qkv.unbind(2)
    weights = torch.einsum('nhqc,nhkc->nhqk', q, k / math.sqrt(q.shape[3])).softmax(dim=3)
    return torch.einsum('nhqk,nhkc->nhqc', weights, v)

#----------------------------------------------------------------------------
# UNet.

def unet_layout(img_resolution, img_channels, model_channels=192, channel_mult=[1, 2, 3, 4],
    num_blocks=3, attn_resolutions=[16, 8]):
    """Names and shapes of the UNet layers: (encoder specs, decoder specs, final channels).

    Each spec is (name, kind, kwargs) with kind 'conv' (an MPConv) or 'block' (a Block without emb_channels).
    """
    widths = [model_channels * mult for mult in channel_mult]
    enc = []
    cout = img_channels + 1
    for level, channels in enumerate(widths):
        res = img_resolution // 2 ** level
        if level == 0:
            enc.append((f'{res}x{res}_conv', 'conv', dict(in_channels=cout, out_channels=channels)))
            cout = channels
        else:
            enc.append((f'{res}x{res}_down', 'block', dict(in_channels=cout, out_channels=cout, flavor='enc', resample_mode='down')))
        for block in range(num_blocks):
            enc.append((f'{res}x{res}_block{block}', 'block', dict(in_channels=cout, out_channels=channels, flavor='enc', attention=(res in attn_resolutions))))
            cout = channels

    dec = []
    skips = [spec[2]['out_channels'] for spec in enc]
    for level, channels in reversed(list(enumerate(widths))):
        res = img_resolution // 2 ** level
        if level == len(widths) - 1:
            dec.append((f'{res}x{res}_in0', 'block', dict(in_channels=cout, out_channels=cout, flavor='dec', attention=True)))
            dec.append((f'{res}x{res}_in1', 'block', dict(in_channels=cout, out_channels=cout, flavor='dec')))
        else:
            dec.append((f'{res}x{res}_up', 'block', dict(in_channels=cout, out_channels=cout, flavor='dec', resample_mode='up')))
        for block in range(num_blocks + 1):
            dec.append((f'{res}x{res}_block{block}', 'block', dict(in_channels=cout + skips.pop(), out_channels=channels, flavor='dec', attention=(res in attn_resolutions))))
            cout = channels
    return enc, dec, cout

@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2 UNet. `parts` selects which halves exist: 'both' (EDM2), 'encoder' or 'decoder'.

    Every part has its own noise/label embedding; the decoder half also owns out_conv and out_gain.
    """

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=[1, 2, 3, 4],
        channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8],
        label_balance=0.5, concat_balance=0.5, parts='both', **block_kwargs,
    ):
        super().__init__()
        assert parts in ('both', 'encoder', 'decoder')
        widths = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance        # mp_sum / mp_cat weights
        enc_specs, dec_specs, final_channels = unet_layout(img_resolution, img_channels, model_channels,
            channel_mult, num_blocks, attn_resolutions)
        self.num_skips = len(enc_specs)
        if parts != 'encoder':
            self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim != 0 else None

        def build(specs):
            layers = torch.nn.ModuleDict()
            for name, kind, kwargs in specs:
                if kind == 'conv':
                    layers[name] = MPConv(kwargs['in_channels'], kwargs['out_channels'], kernel=[3, 3])
                else:
                    layers[name] = Block(emb_channels=emb_channels, **kwargs, **block_kwargs)
            return layers
        if parts != 'decoder':
            self.enc = build(enc_specs)
        if parts != 'encoder':
            self.dec = build(dec_specs)
            self.out_conv = MPConv(final_channels, img_channels, kernel=[3, 3])

    def embed(self, noise_labels, class_labels):
        """[N] noise labels (+ [N, label_dim] labels) -> [N, emb_channels] embedding."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        return mp_silu(emb)

    def encode(self, x, emb):
        """[N, C, H, W] input -> (deepest feature map, list of every encoder output for the skips)."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        if CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if 'conv' in name else layer(x, emb)
            skips.append(x)
        return x, skips

    def decode(self, x, skips, emb):
        """Deepest feature map and skips (consumed from the end) -> [N, img_channels, H, W]."""
        skips = list(skips)
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain).contiguous()

    def forward(self, x, noise_labels, class_labels):
        emb = self.embed(noise_labels, class_labels)
        x, skips = self.encode(x, emb)
        return self.decode(x, skips, emb)

#----------------------------------------------------------------------------
# Preconditioning (EDM) and the uncertainty head.

def precond_coefficients(sigma, sigma_data):
    """EDM's c_skip, c_out, c_in (all [N, 1, 1, 1]) and c_noise ([N]) for sigma [N, 1, 1, 1]."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.flatten().log() / 4
    return c_skip, c_out, c_in, c_noise

def prepare_inputs(x, sigma, class_labels, label_dim):
    """float32 x, sigma as [N, 1, 1, 1] and one-hot labels [N or 1, label_dim] (None without labels)."""
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    if label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, label_dim)
    return x, sigma, class_labels

def compute_dtype(use_fp16, device, force_fp32, reduced='float16'):
    """The UNet body's dtype: `reduced` (float16 on CUDA only, bfloat16 anywhere) when enabled, else float32."""
    if not use_fp16 or force_fp32 or (reduced == 'float16' and device.type != 'cuda'):
        return torch.float32
    return getattr(torch, reduced)

PRECISIONS = dict(fp32=None, fp16='float16', bf16='bfloat16')     # --precision -> reduced dtype of the UNet bodies.

def computes_natively(precision, device):
    """Whether `device` has arithmetic units for `precision` (fp32, fp16, bf16): bf16 needs AVX-512 BF16 or AMX on a
    CPU (oneDNN's own check; without them oneDNN converts every element) and compute capability 8.0 on CUDA; other
    precisions and devices count as native (fp16 computes in float32 off CUDA)."""
    if precision != 'bf16':
        return True
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == 'cpu':
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return True

def set_precision(net, precision):
    """Make every network inside `net` compute its UNet body in `precision` (fp32, fp16 or bf16)."""
    for module in net.modules():
        if hasattr(module, 'use_fp16'):
            module.use_fp16 = PRECISIONS[precision] is not None
            module.reduced_dtype = PRECISIONS[precision] or 'float16'
    return net

def network_precision(net):
    """'fp32', 'fp16' or 'bf16': the UNet bodies' precision as set_precision() (or the constructor) left it."""
    if not net.use_fp16:
        return 'fp32'
    return next(name for name, dtype in PRECISIONS.items() if dtype == net.reduced_dtype)

@persistence.persistent_class
class Precond(torch.nn.Module):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise, label), plus logvar(σ) for loss weighting."""

    reduced_dtype = 'float16'                   # Body dtype when use_fp16 (set_precision() may choose bfloat16).

    def __init__(self,
        img_resolution,                         # Height = width of the images.
        img_channels,                           # Channels per pixel (3: RGB, 4: SD-VAE latents).
        label_dim,                              # Number of classes (one-hot labels); 0: unconditional.
        use_fp16        = True,                 # Run the UNet body in reduced precision (CUDA; see compute_dtype).
        sigma_data      = 0.5,                  # Expected standard deviation of the data (EDM preconditioning).
        logvar_channels = 128,                  # Fourier features of the uncertainty head logvar(σ).
        **unet_kwargs,                          # UNet arguments: model_channels, channel_mult, num_blocks, ...
    ):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @normalizes_weights_by_group
    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x, sigma, class_labels = prepare_inputs(x, sigma, class_labels, self.label_dim)
        dtype = compute_dtype(self.use_fp16, x.device, force_fp32, self.reduced_dtype)
        c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, self.sigma_data)
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, self.logvar(c_noise)
        return D_x

    def logvar(self, c_noise):
        """u(σ) of EDM2's uncertainty-weighted loss, [N, 1, 1, 1]."""
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

#----------------------------------------------------------------------------
# The NCVSD wrapper is pickled by reference under this module's name by the released checkpoints.

def __getattr__(name):
    if name == 'GenerativeDenoiser':
        from training.networks_ncvsd import GenerativeDenoiser
        return GenerativeDenoiser
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
