"""Power-function EMA (Karras et al. 2024) and post-hoc reconstruction of new EMA lengths."""

import copy
import os
import pickle
import re
import sys

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError

def exp_to_std(exp):
    """Relative standard deviation of the power-function EMA profile t^γ."""
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))

def std_to_exp(std):
    """Inverse of exp_to_std: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)."""
    std = np.float64(std)
    inv_var = std.flatten() ** -2
    exps = [np.roots([1, 7, 16 - v, 12 - v]).real.max() for v in inv_var]
    return np.float64(exps).reshape(std.shape)

MAX_STD = float(exp_to_std((np.sqrt(5) - 3) / 2))   # The widest profile (~0.3003): d std/dγ = 0 at γ = (√5 − 3)/2.

def check_std(std, option):
    """A UserError naming `option` ('--outstd', the preset key 'ema_stds') unless std is that of a power-function EMA."""
    if not 0 < std <= MAX_STD:
        raise UserError(f'{option}={std}: the std of a power-function EMA lies in (0, {MAX_STD:.4f}]; e.g. 0.05 or 0.1')

def ema_decay(std, cur_nimg, step_nimg):
    """Decay β of the power-function EMA for a step of step_nimg images that ends at cur_nimg."""
    return (1 - step_nimg / cur_nimg) ** (std_to_exp(std) + 1)

class PowerFunctionEMA:
    """One averaged copy of `net` per relative std; the copies' buffers are refreshed from the live network."""

    def __init__(self, net, stds=(0.050, 0.100)):
        self.net = net
        self.stds = list(stds)
        for std in self.stds:
            check_std(std, 'ema_stds')
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _std in self.stds]

    def _pairs(self, ema, what='parameters'):
        return zip(getattr(self.net, what)(), getattr(ema, what)())

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        for std, ema in zip(self.stds, self.emas):
            weight = 1 - float(ema_decay(std, cur_nimg, batch_size))
            lives, averages = zip(*self._pairs(ema))
            torch._foreach_lerp_(list(averages), [live.detach() for live in lives], weight)

    @torch.no_grad()
    def get(self):
        """[(ema network, suffix like '-0.050')], buffers copied from the live network."""
        for ema in self.emas:
            for live, copied in self._pairs(ema, 'buffers'):
                copied.copy_(live)
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        return dict(stds=self.stds, emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        self.stds = list(state['stds'])
        for ema, saved in zip(self.emas, state['emas']):
            ema.load_state_dict(saved)

#----------------------------------------------------------------------------
# Post-hoc reconstruction: the EMA profile of a new std as a least-squares mix of saved profiles.

def profile_overlap(t_a, std_a, t_b, std_b):
    """∫ p_a(t)·p_b(t) dt of two EMA profiles p(t) = (γ+1)·t^γ / T^(γ+1) on [0, T], T = t_a or t_b (closed form)."""
    exp_a, exp_b = std_to_exp(std_a), std_to_exp(std_b)
    later_exp = np.where(t_a < t_b, exp_b, -exp_a)                # The profile that ends later sets the power.
    return (exp_a + 1) * (exp_b + 1) * (t_a / t_b) ** later_exp / ((exp_a + exp_b + 1) * np.maximum(t_a, t_b))

def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """[num_in, num_out] coefficients that mix the saved EMA profiles into the requested ones: the least-squares fit,
    scaled to sum to 1 as EDM2 does, so that each result is an average of the saved weights (profiles have unit mass)."""
    gram, target, _wanted_norm = profile_products(in_ofs, in_std, out_ofs, out_std)
    coefficients = np.linalg.lstsq(gram, target, rcond=None)[0]
    return coefficients / coefficients.sum(axis=0, keepdims=True)

def profile_fit_error(in_ofs, in_std, out_ofs, out_std, coefficients):
    """[num_out] relative L2 distance ‖Σ c_i p_i − p_out‖ / ‖p_out‖ between each mixed profile and the requested one."""
    gram, target, wanted_norm = profile_products(in_ofs, in_std, out_ofs, out_std)
    squared = wanted_norm - 2 * (coefficients * target).sum(axis=0) + (coefficients * (gram @ coefficients)).sum(axis=0)
    return np.sqrt(np.maximum(squared, 0) / wanted_norm)

def profile_products(in_ofs, in_std, out_ofs, out_std):
    """(saved × saved [num_in, num_in], saved × requested [num_in, num_out], requested × itself [num_out]) overlaps."""
    as_column = lambda values: np.float64(values).reshape(-1, 1)
    as_row = lambda values: np.float64(values).reshape(1, -1)
    saved_t, saved_std = np.broadcast_arrays(in_ofs, in_std)
    wanted_t, wanted_std = np.broadcast_arrays(out_ofs, out_std)
    gram = profile_overlap(as_column(saved_t), as_column(saved_std), as_row(saved_t), as_row(saved_std))
    target = profile_overlap(as_column(saved_t), as_column(saved_std), as_row(wanted_t), as_row(wanted_std))
    return gram, target, profile_overlap(wanted_t, wanted_std, wanted_t, wanted_std).reshape(-1)

def list_snapshots(indir):
    """[(kimg, std, path)] of the network-snapshot-<kimg>-<std>.pkl files in `indir`."""
    found = []
    for name in sorted(os.listdir(indir)) if os.path.isdir(indir) else []:
        m = re.fullmatch(rf'network-snapshot-({dnnlib.util.STAMP_PATTERN})-(\d+\.\d+)\.pkl', name)
        if m:
            found.append((float(m.group(1)), float(m.group(2)), os.path.join(indir, name)))
    if not found:
        raise UserError(f'no network-snapshot-<kimg>-<std>.pkl files in {indir}')
    return found

def check_out_kimg(times, out_kimg, indir):
    """The training length to reconstruct at: `out_kimg` if a snapshot was taken then, by default the latest."""
    if out_kimg is None:
        return times[-1]
    if out_kimg > times[-1]:
        raise UserError(f'--outkimg={out_kimg} lies past the latest snapshot ({times[-1]:g} kimg) in {indir}: '
            'an average over images not yet trained on cannot be reconstructed; leave --outkimg out for the latest')
    if out_kimg not in times:                   # The images since the snapshot before it were never averaged.
        raise UserError(f'--outkimg={out_kimg}: no snapshot was taken at {out_kimg} kimg in {indir}; choose one of '
            f'{", ".join(f"{kimg:g}" for kimg in times)}')
    return out_kimg

@torch.no_grad()
def reconstruct(indir, outdir, out_stds, out_kimg=None, verbose=True):
    """Post-hoc EMA: write network-snapshot-<kimg>-<std>.pkl for each requested std, as least-squares
    combinations of the saved power-function EMA snapshots (Karras et al. 2024). Returns the paths."""
    from training.network_io import load_network_data
    for std in out_stds:
        check_std(std, '--outstd')
    everything = list_snapshots(indir)
    out_kimg = check_out_kimg(sorted({kimg for kimg, _std, _path in everything}), out_kimg, indir)
    snapshots = [s for s in everything if s[0] <= out_kimg]
    dnnlib.util.check_output_folder(outdir, f'--outdir={outdir}')
    in_ofs = np.array([s[0] for s in snapshots], dtype=np.float64)
    in_std = np.array([s[1] for s in snapshots], dtype=np.float64)
    out_ofs, out_std = np.full(len(out_stds), float(out_kimg)), np.array(out_stds, dtype=np.float64)
    coefs = solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std)
    fit_errors = profile_fit_error(in_ofs, in_std, out_ofs, out_std, coefs)
    outputs = [None] * len(out_stds)
    paths = []
    for (kimg, std, path), row in zip(snapshots, coefs):
        if verbose:
            print(f'Reading {path} ...', flush=True)
        data = load_network_data(path, verbose=False)
        params = [p.to(torch.float64) for p in data['ema'].parameters()]
        for j, coef in enumerate(row):
            if outputs[j] is None:
                outputs[j] = (data, [torch.zeros_like(p) for p in params])
            for acc, p in zip(outputs[j][1], params):
                acc.add_(p, alpha=float(coef))
    dnnlib.util.make_output_folder(outdir, f'--outdir={outdir}')
    for (data, sums), std, fit_error in zip(outputs, out_stds, fit_errors):
        result = copy.deepcopy(data)
        for param, value in zip(result['ema'].parameters(), sums):
            param.copy_(value.to(param.dtype))
        out_nimg = round(out_kimg * 1000)
        path = os.path.join(outdir, f'network-snapshot-{dnnlib.util.nimg_stamp(out_nimg, out_nimg % 1000 != 0)}-{std:.3f}.pkl')
        with dnnlib.util.atomic_file(path) as f:
            pickle.dump(result, f)
        paths.append(path)
        if verbose:
            print(f'Wrote {path} (its EMA profile fitted to within {fit_error:.1%}, relative L2)')
    return paths

def main(argv):
    import click

    @click.command()
    @click.option('--indir', help='Folder with network-snapshot-<kimg>-<std>.pkl files', metavar='DIR', required=True)
    @click.option('--outdir', help='Where to write the reconstructions', metavar='DIR', required=True)
    @click.option('--outstd', help='EMA stds to reconstruct, e.g. 0.03,0.08', metavar='LIST', required=True)
    @click.option('--outkimg', help='Training length to reconstruct at (default: the latest snapshot)', metavar='KIMG', type=int)
    def cli(indir, outdir, outstd, outkimg):
        """Post-hoc EMA reconstruction from power-function EMA snapshots."""
        try:
            stds = [float(s) for s in outstd.split(',')]
        except ValueError:
            raise click.BadParameter(f'{outstd} is not a list of numbers', param_hint='--outstd')
        dnnlib.util.run_cli(reconstruct, indir, outdir, stds, outkimg)
    cli(argv)

if __name__ == '__main__':
    main(sys.argv[1:])
