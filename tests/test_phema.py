import numpy as np
import pytest
import scipy.integrate

from dnnlib.util import UserError
from training.phema import exp_to_std, std_to_exp, profile_overlap, solve_posthoc_coefficients, PowerFunctionEMA, MAX_STD, reconstruct

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

def test_ema_update_tracks_the_network():
    import torch
    net = torch.nn.Linear(2, 2)
    ema = PowerFunctionEMA(net, stds=[0.05])
    with torch.no_grad():
        net.weight.fill_(1.0)
    for step in range(1, 200):
        ema.update(cur_nimg=step * 10, batch_size=10)
    assert torch.allclose(ema.get()[0][0].weight, torch.ones(2, 2), atol=1e-3)
