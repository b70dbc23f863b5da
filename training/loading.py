"""Loading networks given by path or URL: EDM2/NCVSD pickles (and weights-only exports)."""

import pickle

import torch

import dnnlib
from dnnlib.util import UserError
from training.networks_ncvsd import is_generative_denoiser

def load_network_data(path_or_url, verbose=True):
    """The pickled dict of a snapshot (keys ema, encoder, ...) as an EasyDict."""
    if verbose:
        print(f'Loading network from {path_or_url} ...', flush=True)
    with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
        head = f.read(2)
        f.seek(0)
        if head == b'PK':      # A zip file: torch.save output, i.e. our weights-only export.
            from training.export import load_exported
            return load_exported(f)
        try:
            data = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as err:
            raise UserError(f'{path_or_url} is not a network pickle ({type(err).__name__}: {err})')
    if isinstance(data, torch.nn.Module):
        data = dict(ema=data)
    if not isinstance(data, dict) or 'ema' not in data:
        raise UserError(f'{path_or_url} holds no network (expected a dict with key "ema", as EDM2 and NCVSD snapshots do)')
    return dnnlib.EasyDict(data)

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
    """float32 copy in eval mode without gradients (published checkpoints store float16)."""
    return net.to(torch.float32).eval().requires_grad_(False).to(device)
