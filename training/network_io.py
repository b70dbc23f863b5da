"""Networks from a path or URL, and back to a file.

One entry point, load_network(): an EDM2 teacher pickle, an NCVSD snapshot or released checkpoint, or a
weights-only export, made ready to sample with (role='sampling') or to distill from (role='teacher').
Weights-only exports (state dict + constructor arguments, loadable with weights_only=True) are written by

    python -m training.network_io export network-snapshot-0004096-0.050.pkl student.pt

and every CLI's --net accepts them: students can be shared without executing pickled code.
"""

import os
import pickle

import click
import torch

import dnnlib
from dnnlib.util import UserError
from training.encoders import StandardRGBEncoder, StabilityVAEEncoder
from training.networks_edm2 import Precond, set_precision, network_precision, mark_constant, computes_natively
from training.networks_ncvsd import GenerativeDenoiser, is_generative_denoiser
from training import speed

EXPORT_FORMAT = 'ncvsd-export-v1'
EXPORTABLE_NETWORKS = {                          # Class name in an export -> our implementation.
    'Precond': 'training.networks_edm2.Precond',
    'ConditionalPrecond': 'training.networks_ncvsd.ConditionalPrecond',
    'MixtureDenoiser': 'training.analytic.MixtureDenoiser',
}
EXPORTABLE_ENCODERS = {
    'StandardRGBEncoder': 'training.encoders.StandardRGBEncoder',
    'StabilityVAEEncoder': 'training.encoders.StabilityVAEEncoder',
    'IdentityEncoder': 'training.encoders.IdentityEncoder',
}

#----------------------------------------------------------------------------
# Reading.

def load_network(path_or_url, device, role='sampling', vae=None, precision=None, compile_backend=None, verbose=True):
    """(network, encoder or None) from a file or URL.

    role='sampling': any image network, float32, eval mode, on `device`, with its encoder initialised there
    (`vae` replaces the VAE of a latent-space network's encoder; `precision` fp32/fp16/bf16 replaces the stored
    choice of the UNet bodies' dtype, fp16 only on CUDA (a stored fp16 computes in float32 elsewhere);
    `compile_backend` wraps the network in torch.compile, compiled at its first call; the speed options are set as
    `device` measures best, as for training). role='teacher': an EDM2 diffusion network as stored (the training loop
    freezes it on its device); the encoder is the file's own, None if it has none.
    """
    if precision == 'fp16' and device.type != 'cuda':
        refuse_float16(device, '--precision=fp16')
    data = load_network_data(path_or_url, verbose=verbose)
    net = as_our_precond(data['ema'], verbose)
    check_finite_weights(net, path_or_url)
    if role == 'teacher':
        return check_diffusion_network(net, path_or_url), data.get('encoder', None)
    if not hasattr(net, 'img_resolution'):
        raise UserError(f'{path_or_url} holds no image network')
    encoder = data.get('encoder', None) or StandardRGBEncoder()
    if vae is not None:
        if not hasattr(encoder, 'vae_name'):
            raise UserError(f'--vae was given but {path_or_url} is not a latent-space network; drop --vae')
        encoder = StabilityVAEEncoder(vae_name=vae)
    encoder.init(device)
    if precision is not None:
        set_precision(net, precision)
    body = net.model if is_generative_denoiser(net) else net
    body_precision = network_precision(body) if hasattr(body, 'use_fp16') else 'fp32'
    speed.use_device_defaults(device, compiled=compile_backend == 'inductor', precision=body_precision)
    note = emulated_precision_note(body_precision, device)
    if verbose and note:
        print(note, flush=True)
    net = prepare_frozen(net, device)
    if compile_backend is not None and is_generative_denoiser(net):
        net.model = speed.compile_network(net.model, backend=compile_backend)
    elif compile_backend is not None:
        net = speed.compile_network(net, backend=compile_backend)
    return net, encoder

def refuse_float16(device, given):
    """An explicit float16 request (`given`: the option as typed) off CUDA, where it would compute in float32: an error
    suggesting bf16 only where the device computes it natively."""
    alternative = ', or use --precision=bf16' if computes_natively('bf16', device) else ''
    raise UserError(f'{given} needs CUDA but this run is on {device.type}; drop it{alternative} '
        f'(on {device.type} the networks otherwise compute in float32)')

def emulated_precision_note(precision, device):
    """A one-line note where `device` has no arithmetic units for `precision` (it computes correctly, only slowly),
    else None."""
    if computes_natively(precision, device):
        return None
    return (f'Note: bfloat16 (--precision=bf16) is emulated on this {device.type} (native bfloat16 needs AVX-512 BF16 or AMX on a CPU, '
        'compute capability 8.0 on a GPU), several times slower than fp32 (bench-a on an AVX2 CPU: training step 7x, '
        'sampling 4-5x); use --precision=fp32')

def load_network_data(path_or_url, verbose=True):
    """The stored dict of a snapshot (keys ema, encoder, ...) as an EasyDict; pickles and exports alike."""
    if verbose:
        print(f'Loading network from {path_or_url} ...', flush=True)
    with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
        is_zip = f.read(2) == b'PK'                  # torch.save writes zip files: a weights-only export.
        f.seek(0)
        if is_zip:
            return load_exported(f, path_or_url)
        try:
            data = pickle.load(f)
        except Exception as err:                    # Unpickling a damaged or foreign file can raise almost anything.
            raise UserError(f'{path_or_url} is not a network pickle ({dnnlib.util.error_summary(err)}); '
                'pass a snapshot .pkl, an EDM2 teacher pickle or an export .pt')
    if isinstance(data, torch.nn.Module):
        data = dict(ema=data)
    if not isinstance(data, dict) or 'ema' not in data:
        raise UserError(f'{path_or_url} holds no network (expected a dict with key "ema", as EDM2 and NCVSD snapshots do)')
    return dnnlib.EasyDict(data)

def as_our_precond(net, verbose=True):
    """An EDM2 Precond as unpickled (running the source embedded in its pickle) rebuilt as our Precond from
    the same constructor arguments and weights, so that our speed options reach it; other networks as they are."""
    if type(net).__name__ != 'Precond' or type(net) is Precond or not hasattr(net, 'init_kwargs'):
        return net
    try:
        ours = Precond(*net.init_args, **net.init_kwargs)
        ours.load_state_dict(net.state_dict())
    except (TypeError, RuntimeError) as err:
        if verbose:
            print(f'Note: the network runs on the code in its pickle; it does not fit our Precond ({type(err).__name__}: {err})')
        return net
    return ours.to(next(net.parameters()).dtype).train(net.training)

def check_finite_weights(net, path_or_url):
    """Weights holding NaN or Inf (a diverged run's snapshot) would sample black images silently: refuse them."""
    tensors = net.state_dict().items() if isinstance(net, torch.nn.Module) else ()
    broken = [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise UserError(f'{path_or_url} holds non-finite weights (NaN or Inf in {len(broken)} tensor(s), the first {broken[0]}); '
            'the run that wrote it diverged: use an earlier snapshot')

def check_diffusion_network(net, path_or_url):
    """A teacher must be a Precond-like denoiser with the attributes the students copy."""
    missing = [name for name in ('img_resolution', 'img_channels', 'label_dim') if not hasattr(net, name)]
    if missing or not isinstance(net, torch.nn.Module):
        raise UserError(f'{path_or_url} is not a diffusion network (missing {", ".join(missing) or "torch.nn.Module"}); '
            'give an EDM2 teacher pickle such as edm2-img64-s-1073741-0.075.pkl')
    if is_generative_denoiser(net):
        raise UserError(f'{path_or_url} holds an NCVSD generative denoiser, not a diffusion teacher; give the EDM2 teacher pickle')
    return net

def prepare_frozen(net, device):
    """float32 copy in eval mode without gradients (published checkpoints store float16), marked constant: a teacher
    or a network loaded for sampling never trains, so its normalised weights can be kept (CACHE_CONSTANT_WEIGHTS).
    It runs on batches of one shape, so cuDNN may time its kernels once and keep the fastest (process-wide, as the
    training loop sets it; no effect off CUDA): sampling runs as bench/sample.py times it."""
    torch.backends.cudnn.benchmark = True
    return mark_constant(net.to(torch.float32).eval().requires_grad_(False).to(device))

#----------------------------------------------------------------------------
# Weights-only exports.

def _class_record(obj, known, what):
    name = type(obj).__name__
    if name not in known or not hasattr(obj, 'init_kwargs'):
        raise UserError(f'cannot export a {what} of class {name}; known: {", ".join(known)}')
    return dict(class_name=name, init_args=list(obj.init_args), init_kwargs=dict(obj.init_kwargs))

def _construct(record, known):
    return dnnlib.util.construct_class_by_name(*record['init_args'], class_name=known[record['class_name']], **record['init_kwargs'])

def export_network(data):
    """The exportable dict of a loaded snapshot (keys ema, encoder)."""
    net, wrapper = data['ema'], None
    if is_generative_denoiser(net):
        net, wrapper = net.model, dict(gamma=float(net.gamma), init_sigma=float(net.init_sigma))
    export = dict(format=EXPORT_FORMAT, network=_class_record(net, EXPORTABLE_NETWORKS, 'network'), generative_denoiser=wrapper,
        state_dict={name: value.detach().cpu() for name, value in net.state_dict().items()})
    if hasattr(net, 'use_fp16'):
        export['precision'] = network_precision(net)           # bf16 is not a constructor argument.
    if data.get('encoder') is not None:
        export['encoder'] = _class_record(data['encoder'], EXPORTABLE_ENCODERS, 'encoder')
    return export

def load_exported(f, name='the file'):
    """EasyDict(ema=..., encoder=...) from an export (`name` in errors), built from our own classes only."""
    try:
        export = torch.load(f, map_location='cpu', weights_only=True)
    except Exception as err:
        raise UserError(f'{name} is not a weights-only network file ({dnnlib.util.error_summary(err)})')
    if isinstance(export, dict) and {'state', 'G', 'ema'} <= set(export):          # torch_utils.distributed.CheckpointIO's.
        raise UserError(f'{name} is a training-state checkpoint, for resuming its run; pass one of the run\'s '
            'network-snapshot-*.pkl files')
    if not isinstance(export, dict) or export.get('format') != EXPORT_FORMAT:
        raise UserError(f'{name} is not an NCVSD export (expected format {EXPORT_FORMAT}); make one with python -m training.network_io export')
    net = _construct(export['network'], EXPORTABLE_NETWORKS)
    net.load_state_dict(export['state_dict'])
    if 'precision' in export:
        set_precision(net, export['precision'])
    if export.get('generative_denoiser') is not None:
        net = GenerativeDenoiser(net, **export['generative_denoiser'])
    encoder = _construct(export['encoder'], EXPORTABLE_ENCODERS) if export.get('encoder') is not None else None
    return dnnlib.EasyDict(ema=net.eval(), encoder=encoder)

def write_export(snapshot, out):
    dnnlib.util.check_output_folder(os.path.dirname(out), f'OUT.pt={out}')
    export = export_network(load_network_data(snapshot))
    dnnlib.util.make_output_folder(os.path.dirname(out), f'OUT.pt={out}')
    with dnnlib.util.atomic_file(out) as f:
        torch.save(export, f)
    print(f'Wrote {out} ({export["network"]["class_name"]}, {len(export["state_dict"])} tensors)')

@click.group()
def main():
    """Network files: python -m training.network_io export SNAPSHOT.pkl OUT.pt"""

@main.command()
@click.argument('snapshot', metavar='SNAPSHOT.pkl')
@click.argument('out', metavar='OUT.pt')
def export(snapshot, out):
    """Write the weights-only file OUT.pt of the network in SNAPSHOT.pkl (path or URL)."""
    dnnlib.util.run_cli(write_export, snapshot, out)

if __name__ == '__main__':
    main()
