import numpy as np
import pytest
import scipy.integrate

from training.phema import exp_to_std, std_to_exp, profile_overlap, solve_posthoc_coefficients, PowerFunctionEMA

def test_std_exp_inverse():
    for std in (0.01, 0.05, 0.1, 0.2):
        assert exp_to_std(std_to_exp(std)) == pytest.approx(std, rel=1e-9)

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
