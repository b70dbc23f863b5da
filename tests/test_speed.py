"""The speed options change how things are computed, not what: before/after equivalence."""

import collections
import contextlib
import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import load_fixture, run_python, DEVICES
from helpers import assert_same_weights
from torch_utils.misc import kept_for_backward_mib
from training.loss import NCVSDLoss
from training import networks_edm2
from training.networks_edm2 import GroupNormalize, MPConv, Precond, level_weight_groups, mark_constant, set_precision
from training.networks_ncvsd import ConditionalDiscriminator, ConditionalPrecond, GenerativeDenoiser
from training.speed import OPTIONS, set_speed_options
from training.training_loop import NCVSDIteration, build_optimizers, build_students

def teacher_and_students():
    data = load_fixture('ncvsd_networks_small.pt')
    teacher = mark_constant(Precond(**data['config']).eval().requires_grad_(False))      # As network_io.prepare_frozen.
    teacher.load_state_dict(data['teacher_state_dict'])
    torch.manual_seed(0)
    return teacher, build_students(teacher, {'use_fp16': False}, 'cpu')

def one_iteration(teacher, nets, compile_options=None, iterations=1, device='cpu', loss_scaling=1.0):
    """(G, S, D) after `iterations` iterations of two accumulation rounds from copies of `nets`."""
    G, S, D = [copy.deepcopy(net).to(device) for net in nets]
    step = NCVSDIteration(G, S, D, teacher.to(device), NCVSDLoss(), build_optimizers(G, S, D), 0.414, num_rounds=2,
        batch_gpu_total=8, g_lr_scaling=0.1, d_lr_scaling=0.1, loss_scaling=loss_scaling,
        rng=torch.Generator(device).manual_seed(0), compile_options=compile_options)
    gen = torch.Generator().manual_seed(1)
    def batches():
        while True:
            images, labels = torch.randn(4, 3, 16, 16, generator=gen) * 0.5, torch.eye(10)[torch.randint(10, [4], generator=gen)]
            yield images.to(device), labels.to(device)
    torch.manual_seed(2)
    source = batches()
    for _ in range(iterations):
        step.run(source, lr=1e-3)
    return G, S, D

def without_and_with_speed_options(teacher, nets, device='cpu'):
    """((G, S, D) after one iteration with every speed option off, the same with every option on)."""
    set_speed_options(**{name: False for name in OPTIONS})
    reference = one_iteration(teacher, nets, device=device)
    set_speed_options(**{name: True for name in OPTIONS})
    return reference, one_iteration(teacher, nets, device=device)

def test_one_iteration_is_the_same_with_and_without_speed_options(speed_options):
    teacher, nets = teacher_and_students()
    reference, fast = without_and_with_speed_options(teacher, nets)
    for ref_net, fast_net, initial in zip(reference, fast, nets):
        for (name, a), b, c in zip(ref_net.state_dict().items(), fast_net.state_dict().values(), initial.state_dict().values()):
            moved = (a - c).abs().max()
            assert (a - b).abs().max() <= 1e-3 * max(float(moved), 1e-6) + 1e-6, name

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_one_cuda_iteration_is_the_same_with_and_without_speed_options(speed_options):
    """As above on CUDA (fp32), whose kernels the options reach differently (cuDNN, fused attention kernels): the
    weights after an iteration with every option equal those without, under the CUDA tolerance of the resume test."""
    teacher, nets = teacher_and_students()
    reference, fast = without_and_with_speed_options(teacher, nets, device='cuda')
    for ref_net, fast_net in zip(reference, fast):
        assert_same_weights(ref_net.state_dict(), fast_net.state_dict(), 'cuda', type(ref_net).__name__)

@pytest.mark.parametrize('name', list(OPTIONS))
def test_each_option_keeps_the_fixture_outputs(speed_options, name):
    data = load_fixture('ncvsd_networks_small.pt')
    set_speed_options(**{option: option == name for option in OPTIONS})
    disc = mark_constant(ConditionalDiscriminator(**data['config']).eval().requires_grad_(False))
    disc.load_state_dict(data['discriminator_state_dict'])
    args = (data['x'], data['sigma'], data['cond_x'], data['cond_sigma'], data['class_labels'])
    for _ in range(2):                                        # the second call uses cached weights
        assert torch.allclose(disc(*args), data['discriminator_logits'], rtol=1e-5, atol=1e-6)
    edm2 = load_fixture('edm2_precond_small.pt')
    net = mark_constant(Precond(**edm2['config']).eval().requires_grad_(False))
    net.load_state_dict(edm2['state_dict'])
    D_x = net(edm2['x'], edm2['sigma'], edm2['class_labels'])
    assert float((D_x - edm2['D_x']).norm() / edm2['D_x'].norm()) < 1e-5

@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_fast_pixel_norm_gradient_and_memory(speed_options, memory_format):
    """The fast pixel normalisation (one autograd node with its own backward pass; its norm a sum of squares over
    NCHW's strided channels, vector_norm over NHWC's innermost ones) has the gradient of the plain formula
    x / (eps + sqrt(sum x² / C)) (autograd in float64 as reference; a pixel of zeros included, where the gradient is
    1/eps) and, in bf16, keeps no more for the backward pass than torch's vector_norm: no float32 copies of the
    activations (they cost GiBs at EDM2-S size in fp16)."""
    from training.networks_edm2 import normalize
    x = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    x[0, :, 1, 1] = 0
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    weights = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(1))
    set_speed_options(fast_pixel_norm=True)
    (normalize(x, dim=1) * weights).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (x64 / (1e-4 + torch.linalg.vector_norm(x64, dim=1, keepdim=True) / np.sqrt(5)) * weights).sum().backward()
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad[0, :, 1, 1], weights[0, :, 1, 1] / 1e-4)
    data = load_fixture('ncvsd_networks_small.pt')
    net = set_precision(ConditionalPrecond(**data['config']), 'bf16')
    args = (data['x'], data['sigma'], data['cond_x'], data['cond_sigma'], data['class_labels'])
    assert saved_mib(net, args, fast_pixel_norm=True) <= saved_mib(net, args, fast_pixel_norm=False)

def saved_mib(net, args, **options):
    """MiB that a forward pass of `net` with the given speed options keeps for the backward pass."""
    set_speed_options(**options)
    return kept_for_backward_mib(net, *args)

def test_folded_blends_are_mp_sums(speed_options):
    """mp_sum with a learned (tensor) blend, and mp_sums with a vector of them, as folded weights (one hypot for
    all) equal lerp / balance_norm, values and gradients, at the ends of [0, 1] and inside."""
    from training.networks_edm2 import mp_sum, mp_sums
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)) for _ in range(4)]
    results = {}
    for folded in (False, True):
        set_speed_options(folded_scales=folded)
        blends = torch.tensor([0.0, 0.3, 0.8, 1.0], requires_grad=True)
        outputs = mp_sums(pairs, blends) + [mp_sum(*pairs[1], t=blends[1])]
        sum((output * (index + 1)).sum() for index, output in enumerate(outputs)).backward()
        results[folded] = [*outputs, blends.grad]
    for folded, plain in zip(results[True], results[False]):
        assert torch.allclose(folded, plain, rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize('name', ['masked_clip', 'fast_pixel_norm', 'folded_scales'])
def test_options_keep_less_for_the_backward_pass(speed_options, name):
    """The options that change what autograd keeps (the clip's mask, the normalised q/k/v in attention's own layout,
    the learned skip weights as scalar weights) keep less in a bf16 generator forward than without them."""
    data = load_fixture('ncvsd_networks_small.pt')
    net = set_precision(ConditionalPrecond(**data['config']), 'bf16')
    args = (data['x'], data['sigma'], data['cond_x'], data['cond_sigma'], data['class_labels'])
    others = {option: True for option in OPTIONS if option != name}
    assert saved_mib(net, args, **others, **{name: True}) < saved_mib(net, args, **others, **{name: False})

def test_masked_clip_has_the_gradient_of_clip(speed_options):
    """The one-node clip equals torch's in-place clip, forward and backward, bitwise: at the bounds (gradient
    passes), beyond them (none), and at NaN (none); without a gradient to compute it makes no mask."""
    from training.networks_edm2 import clip_activation
    x = torch.tensor([-300.0, -256.0, -1.5, 0.0, 2.0, 256.0, 300.0, float('nan'), float('inf')])
    grad = torch.arange(1.0, 10.0)
    results = []
    for masked in (True, False):
        set_speed_options(masked_clip=masked)
        leaf = x.clone().requires_grad_()
        y = clip_activation(leaf * 1, 256)
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    (y_masked, grad_masked), (y_plain, grad_plain) = results
    assert torch.equal(y_masked.nan_to_num(-1), y_plain.nan_to_num(-1))
    assert torch.equal(grad_masked, grad_plain)
    assert grad_masked.tolist() == [0, 2, 3, 4, 5, 6, 0, 0, 0]
    set_speed_options(masked_clip=True)
    ops = OpNames()
    with ops:                                           # No gradient wanted (a frozen pass): the clip alone, no mask.
        y = clip_activation(x, 256)
    assert ops.names == {'clamp.default': 1} and torch.equal(y.nan_to_num(-1), y_plain.nan_to_num(-1))

@pytest.mark.parametrize('channels_last', [False, True])
def test_attention_inputs_need_no_copy(speed_options, monkeypatch, channels_last):
    """With the fast pixel norm, q, k, v are normalised straight into the unit-stride layout that fused attention
    reads (no copy to keep for the backward pass), with the values and gradients of the plain normalisation (to
    float32's rounding: since session 24 the norm is reduced over channels innermost in that layout, not strided in x's).
    In EDM2's channel order (qkv_blocks off; with it, test_qkv_blocks_are_attention_without_copies)."""
    set_speed_options(fast_pixel_norm=True, fused_attention=True, channels_last=channels_last, qkv_blocks=False)
    layouts, attend = [], networks_edm2.attend
    monkeypatch.setattr(networks_edm2, 'attend', lambda qkv: layouts.append(qkv.is_contiguous()) or attend(qkv))
    edm2 = load_fixture('edm2_precond_small.pt')
    net = Precond(**edm2['config']).eval()
    net.load_state_dict(edm2['state_dict'])
    D_x = net(edm2['x'], edm2['sigma'], edm2['class_labels']).detach()     # Under autograd: the path training takes.
    assert layouts and all(layouts)
    assert float((D_x - edm2['D_x']).norm() / edm2['D_x'].norm()) < 1e-5
    qkv = torch.randn(2, 3, 8, 3, 16, generator=torch.Generator().manual_seed(0))       # [N, heads, c, 3, HW]
    weights = torch.randn(qkv.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for layout in (None, (0, 1, 3, 4, 2)):
        source = qkv.clone().requires_grad_()
        y = networks_edm2.normalize(source, dim=2, layout=layout)
        (y * weights).sum().backward()
        results.append((y, source.grad))
    for plain, relaid in zip(*results):
        assert torch.allclose(plain, relaid, rtol=1e-6, atol=1e-6)
    assert results[1][0].permute(0, 1, 3, 4, 2).is_contiguous()

def test_weight_cache_follows_weight_updates(speed_options):
    set_speed_options(cache_frozen_weights=True)
    data = load_fixture('edm2_precond_small.pt')
    net = Precond(**data['config']).eval().requires_grad_(False)
    net.load_state_dict(data['state_dict'])
    args = (data['x'], data['sigma'], data['class_labels'])
    before = net(*args)
    with torch.no_grad():
        net.unet.enc['16x16_conv'].weight.mul_(-1)            # in-place change: the cache must notice
    assert not torch.allclose(net(*args), before)
    net.load_state_dict(data['state_dict'])
    assert torch.equal(net(*args), before)

def test_networks_prepared_for_sampling_let_cudnn_time_its_kernels(monkeypatch):
    """A network loaded for sampling (or as a teacher) turns on cuDNN's benchmark mode, as bench/sample.py times it:
    the sampling scripts set nothing themselves."""
    from training.network_io import prepare_frozen
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    prepare_frozen(Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]), 'cpu')
    assert torch.backends.cudnn.benchmark

def test_constant_networks_keep_their_normalised_weights(speed_options):
    """With only the constant-weight cache (CUDA's default), a network prepared as a teacher or for sampling reuses
    its normalised weights (the same outputs, bitwise) while a student frozen for a phase recomputes them; where the
    gain is a number or a frozen learned gain it keeps them as applied (scaled, cast, a linear layer's transposed),
    four or more operations fewer per layer; a change to a constant network's weight or learned gain is noticed."""
    from training.network_io import prepare_frozen
    set_speed_options(cache_frozen_weights=False, cache_constant_weights=True)
    data = load_fixture('edm2_precond_small.pt')
    args = (data['x'], data['sigma'], data['class_labels'])
    frozen, constant = [Precond(**data['config']).eval().requires_grad_(False) for _ in range(2)]
    for net in (frozen, constant):
        net.load_state_dict(data['state_dict'])
    constant = prepare_frozen(constant, 'cpu')
    layers_of = lambda net: [layer for layer in net.modules() if isinstance(layer, MPConv)]
    cached = lambda net: [layer in networks_edm2._normalized_weights for layer in layers_of(net)]
    before = constant(*args)
    assert torch.equal(frozen(*args), before) and torch.equal(constant(*args), before)
    assert sum(cached(constant)) == len(cached(constant)) - 1       # All but the logvar head, which D(x; σ) does not run.
    assert not any(cached(frozen))
    applied = [(layer, entry) for layer, (key, entry) in networks_edm2._normalized_weights.items() if len(key) > 2 and layer in layers_of(constant)]
    assert applied and any(entry.shape == layer.weight.t().shape for layer, entry in applied if layer.weight.ndim == 2)
    operations = {}
    for name, net in (('frozen', frozen), ('constant', constant)):
        ops = OpNames()
        with ops:
            net(*args)
        operations[name] = sum(ops.names.values())
    assert operations['frozen'] - operations['constant'] >= 4 * len(applied), operations
    learned = [layer for layer, (key, _entry) in networks_edm2._normalized_weights.items() if len(key) == 5 and layer in layers_of(constant)]
    assert constant.unet.out_conv in learned and len(learned) > 2                 # out_gain's and the blocks' emb_gain's
    with torch.no_grad():
        constant.unet.out_gain.mul_(2)                     # in-place change of a learned gain: noticed
    assert not torch.allclose(constant(*args), before)
    with torch.no_grad():
        constant.unet.out_gain.div_(2)
    assert torch.equal(constant(*args), before)
    with torch.no_grad():
        constant.unet.enc['16x16_conv'].weight.mul_(-1)
    assert not torch.allclose(constant(*args), before)

def test_fused_discriminator_pass_equals_two_passes(speed_options):
    data = load_fixture('ncvsd_networks_small.pt')
    disc = ConditionalDiscriminator(**data['config']).eval()
    disc.load_state_dict(data['discriminator_state_dict'])
    x, sigma, y, sy, labels = data['x'], data['sigma'], data['cond_x'], data['cond_sigma'], data['class_labels']
    x2 = torch.randn_like(x)
    joint = disc(torch.cat([x, x2]), torch.cat([sigma, sigma]), y, sy, labels)
    assert torch.allclose(joint[:5], disc(x, sigma, y, sy, labels), rtol=1e-5, atol=1e-6)
    assert torch.allclose(joint[5:], disc(x2, sigma, y, sy, labels), rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_pooled_resampling_is_the_depthwise_convolution(speed_options, device, dtype, memory_format):
    """EDM2's box filter [1, 1] as average pooling (down) and nearest-neighbour upsampling (up) takes the same sums as
    its depthwise convolutions (taps 1/4 down, 1 up): values and gradients bitwise on the CPU (CUDA's kernels may add
    in another order), in the input's memory format. Other filters keep the convolutions."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, 8, generator=gen).to(device, dtype).contiguous(memory_format=memory_format)
    for mode, f in (('down', [1, 1]), ('up', [1, 1]), ('down', [1, 3, 3, 1]), ('up', [1, 3, 3, 1])):
        results = {}
        for pooled in (False, True):
            set_speed_options(pooled_resample=pooled)
            source = x.detach().requires_grad_()
            y = networks_edm2.resample(source, f=f, mode=mode)
            y.backward(torch.randn(y.shape, generator=gen.manual_seed(1)).to(device, dtype))
            assert y.is_contiguous(memory_format=memory_format)
            results[pooled] = (y, source.grad)
        for plain, fast in zip(results[False], results[True]):
            assert torch.equal(plain, fast) if device == 'cpu' else torch.allclose(plain, fast, rtol=1e-2, atol=1e-2), (mode, f)

@pytest.mark.parametrize('grouped', [False, True])
def test_a_compiled_iteration_equals_an_eager_one(speed_options, grouped):
    """torch.compile traces each network as one graph in every call of the iteration (fullgraph: a graph break is an
    error) and changes no mathematics: the update of a compiled iteration is within 1e-3 of the eager one (fp32), with
    the grouped weight normalisation (CUDA's default: eager passes normalise by group, compiled graphs per layer,
    projections by group) or without. The aot_eager backend keeps the test short; inductor (the --compile default)
    differs from it only in generated kernels. (Not torch._dynamo.explain: it resets dynamo's caches, so that each
    case compiled everything again, 50 s.)"""
    set_speed_options(grouped_weight_norm=grouped)
    teacher, nets = teacher_and_students()
    eager = one_iteration(teacher, nets)
    compiled = one_iteration(teacher, nets, compile_options=dict(backend='aot_eager', fullgraph=True))
    for eager_net, compiled_net, initial in zip(eager, compiled, nets):
        flat = lambda net: torch.cat([value.flatten() for value in net.state_dict().values()])
        update = flat(eager_net) - flat(initial)
        assert float((flat(compiled_net) - flat(eager_net)).norm()) <= 1e-3 * float(update.norm()), type(initial).__name__

@pytest.mark.parametrize('flat', [True, False])
def test_compiled_forward_passes_find_no_gradients(speed_options, monkeypatch, flat):
    """A compiled iteration unsets the gradients while the losses run the networks forward (dynamo would convert each
    one, views of a flat buffer or of DDP's buckets with symbolic shapes) and puts them back for the backward pass:
    in every accumulation round of every phase the networks hold none, and the update equals the eager one bitwise,
    accumulation over rounds and loss scaling included. The networks stay eager here: what is checked is what they
    find, with the flat gradients (set before the first round) and without (set by the first round's backward)."""
    from training import training_loop
    set_speed_options(flat_gradients=flat)
    teacher, nets = teacher_and_students()
    eager = one_iteration(teacher, nets, loss_scaling=4.0)
    gradients_found = []
    for method in ('score_loss', 'discriminator_loss', 'generator_loss'):
        def recording(self, *args, loss=getattr(NCVSDLoss, method), **kwargs):
            modules = [arg for arg in (*args, *kwargs.values()) if isinstance(arg, torch.nn.Module)]
            gradients_found.append(sum(param.grad is not None for module in modules for param in module.parameters()))
            return loss(self, *args, **kwargs)
        monkeypatch.setattr(NCVSDLoss, method, recording)
    monkeypatch.setattr(training_loop, 'compile_network', lambda net, **options: net)
    compiled = one_iteration(teacher, nets, compile_options=dict(backend='inductor'), loss_scaling=4.0)
    assert gradients_found == [0] * 6
    for eager_net, compiled_net in zip(eager, compiled):
        for (name, value), other in zip(eager_net.state_dict().items(), compiled_net.state_dict().values()):
            assert torch.equal(value, other), name

@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need CUDA')
def test_cuda_graphed_iterations_equal_eager_ones():
    """--cuda-graphs replays recorded graphs (from the third call on) whose outputs, gradients accumulated over
    two rounds included, live in memory the next replay reuses: after three iterations (warm-up, recording,
    replay) the weights are those of eager iterations (fp32; CUDA's tolerance, see assert_same_weights). The
    cudagraphs backend is what --cuda-graphs runs without --compile."""
    teacher, nets = teacher_and_students()
    eager = one_iteration(teacher, nets, iterations=3, device='cuda')
    graphed = one_iteration(teacher, nets, compile_options=dict(backend='cudagraphs'), iterations=3, device='cuda')
    for eager_net, graphed_net in zip(eager, graphed):
        assert_same_weights(eager_net.state_dict(), graphed_net.state_dict(), 'cuda', type(eager_net).__name__)

def explain_inputs(net):
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0]), torch.eye(10)[:2]
    return (x, sigma, labels) if isinstance(net, Precond) else (x, sigma, x, sigma, labels)

def test_speed_options_follow_the_device(speed_options):
    from training.speed import device_defaults, use_device_defaults, get_speed_options
    use_device_defaults(torch.device('cuda'))                       # A device object needs no GPU.
    assert get_speed_options() == dict(cache_frozen_weights=False, cache_constant_weights=True, fused_attention=True, fast_pixel_norm=True, fused_discriminator=True,
        channels_last=True, folded_scales=True, masked_clip=True, grouped_weight_norm=True, pooled_resample=True, qkv_blocks=True, flat_gradients=True)
    use_device_defaults(torch.device('cpu'))
    assert get_speed_options() == dict(cache_frozen_weights=True, cache_constant_weights=True, fused_attention=True, fast_pixel_norm=True, fused_discriminator=True,
        channels_last=True, folded_scales=True, masked_clip=True, grouped_weight_norm=False, pooled_resample=True, qkv_blocks=True, flat_gradients=True)
    use_device_defaults(torch.device('cpu'), compiled=True)         # Inductor's CPU kernels: NCHW measured faster.
    assert get_speed_options() == dict(cache_frozen_weights=True, cache_constant_weights=True, fused_attention=True, fast_pixel_norm=True, fused_discriminator=True,
        channels_last=False, folded_scales=True, masked_clip=True, grouped_weight_norm=False, pooled_resample=True, qkv_blocks=True, flat_gradients=True)
    use_device_defaults(torch.device('cuda'), compiled=True)
    assert get_speed_options()['channels_last']
    for compiled in (False, True):          # bf16 on the CPU: torch's flash attention kernel is slower than the einsums.
        use_device_defaults(torch.device('cpu'), compiled=compiled, precision='bf16')
        assert get_speed_options() == dict(device_defaults(torch.device('cpu'), compiled), fused_attention=False)
    for device, precision in (('cuda', 'bf16'), ('cuda', 'fp16'), ('cpu', 'fp16')):
        use_device_defaults(torch.device(device), precision=precision)
        assert get_speed_options() == device_defaults(torch.device(device))

def test_module_defaults_are_the_cpu_defaults():
    """Code that builds networks without setting the device's defaults (a library user, a test) runs as the CPU does."""
    result = run_python(['-c', 'import torch; from training.speed import device_defaults, get_speed_options; '
        'print(get_speed_options() == device_defaults(torch.device("cpu")))'])
    assert result.stdout.strip() == 'True', result.stderr

def test_sampling_loads_use_the_device_defaults(speed_options, tmp_path):
    """generate_images and the other sampling CLIs load through network_io.load_network, which sets the options as
    the device measures best, eager or compiled, for the bodies' precision (as training does), whatever was set before."""
    import pickle
    import dnnlib
    from training.network_io import load_network
    from training.speed import device_defaults, get_speed_options
    teacher, _students = teacher_and_students()
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=teacher), f)
    cpu_defaults = device_defaults(torch.device('cpu'))
    set_speed_options(**{name: not on for name, on in cpu_defaults.items()})
    load_network(str(tmp_path / 'net.pkl'), torch.device('cpu'), verbose=False)
    assert get_speed_options() == cpu_defaults
    load_network(str(tmp_path / 'net.pkl'), torch.device('cpu'), precision='bf16', verbose=False)
    assert get_speed_options() == device_defaults(torch.device('cpu'), precision='bf16') != cpu_defaults
    load_network(str(tmp_path / 'net.pkl'), torch.device('cpu'), compile_backend='inductor', verbose=False)
    assert get_speed_options() == device_defaults(torch.device('cpu'), compiled=True) != cpu_defaults

def test_compile_network_works_in_a_fresh_process():
    """compile_network set an option of torch._functorch.config, which `import torch` does not load: in the suite some
    earlier import had loaded it, but generate_images.py --compile stopped with an AttributeError."""
    result = run_python(['-c', 'import torch\nfrom training.speed import compile_network\n'
        'net = compile_network(torch.nn.Linear(2, 2))\nprint(torch._functorch.config.autograd_cache_allow_custom_autograd_functions)'])
    assert result.returncode == 0 and result.stdout.strip() == 'True', result.stderr[-2000:]

@pytest.mark.parametrize('fused_attention', [True, False])
def test_channels_last_reaches_every_convolution(speed_options, monkeypatch, fused_attention):
    """With channels_last, every convolution of the UNet (resampling and attention included) gets NHWC activations,
    so oneDNN/cuDNN never reorder them; the output is the fixture's, in the usual NCHW memory."""
    layouts = []
    for name in ('conv2d', 'conv_transpose2d'):
        original = getattr(torch.nn.functional, name)
        def recording(x, *args, original=original, **kwargs):
            layouts.append(x.is_contiguous(memory_format=torch.channels_last))
            return original(x, *args, **kwargs)
        monkeypatch.setattr(torch.nn.functional, name, recording)
    set_speed_options(channels_last=True, fused_attention=fused_attention)
    edm2 = load_fixture('edm2_precond_small.pt')
    net = Precond(**edm2['config']).eval().requires_grad_(False)
    net.load_state_dict(edm2['state_dict'])
    D_x = net(edm2['x'], edm2['sigma'], edm2['class_labels'])
    assert len(layouts) > 20 and all(layouts)
    assert D_x.is_contiguous() and float((D_x - edm2['D_x']).norm() / edm2['D_x'].norm()) < 1e-5

def test_compiled_networks_compile_once(tmp_path):
    """Compiled graphs are reused: after one iteration (every phase, GAN term on), a second compiles nothing new;
    a compiled student's four sampling steps share one graph, which a second batch of the same size reuses."""
    from torch._dynamo.utils import counters
    teacher, nets = teacher_and_students()
    G, S, D = [copy.deepcopy(net) for net in nets]
    step = NCVSDIteration(G, S, D, teacher, NCVSDLoss(), build_optimizers(G, S, D), 0.414, num_rounds=2, batch_gpu_total=8,
        rng=torch.Generator().manual_seed(0), compile_options=dict(backend='aot_eager'))
    gen = torch.Generator().manual_seed(1)
    def batches():
        while True:
            yield torch.randn(4, 3, 16, 16, generator=gen) * 0.5, torch.eye(10)[torch.randint(10, [4], generator=gen)]
    batch_source = batches()
    graphs = lambda: counters['stats']['unique_graphs']
    step.run(batch_source, lr=1e-3)
    after_first = graphs()
    step.run(batch_source, lr=1e-3)
    assert graphs() == after_first
    denoiser = GenerativeDenoiser(torch.compile(copy.deepcopy(G).eval().requires_grad_(False), backend='aot_eager', dynamic=False))
    labels = torch.eye(10)[:4]
    denoiser.sample(torch.randn(4, 3, 16, 16), labels, ts=[0, 10, 20, 30, 39])
    after_sampling = graphs()
    assert after_sampling == after_first + 1
    denoiser.sample(torch.randn(4, 3, 16, 16), labels, ts=[0, 10, 20, 30, 39])
    assert graphs() == after_sampling

def test_compiled_networks_are_not_held_to_dynamos_default_recompile_limit():
    """Every network's forward is one function to dynamo (the weight-grouping decorator's wrapper), and one iteration
    traces 7 graphs of it (G, S, D and the teacher in their grad modes), sampling an 8th: dynamo's default limit, past
    which fullgraph compilation stopped with "found no compiled frames" (eager otherwise). Here a module decorated
    alike is called at ten batch sizes, each its own static-shape graph, after whatever this process compiled before."""
    from torch._dynamo.utils import counters
    from training.speed import compile_network
    class Doubling(torch.nn.Module):
        @networks_edm2.normalizes_weights_by_group
        def forward(self, x):
            return x * 2
    doubling = compile_network(Doubling(), backend='eager', fullgraph=True)
    before = counters['stats']['unique_graphs']
    for batch in range(1, 11):
        assert torch.equal(doubling(torch.ones(batch)), torch.full([batch], 2.0))
    assert counters['stats']['unique_graphs'] == before + 10

def test_compiled_networks_are_cacheable_by_aot_autograd():
    """Every node of each network's traced graph passes AOT autograd's cache check (numpy scalars meeting tensors, and
    our autograd Functions unless compile_network admits them, make it bypass the cache), so a restarted compiled
    run loads its forward and backward graphs instead of tracing them again."""
    cache = pytest.importorskip('torch._functorch._aot_autograd.autograd_cache')
    from training.speed import compile_network
    teacher, nets = teacher_and_students()
    def check_nodes(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            cache.check_node_safe(node)                 # Raises BypassAOTAutogradCache, naming the node's target.
        return graph_module.forward
    previous = torch._functorch.config.autograd_cache_allow_custom_autograd_functions
    try:
        for net in (*nets, teacher):
            compile_network(copy.deepcopy(net), backend=check_nodes)(*explain_inputs(net))
    finally:
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions = previous

class OpNames(TorchDispatchMode):
    """How often each aten operator ran, by name (below autograd: decompositions show as their parts), and how many
    copies (copy_, clone, _to_copy) of each size in elements were made."""

    def __init__(self):
        super().__init__()
        self.names, self.copied_sizes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func.__name__] += 1
        out = func(*args, **(kwargs or {}))
        if func.__name__.split('.')[0] in ('copy_', 'clone', '_to_copy'):
            self.copied_sizes[out.numel()] += 1
        return out

@contextlib.contextmanager
def deterministic_algorithms():
    """torch's deterministic kernels (where an operation has none, a warning), then the previous choice."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])

@pytest.mark.parametrize('device', DEVICES)
def test_flat_gradients_change_no_bit(speed_options, device, monkeypatch):
    """On one rank, gradients kept as views of one buffer per network (flat_gradients) give bitwise the weights of
    per-parameter gradients after two iterations of two accumulation rounds under loss scaling, each phase
    finishing its gradients with one nan_to_num, not one per parameter. CUDA runs deterministic kernels: cuDNN's
    benchmarked or atomic ones differ between two runs of the same iteration (seen on an H200)."""
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', True)
    teacher, nets = teacher_and_students()
    runs = {}
    for flat in (False, True):
        set_speed_options(flat_gradients=flat)
        operations = OpNames()
        with operations, deterministic_algorithms():
            runs[flat] = (operations, one_iteration(teacher, nets, iterations=2, device=device, loss_scaling=8.0))
    (per_parameter, reference), (flat_operations, flat_nets) = runs[False], runs[True]
    for reference_net, flat_net in zip(reference, flat_nets):
        for (name, a), b in zip(reference_net.state_dict().items(), flat_net.state_dict().values()):
            assert torch.equal(a, b), name
    assert flat_operations.names['nan_to_num.out'] == 2 * 3
    assert per_parameter.names['nan_to_num.out'] == 2 * sum(len(list(net.parameters())) for net in nets)

@pytest.mark.parametrize('qkv_blocks', [False, True])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('device', DEVICES)
def test_fused_attention_runs_a_fused_kernel(speed_options, device, channels_last, qkv_blocks):
    """torch's fused attention kernels need unit-stride channels: strided q, k, v silently fall back to the unfused
    math (a softmax over the materialised attention matrix), slower and larger than the einsums it replaces."""
    set_speed_options(fused_attention=True, channels_last=channels_last, qkv_blocks=qkv_blocks)
    edm2 = load_fixture('edm2_precond_small.pt')
    net = Precond(**edm2['config']).to(device)
    ops = OpNames()
    with ops:
        net(edm2['x'].to(device), edm2['sigma'].to(device), edm2['class_labels'].to(device)).sum().backward()
    attention = sorted(name for name in ops.names if 'attention' in name or 'softmax' in name)
    assert attention and all('flash' in name or 'efficient' in name or 'cudnn' in name for name in attention), attention

@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('device', DEVICES)
def test_qkv_blocks_are_attention_without_copies(speed_options, device, channels_last):
    """With the qkv layer's rows reordered as applied (qkv_blocks: channels (q/k/v, head, channel), not EDM2's (head,
    channel, q/k/v)), an attention layer has the values and gradients (input and weight) of EDM2's order, and in NHWC
    memory q, k, v reach attention with no copy of the activations: normalised over unit-stride channels, read as
    views. In NCHW memory the normalisation writes one copy, as in EDM2's order."""
    set_speed_options(fast_pixel_norm=True, fused_attention=True, channels_last=channels_last)
    gen = torch.Generator().manual_seed(0)
    block = networks_edm2.Block(128, 128, 16, attention=True).eval().to(device)         # Two heads of 64 channels.
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 128, 4, 4, generator=gen).to(device).contiguous(memory_format=memory_format)
    upstream = torch.randn(x.shape, generator=gen).to(device)
    results, copies = {}, {}
    for blocks in (False, True):
        set_speed_options(qkv_blocks=blocks)
        source = x.detach().requires_grad_()
        block.zero_grad(set_to_none=True)
        with OpNames() as ops:
            out = block.attention_heads(source)
        (out * upstream).sum().backward()
        results[blocks], copies[blocks] = (out, source.grad, block.attn_qkv.weight.grad), ops.copied_sizes[3 * x.numel()]
    tolerance = dict(rtol=1e-5, atol=1e-6) if device == 'cpu' else dict(rtol=2e-3, atol=2e-3)
    for plain, fast in zip(results[False], results[True]):
        assert torch.allclose(plain, fast, **tolerance)
    assert copies == {False: 1, True: 0 if channels_last else 1}

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('scales, dtype', [([1, 1, 1], torch.float32), ([0.3, 1.7, 0.05], torch.float32), ([0.3, 1.7, 0.05], torch.bfloat16)])
def test_grouped_weight_norm_is_normalize(device, scales, dtype):
    """One GroupNormalize over same-shaped weights (a row of zeros among them) gives each weight's normalize() times
    its scale, cast, bitwise as the per-layer path computes it, and the gradient of the plain formula (autograd in
    float64 as reference; 1/eps on the zero row)."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, 4, 3, 3, generator=gen) for rows in (2, 5, 3)]
    weights[1][2] = 0
    upstream = [torch.randn(weight.shape, generator=gen).to(device, dtype) for weight in weights]
    weights = [weight.to(device).requires_grad_() for weight in weights]
    outputs = GroupNormalize.apply(1e-4, scales, dtype, *weights)
    sum((y * u).sum() for y, u in zip(outputs, upstream)).backward()
    for weight, scale, y, u in zip(weights, scales, outputs, upstream):
        assert torch.equal(y, (networks_edm2.normalize(weight.detach()) * scale).to(dtype))
        weight64 = weight.detach().double().requires_grad_()
        (weight64 / (1e-4 + torch.linalg.vector_norm(weight64, dim=[1, 2, 3], keepdim=True) / 6) * scale * u.double()).sum().backward()
        assert torch.allclose(weight.grad.double(), weight64.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(weights[1].grad[2], upstream[1][2].float() * scales[1] / 1e-4)

@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_grouped_passes_prepare_weights_as_their_layers_apply_them(speed_options, precision):
    """A grouped pass scales (and in bf16 casts) each group's weights at once, in the form its layers applied in the
    pass before (a first pass has none: its layers scale and cast their own): the outputs and gradients of per-layer
    weights (bitwise but for the rounding of learned gains), with fewer multiplications and casts."""
    _teacher, (G, _S, _D) = teacher_and_students()
    set_precision(G, precision)
    inputs = explain_inputs(G)
    results, operations = {}, {}
    for grouped in (False, True):
        set_speed_options(grouped_weight_norm=grouped)
        net = copy.deepcopy(G)
        for counted in (False, True):
            ops = OpNames()
            with ops if counted else contextlib.nullcontext():
                out = net(*inputs)
                out.square().sum().backward()
        results[grouped] = [out] + [param.grad for param in net.parameters() if param.grad is not None]
        operations[grouped] = ops.names
    assert len(results[True]) == len(results[False]) > 50
    for grouped_result, result in zip(results[True], results[False]):
        assert torch.allclose(grouped_result, result, rtol=1e-5, atol=1e-6)
    assert operations[True]['mul.Tensor'] < operations[False]['mul.Tensor']
    assert (operations[True]['_to_copy.default'] < operations[False]['_to_copy.default']) == (precision == 'bf16')
    if precision == 'bf16':                     # Forms that no longer match (float32 now): the layers' own weights.
        set_precision(net, 'fp32')
        set_speed_options(grouped_weight_norm=False)
        reference = copy.deepcopy(net)(*inputs)
        set_speed_options(grouped_weight_norm=True)
        assert torch.allclose(net(*inputs), reference, rtol=1e-5, atol=1e-6)

def test_grouped_weight_norm_normalises_each_level_group_once(speed_options):
    """Under grouped_weight_norm a training pass of G normalises each group of same-shaped layers with one norm and
    keeps no more for its backward pass, and no group spans two UNet levels (a level's gradients are ready as its
    backward pass ends: DDP overlaps them); the projection after a step equals the per-layer one; a constant network
    (cached) is grouped in inference mode only."""
    teacher, (G, _S, _D) = teacher_and_students()
    groups = level_weight_groups(G)
    names = {layer: name for name, layer in G.named_modules()}
    assert groups and all(len(group) > 1 for group in groups)
    for group in groups:
        assert len({names[layer].split('_')[0] for layer in group}) == 1, [names[layer] for layer in group]
        assert len({layer.weight.shape[1:] for layer in group}) == 1          # Rows may differ: concatenated along them.
    norms = {}
    for grouped in (False, True):
        set_speed_options(grouped_weight_norm=grouped)
        ops = OpNames()
        with ops:
            G(*explain_inputs(G)).sum().backward()
        norms[grouped] = ops.names['linalg_vector_norm.default']
    assert norms[False] - norms[True] == sum(len(group) - 1 for group in groups)
    assert saved_mib(G, explain_inputs(G), grouped_weight_norm=True) <= saved_mib(G, explain_inputs(G), grouped_weight_norm=False)
    projected = {}
    for grouped in (False, True):
        set_speed_options(grouped_weight_norm=grouped)
        net = copy.deepcopy(G)
        with torch.no_grad():
            for param in net.parameters():
                param.mul_(torch.rand(param.shape, generator=torch.Generator().manual_seed(3)) + 0.5)
        net.project_()
        projected[grouped] = net.state_dict()
    for name, weight in projected[False].items():
        assert torch.allclose(projected[True][name], weight, rtol=1e-6, atol=1e-7), name
    assert not level_weight_groups(teacher)
    with torch.inference_mode():
        assert level_weight_groups(teacher)
