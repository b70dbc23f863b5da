"""Weights-only network files: state dict + constructor arguments, loadable with weights_only=True.

    python -m training.export network-snapshot-0004096-0.050.pkl student.pt

Every CLI's --net accepts the result: students can be shared without executing pickled code.
"""

import os

import click
import torch

import dnnlib
from dnnlib.util import UserError
from training.networks_ncvsd import is_generative_denoiser

FORMAT = 'ncvsd-export-v1'
NETWORK_CLASSES = {                              # Class name in the file -> our implementation.
    'Precond': 'training.networks_edm2.Precond',
    'ConditionalPrecond': 'training.networks_ncvsd.ConditionalPrecond',
    'MixtureDenoiser': 'training.analytic.MixtureDenoiser',
}
ENCODER_CLASSES = {
    'StandardRGBEncoder': 'training.encoders.StandardRGBEncoder',
    'StabilityVAEEncoder': 'training.encoders.StabilityVAEEncoder',
    'IdentityEncoder': 'training.encoders.IdentityEncoder',
}

def _describe(obj, known, what):
    name = type(obj).__name__
    if name not in known or not hasattr(obj, 'init_kwargs'):
        raise UserError(f'cannot export a {what} of class {name}; known: {", ".join(known)}')
    return dict(class_name=name, init_args=list(obj.init_args), init_kwargs=dict(obj.init_kwargs))

def export_network(data):
    """The exportable dict of a loaded snapshot (keys ema, encoder)."""
    net = data['ema']
    wrapper = None
    if is_generative_denoiser(net):
        wrapper = dict(gamma=float(net.gamma), init_sigma=float(net.init_sigma))
        net = net.model
    export = dict(format=FORMAT, network=_describe(net, NETWORK_CLASSES, 'network'), generative_denoiser=wrapper,
        state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()})
    if data.get('encoder') is not None:
        export['encoder'] = _describe(data['encoder'], ENCODER_CLASSES, 'encoder')
    return export

def load_exported(f):
    """An EasyDict(ema=..., encoder=...) from an export, built from our own classes only."""
    try:
        export = torch.load(f, map_location='cpu', weights_only=True)
    except Exception as err:
        raise UserError(f'not a weights-only network file ({type(err).__name__}: {err})')
    if not isinstance(export, dict) or export.get('format') != FORMAT:
        raise UserError(f'not an NCVSD export (expected format {FORMAT}); make one with python -m training.export')
    spec = export['network']
    net = dnnlib.util.construct_class_by_name(*spec['init_args'], class_name=NETWORK_CLASSES[spec['class_name']], **spec['init_kwargs'])
    net.load_state_dict(export['state_dict'])
    if export.get('generative_denoiser') is not None:
        from training.networks_ncvsd import GenerativeDenoiser
        net = GenerativeDenoiser(net, **export['generative_denoiser'])
    encoder = None
    if export.get('encoder') is not None:
        enc = export['encoder']
        encoder = dnnlib.util.construct_class_by_name(*enc['init_args'], class_name=ENCODER_CLASSES[enc['class_name']], **enc['init_kwargs'])
    return dnnlib.EasyDict(ema=net.eval(), encoder=encoder)

@click.command()
@click.argument('snapshot', metavar='SNAPSHOT.pkl')
@click.argument('out', metavar='OUT.pt')
def main(snapshot, out):
    """Write the weights-only file OUT.pt of the network in SNAPSHOT.pkl (path or URL)."""
    def export_to_file():
        from training.loading import load_network_data
        export = export_network(load_network_data(snapshot))
        torch.save(export, out + '.tmp')
        os.replace(out + '.tmp', out)
        print(f'Wrote {out} ({export["network"]["class_name"]}, {len(export["state_dict"])} tensors)')
    dnnlib.util.run_cli(export_to_file)

if __name__ == '__main__':
    main()
