import numpy as np
import pytest
import scipy.integrate

from dnnlib.util import UserError
from training.phema import (exp_to_std, std_to_exp, profile_overlap, solve_posthoc_coefficients, profile_fit_error,
    PowerFunctionEMA, MAX_STD, reconstruct)

def test_std_exp_inverse():
    for std in (0.01, 0.05, 0.1, 0.2):
        assert exp_to_std(std_to_exp(std)) == pytest.approx(std, rel=1e-9)

def test_the_widest_profile_bounds_the_std():
    exps = np.linspace(-0.999, 10, 100001)
    assert float(exp_to_std(exps).max()) == pytest.approx(MAX_STD, rel=1e-9) and MAX_STD == pytest.approx(0.3003, abs=1e-4)
    assert exp_to_std(std_to_exp(0.295)) == pytest.approx(0.295, rel=1e-9)     # Above 1/sqrt(12): γ < 0, still a profile.

@pytest.mark.parametrize('stds, kimg, message', [
    ([-1.0], None, r'--outstd=-1.0: the std of a power-function EMA lies in \(0, 0.3003\]'),     # Was written as "--1.000".
    ([0.05, 0.31], None, '--outstd=0.31'),
    ([0.05], 9999, r'--outkimg=9999 lies past the latest snapshot \(64 kimg\)'),                  # Was extrapolated.
    ([0.05], 48, '--outkimg=48: no snapshot was taken at 48 kimg .* choose one of 32, 64'),        # Was fitted from 32 alone.
    ([0.05], None, 'is a file, not a folder'),
])
def test_reconstruction_refuses_what_it_cannot_make_before_reading(tmp_path, stds, kimg, message):
    for name in ('network-snapshot-0000032-0.050.pkl', 'network-snapshot-0000064-0.050.pkl'):
        (tmp_path / name).write_bytes(b'')                  # Names only: every refusal comes before a file is read.
    outdir = tmp_path / 'out'
    if message.startswith('is a file'):
        outdir.write_text('x')
    with pytest.raises(UserError, match=message):
        reconstruct(str(tmp_path), str(outdir), stds, out_kimg=kimg, verbose=False)

def test_a_preset_std_outside_the_range_is_refused():
    import torch
    with pytest.raises(UserError, match='ema_stds=0.5: the std of a power-function EMA'):     # Its decay was 1.007: diverging.
        PowerFunctionEMA(torch.nn.Linear(2, 2), stds=[0.05, 0.5])

def test_correlation_matches_numerical_integral():
    def profile(t, ofs, std):
        exp = std_to_exp(std)
        return np.where(t <= ofs, (exp + 1) * t ** exp / ofs ** (exp + 1), 0)
    for (a_ofs, a_std, b_ofs, b_std) in [(100, 0.05, 100, 0.1), (60, 0.1, 100, 0.05), (100, 0.03, 40, 0.15)]:
        numeric = scipy.integrate.quad(lambda t: profile(t, a_ofs, a_std) * profile(t, b_ofs, b_std), 0, max(a_ofs, b_ofs), limit=200)[0]
        assert float(profile_overlap(a_ofs, a_std, b_ofs, b_std)) == pytest.approx(numeric, rel=1e-5)

def test_reconstruction_of_a_saved_profile_is_that_profile():
    in_ofs = np.array([50, 50, 100, 100], dtype=float)
    in_std = np.array([0.05, 0.1, 0.05, 0.1])
    coefs = solve_posthoc_coefficients(in_ofs, in_std, np.array([100.0]), np.array([0.1]))
    assert np.allclose(coefs[:, 0], [0, 0, 0, 1], atol=1e-6)

def test_reconstruction_averages_the_saved_weights(tmp_path):
    """Snapshots that all hold the same weights reconstruct to those weights, for any std. The least-squares mix was not
    scaled to sum to 1: at the toy's snapshots it gave 0.93× the weights for std 0.03 (EDM2 scales it)."""
    import pickle
    import torch
    net = torch.nn.Linear(3, 2)
    for kimg in (4, 8, 12, 16):
        for std in (0.05, 0.1):
            with open(tmp_path / f'network-snapshot-{kimg:07d}-{std:.3f}.pkl', 'wb') as f:
                pickle.dump(dict(ema=net), f)
    for path in reconstruct(str(tmp_path), str(tmp_path / 'out'), [0.03, 0.08, 0.2], verbose=False):
        with open(path, 'rb') as f:
            rebuilt = pickle.load(f)['ema']
        assert torch.allclose(rebuilt.weight, net.weight, rtol=1e-6, atol=0) and torch.allclose(rebuilt.bias, net.bias, rtol=1e-6, atol=0)

def test_profile_fit_error_matches_numerical_integral():
    def profile(t, ofs, std):
        exp = std_to_exp(std)
        return np.where(t <= ofs, (exp + 1) * t ** exp / ofs ** (exp + 1), 0)
    in_ofs, in_std = np.array([40.0, 40.0, 100.0, 100.0]), np.array([0.05, 0.1, 0.05, 0.1])
    out_ofs, out_std = np.array([100.0, 100.0, 100.0]), np.array([0.03, 0.1, 0.2])
    coefs = solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std)
    errors = profile_fit_error(in_ofs, in_std, out_ofs, out_std, coefs)
    for j in range(len(out_std)):
        mixed = lambda t: sum(c * profile(t, ofs, std) for c, ofs, std in zip(coefs[:, j], in_ofs, in_std))
        squared = scipy.integrate.quad(lambda t: (mixed(t) - profile(t, out_ofs[j], out_std[j])) ** 2, 0, 100, points=[40], limit=400)[0]
        norm = scipy.integrate.quad(lambda t: profile(t, out_ofs[j], out_std[j]) ** 2, 0, 100, limit=400)[0]
        assert errors[j] == pytest.approx(np.sqrt(squared / norm), rel=1e-4, abs=1e-6)
    assert errors[1] < 1e-6 and errors[0] > 0.01                 # A saved profile is exact; a narrower one is not.

def test_ema_update_tracks_the_network():
    import torch
    net = torch.nn.Linear(2, 2)
    ema = PowerFunctionEMA(net, stds=[0.05])
    with torch.no_grad():
        net.weight.fill_(1.0)
    for step in range(1, 200):
        ema.update(cur_nimg=step * 10, batch_size=10)
    assert torch.allclose(ema.get()[0][0].weight, torch.ones(2, 2), atol=1e-3)
