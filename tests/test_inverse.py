import json
import os
import pickle
import re

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from conftest import run_python, load_fixture, DEVICES, ROOT
from dnnlib.util import UserError
from evaluation import image_quality
from inverse.operators import get_operator, Inpainting, ula_likelihood_step, motion_kernel
from inverse.pnp import pnp_gd
from inverse import solve
from training.analytic import GaussianMixture

LINEAR = [('box_inpainting', {}), ('gaussian_deblur_circ', dict(kernel_size=5, intensity=1.0)),
    ('motion_deblur_circ', dict(kernel_size=7, intensity=0.5)), ('super_resolution', dict(scale_factor=2))]

def gaussian_posterior(A, x, y, sigma_y, rho):
    """Mean and covariance of exp(−‖Au − y‖²/(2σ_y²) − ‖u − x‖²/(2ρ²)) from the dense matrix."""
    precision = torch.eye(A.shape[1], dtype=torch.float64) / rho ** 2 + A.T @ A / sigma_y ** 2
    cov = torch.linalg.inv(precision)
    return cov @ (x.flatten() / rho ** 2 + A.T @ y.flatten() / sigma_y ** 2), cov

@pytest.mark.parametrize('name, kwargs', LINEAR)
def test_transpose_is_the_adjoint(name, kwargs):
    op = get_operator(name, img_size=8, channels=2, **kwargs)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    y = torch.randn_like(op.forward(x))
    assert torch.allclose((op.forward(x) * y).sum(), (x * op.transpose(y)).sum(), rtol=1e-10)

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name, kwargs', LINEAR)
def test_likelihood_step_against_brute_force(name, kwargs, device):
    op = get_operator(name, img_size=8, channels=1, **kwargs)
    A = op.matrix()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=gen)
    y = torch.randn(op.forward(x).shape, dtype=torch.float64, generator=gen)
    sigma_y, rho, n = 0.3, 0.5, 20000
    mean, cov = gaussian_posterior(A, x, y, sigma_y, rho)
    x_n, y_n = x.expand(n, -1, -1, -1).to(device), y.expand(n, *y.shape[1:]).to(device)
    samples = op.likelihood_step(x_n, y_n, sigma_y, rho, generator=torch.Generator(device).manual_seed(1))
    assert samples.device.type == device
    samples = samples.cpu().reshape(n, -1)
    tolerance = 5 * (cov.diagonal().max() / n) ** 0.5
    assert (samples.mean(0) - mean).abs().max() < tolerance
    assert (torch.cov(samples.T) - cov).abs().max() < 0.05 * cov.abs().max()

def test_ula_matches_the_closed_form_on_a_linear_operator():
    op = get_operator('box_inpainting', img_size=4, channels=1)
    A = op.matrix()
    x, y = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    mean, cov = gaussian_posterior(A, x, y, 0.5, 0.5)
    n = 4000
    samples = ula_likelihood_step(op, x.expand(n, -1, -1, -1), y.expand(n, -1, -1, -1), 0.5, 0.5, steps=200, step_scale=0.1).reshape(n, -1)
    assert (samples.mean(0) - mean).abs().max() < 0.05
    assert (samples.var(0) - cov.diagonal()).abs().max() < 0.1 * cov.diagonal().max()

def test_phase_retrieval_forward_and_ula_reduce_the_misfit():
    op = get_operator('phase_retrieval', img_size=8, channels=1)
    assert op.pad == 4 and op.forward(torch.zeros(1, 1, 8, 8)).shape == (1, 1, 16, 16)
    truth = torch.rand(1, 1, 8, 8) * 2 - 1
    y = op.forward(truth)
    start = torch.zeros(1, 1, 8, 8)
    u = op.likelihood_step(start, y, 0.05, 1.0, generator=torch.Generator().manual_seed(0))
    assert (op.forward(u) - y).norm() < 0.5 * (op.forward(start) - y).norm()

def test_operator_shapes_and_errors():
    assert get_operator('box_inpainting', img_size=256).mask[0].eq(0).sum() == 128 * 128
    assert get_operator('super_resolution', img_size=64).forward(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 16, 16)
    kernel = motion_kernel(61, 0.5, seed=3)
    assert kernel.shape == (61, 61) and abs(float(kernel.sum()) - 1) < 1e-5 and torch.equal(kernel, motion_kernel(61, 0.5, seed=3))
    with pytest.raises(UserError, match='unknown task'):
        get_operator('colorization')
    with pytest.raises(UserError, match='set up for 3x16x16'):
        get_operator('box_inpainting', img_size=16).check_image(torch.zeros(1, 3, 8, 8))

def mixture_for_inpainting():
    """4×4 one-channel images; components pair up with equal left halves, so hiding the right half leaves a choice."""
    left = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    means = []
    for sign in (1, -1):
        for right in (torch.ones(4, 2), -torch.ones(4, 2)):
            means.append(torch.cat([left.repeat(2, 1) * sign, right], dim=1))
    return GaussianMixture(torch.stack(means)[:, None], std=0.3, weights=torch.tensor([0.4, 0.1, 0.3, 0.2]))

@pytest.mark.parametrize('device', DEVICES)
def test_pnp_gd_with_exact_denoiser_matches_the_exact_posterior(device):
    mixture = mixture_for_inpainting()
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1
    op = Inpainting(mask, img_size=4, channels=1)
    gen = torch.Generator().manual_seed(0)
    truth = mixture.sample(1, generator=gen)
    sigma_y = 0.05
    y = op.measure(truth, sigma_y, generator=gen)
    n = 3000
    exact = mixture.posterior_sample(op, y, sigma_y, n, generator=gen)
    chain_gen = torch.Generator(device).manual_seed(1)
    chains = pnp_gd(mixture.generative_denoiser().to(device), y.expand(n, -1, -1, -1).to(device), op, sigma_y, steps=50, generator=chain_gen)
    assert chains.device.type == device
    chains = chains.cpu()
    mixture.module.cpu()
    weights, _, _ = mixture.linear_posterior(op, y, sigma_y)
    assign = lambda s: mixture.teacher().component_log_posterior(s, 1e-3).argmax(dim=1)
    freq_pnp = torch.bincount(assign(chains), minlength=4).double() / n
    freq_exact = torch.bincount(assign(exact), minlength=4).double() / n
    assert (freq_pnp - weights).abs().sum() / 2 < 0.05 and (freq_exact - weights).abs().sum() / 2 < 0.05
    assert (chains.mean(0) - exact.mean(0)).abs().max() < 0.1
    assert (chains.std(0) - exact.std(0)).abs().max() < 0.1

def test_psnr_and_ssim_known_values():
    a = torch.full([1, 1, 16, 16], 0.5, dtype=torch.float64)
    assert float(image_quality.psnr(a, a + 0.1)) == pytest.approx(20.0)
    b = torch.full_like(a, 0.25)
    c1 = 0.01 ** 2
    assert float(image_quality.ssim(a, b)) == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1))
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    assert float(image_quality.ssim(x, x)) == pytest.approx(1.0)

def test_ssim_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 1, 13, 13, generator=gen, dtype=torch.float64), torch.rand(1, 1, 13, 13, generator=gen, dtype=torch.float64)
    ax = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-ax ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(w, w) / torch.outer(w, w).sum()
    values = []
    for i in range(3):
        for j in range(3):
            p, q = x[0, 0, i:i + 11, j:j + 11], y[0, 0, i:i + 11, j:j + 11]
            mp, mq = (w * p).sum(), (w * q).sum()
            vp, vq, cpq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum(), (w * (p - mp) * (q - mq)).sum()
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            values.append((2 * mp * mq + c1) * (2 * cpq + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    assert float(image_quality.ssim(x, y)) == pytest.approx(float(torch.stack(values).mean()), rel=1e-9)

def test_lpips_structure_and_missing_weights(tmp_path):
    lpips = image_quality.LPIPS()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips(x, torch.rand(2, 3, 32, 32)) > 0).all()
    with pytest.raises(UserError, match='--lpips-vgg'):
        lpips.load_weights(str(tmp_path / 'missing-vgg.pth'), str(tmp_path / 'missing-heads.pt'))

@pytest.fixture(scope='module')
def student(tmp_path_factory):
    """A small NCVSD student (fixture weights, unconditional copy) pickled as a snapshot."""
    from training.networks_ncvsd import ConditionalPrecond, GenerativeDenoiser
    from training.encoders import StandardRGBEncoder
    data = load_fixture('ncvsd_networks_small.pt')
    config = dict(data['config'], label_dim=0)
    net = ConditionalPrecond(**config)
    net.load_state_dict({k: v for k, v in data['generator_state_dict'].items() if 'emb_label' not in k})
    path = tmp_path_factory.mktemp('student') / 'student.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=GenerativeDenoiser(net), encoder=StandardRGBEncoder()), f)
    return path

def test_cli_end_to_end(student, tmp_path):
    from helpers import make_dataset
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=3)
    out = tmp_path / 'out'
    result = run_python(['posterior_sample.py', f'--net={student}', f'--data={data}', '--preset=super_resolution', f'--outdir={out}',
        '--steps=4', '--runs=2', '--batch=2', f'--lpips-vgg={tmp_path / "none.pth"}'])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(out / 'metrics.json'))
    assert report['num_images'] == 3 and report['runs'] == 2
    assert report['lpips_variant'].startswith('unavailable') and '--lpips-vgg' in report['lpips_variant']
    assert set(report['summary']) == {'psnr', 'ssim'}
    assert report['summary']['psnr']['best_of_runs_mean'] >= report['summary']['psnr']['mean']
    for run in (0, 1):
        assert sorted(p.name for p in (out / f'run{run}').iterdir()) == ['00000.png', '00001.png', '00002.png']
    assert (out / 'grid.png').is_file() and (out / 'eval.md').is_file() and len(list((out / 'measurements').iterdir())) == 3

def test_two_ranks_share_the_batches_and_agree_with_one(student, tmp_path):
    """posterior_sample.py under torchrun: every rank solved the whole dataset and wrote the same files; now each solves
    its share of the batches, and the results are those of one process with the same --seed and --batch."""
    from helpers import make_dataset
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=5)
    args = ['posterior_sample.py', f'--net={student}', f'--data={data}', '--preset=box_inpainting', '--steps=3', '--runs=2',
        '--batch=2', '--metrics=psnr,ssim', '--device=cpu', '--num-images=5']     # torchrun took --num for --numa-binding.
    one = run_python([*args, f'--outdir={tmp_path / "one"}'])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args, f'--outdir={tmp_path / "two"}'],
        env={'OMP_NUM_THREADS': '1'})
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('Results in') == 1                     # Rank 0 reports.
    reports = [json.load(open(tmp_path / out / 'metrics.json')) for out in ('one', 'two')]
    assert [item['index'] for item in reports[1]['per_image']] == [0, 1, 2, 3, 4]
    for ours, theirs in zip(reports[0]['per_image'], reports[1]['per_image']):
        for run_one, run_two in zip(ours['runs'], theirs['runs']):
            assert run_one == pytest.approx(run_two, rel=1e-5)
    for name in ('run0/00003.png', 'run1/00004.png', 'measurements/00002.png', 'grid.png'):
        a, b = (np.array(PIL.Image.open(tmp_path / out / name)).astype(int) for out in ('one', 'two'))
        assert np.abs(a - b).max() <= 1, name                      # Thread counts may round differently.

@pytest.mark.parametrize('case, message', [('task', 'unknown task'), ('size', 'network expects 3x16x16'), ('teacher', 'not an NCVSD'),
    ('outdir', 'out is a file, not a folder'),
    ('rectangular', 'holds 16x12 images but square ones are needed'),          # Was an AssertionError.
])
def test_cli_errors(student, tmp_path, case, message):
    from helpers import make_dataset, make_teacher
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=2, resolution=8 if case == 'size' else 16)
    if case == 'rectangular':
        from training.dataset_io import write_dataset
        data = tmp_path / 'rectangular.zip'
        write_dataset(str(data), iter([(np.zeros((12, 16, 3), dtype=np.uint8), 0)] * 2), 2)
    net = make_teacher(tmp_path / 'teacher.pkl') if case == 'teacher' else student
    if case == 'outdir':
        (tmp_path / 'out').write_text('a file where the results should go')
    result = run_python(['posterior_sample.py', f'--net={net}', f'--data={data}', f'--preset={"colorize" if case == "task" else "box_inpainting"}',
        f'--outdir={tmp_path / "out"}', '--steps=2'])
    assert result.returncode == 1 and message in result.stderr and 'Traceback' not in result.stderr

TASKS = ['box_inpainting', 'gaussian_deblur_circ', 'motion_deblur_circ', 'super_resolution', 'phase_retrieval']

@pytest.mark.parametrize('task', TASKS)
def test_every_task_shows_its_measurement_at_the_image_size(task):
    op = get_operator(task, img_size=16, channels=3, **({'kernel_size': 5} if 'deblur' in task else {}))
    y = op.measure(torch.rand(2, 3, 16, 16) * 2 - 1, 0.05, generator=torch.Generator().manual_seed(0))
    picture = op.to_image(y)
    assert picture.shape == (2, 3, 16, 16) and torch.isfinite(picture).all()

def test_phase_retrieval_cli_writes_results_and_grid(student, tmp_path):
    """The oversampled measurement once crashed the grid after the whole run (and lost metrics.json)."""
    from helpers import make_dataset
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=2)
    out = tmp_path / 'out'
    result = run_python(['posterior_sample.py', f'--net={student}', f'--data={data}', '--preset=phase_retrieval', f'--outdir={out}',
        '--steps=2', '--runs=1', '--metrics=psnr,ssim', '--device=cpu'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(out / 'metrics.json'))['num_images'] == 2
    import PIL.Image
    assert PIL.Image.open(out / 'grid.png').size == (3 * 16, 2 * 16)

@pytest.mark.parametrize('overrides, message', [
    (dict(beta=-1.0), '--beta=-1.0 (task key "beta") must be positive'),           # Was a math domain error in pnp_gd.
    (dict(rho=0.0), '--rho=0.0 (task key "rho") must be positive'),                # A division by zero in the schedule.
    (dict(sigma_min=0.0), '--sigma-min=0.0 (task key "sigma_min") must be positive'),  # One in the likelihood step.
    (dict(sigma_min=10.0, sigma_max=1.0), 'must exceed --sigma-min=10.0'),           # Ran, annealing upwards.
    (dict(ema_decay=2.0), '--ema-decay=2.0 (task key "ema_decay") must lie in [0, 1]'),  # Ran, diverging.
    (dict(ts='22,10,39'), 'strictly increasing'),                                   # Found only inside the first step.
])
def test_task_values_are_checked_before_any_work(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        solve.load_task('box_inpainting', overrides)
    assert solve.load_task('box_inpainting', dict(ts='20,39'))['ts'] == [20, 39]

def test_a_task_file_lacking_keys_is_refused(tmp_path):
    (tmp_path / 'task.json').write_text(json.dumps(dict(operator=dict(name='box_inpainting'), steps=5)))
    with pytest.raises(UserError, match='the task lacks sigma_y, sigma_min, sigma_max, rho'):      # Was a KeyError.
        solve.load_task(str(tmp_path / 'task.json'))

def test_metric_names_are_checked():
    assert solve.parse_metrics('psnr, ssim') == ['psnr', 'ssim']
    for text in ('psnr,foo', ''):                   # 'foo' was ignored silently.
        with pytest.raises(UserError, match='choose among psnr, ssim, lpips'):
            solve.parse_metrics(text)

def test_running_out_of_memory_names_the_batch(student, tmp_path, monkeypatch):
    from helpers import make_dataset
    from training.network_io import load_network
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(solve, 'pnp_gd', out_of_memory)
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=2)
    net, encoder = load_network(str(student), torch.device('cpu'), verbose=False)
    with pytest.raises(UserError, match='cpu ran out of memory at --batch=2; use a smaller --batch'):
        solve.solve_dataset(net, encoder, str(data), solve.load_task('box_inpainting', dict(steps=2, runs=1)), str(tmp_path / 'out'),
            batch=2, metrics=('psnr',))

def test_a_non_finite_reconstruction_is_refused(student, tmp_path, monkeypatch):
    """NaN reconstructions were written as black images with NaN metrics."""
    from helpers import make_dataset
    from training.network_io import load_network
    monkeypatch.setattr(solve, 'pnp_gd', lambda net, y, *args, **kwargs: torch.full_like(y, float('nan')))
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=2)
    net, encoder = load_network(str(student), torch.device('cpu'), verbose=False)
    with pytest.raises(UserError, match='PnP-GD on images 0 to 1 gave non-finite values'):
        solve.solve_dataset(net, encoder, str(data), solve.load_task('box_inpainting', dict(steps=2, runs=1)), str(tmp_path / 'out'),
            batch=2, metrics=('psnr',))

def test_a_failed_grid_keeps_the_results(student, tmp_path, monkeypatch, capsys):
    from helpers import make_dataset
    from training.network_io import load_network
    def broken_grid(*args, **kwargs):
        raise RuntimeError('stack expects each tensor to be equal size')
    monkeypatch.setattr(solve, 'save_image_grid', broken_grid)
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=2)
    net, encoder = load_network(str(student), torch.device('cpu'), verbose=False)
    task = solve.load_task('box_inpainting', dict(steps=2, runs=1))
    solve.solve_dataset(net, encoder, str(data), task, str(tmp_path / 'out'), metrics=('psnr',))
    assert 'grid.png not written' in capsys.readouterr().out
    assert json.load(open(tmp_path / 'out' / 'metrics.json'))['num_images'] == 2
    assert (tmp_path / 'out' / 'eval.md').is_file() and not (tmp_path / 'out' / 'grid.png').exists()

@pytest.mark.parametrize('name', ['edm2-ffhq256-xs.pkl', 'ncvsd-ffhq256-xs.pkl', 'ncvsd-ffhq256.pkl', None])
def test_quick_start_script_finds_the_checkpoint_and_images(tmp_path, name):
    """quick_start/posterior-sample.sh in a copied tree: every published name of the checkpoint, or one line saying what to get."""
    import shutil, subprocess
    repo = tmp_path / 'repo'
    (repo / 'quick_start').mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, 'quick_start', 'posterior-sample.sh'), repo / 'quick_start')
    (repo / 'posterior_sample.py').write_text('import sys; print(" ".join(sys.argv[1:]))')
    (tmp_path / 'data' / 'test' / 'ffhq_val').mkdir(parents=True)
    if name is not None:
        (tmp_path / 'model_zoo' / 'ncvsd').mkdir(parents=True)
        (tmp_path / 'model_zoo' / 'ncvsd' / name).write_bytes(b'')
    result = subprocess.run(['bash', 'quick_start/posterior-sample.sh', 'box_inpainting', '--runs=2'], cwd=repo, capture_output=True, text=True)
    if name is None:
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and 'model_zoo/ncvsd' in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert f'--net=../model_zoo/ncvsd/{name} --data=../data/test/ffhq_val --preset=box_inpainting' in result.stdout
        assert '--runs=2' in result.stdout

def test_class_conditional_student_takes_the_labels_of_toy_test_images(tmp_path):
    """`python -m training.toy images` writes labelled images; a class-conditional network needs them."""
    from training.analytic import ExactGenerativeDenoiser
    from training.encoders import StandardRGBEncoder
    from training.toy import toy_teacher
    result = run_python(['-m', 'training.toy', 'images', f'--dest={tmp_path / "toy"}', '--num=4'])
    assert result.returncode == 0, result.stderr
    net = ExactGenerativeDenoiser(toy_teacher())
    task = solve.load_task('box_inpainting', dict(steps=10))
    report = solve.solve_dataset(net, StandardRGBEncoder(), str(tmp_path / 'toy'), task, str(tmp_path / 'out'), metrics=('psnr',))
    assert report['num_images'] == 4 and report['summary']['psnr']['mean'] > 15
    os.remove(tmp_path / 'toy' / 'dataset.json')
    with pytest.raises(UserError, match='class-conditional'):
        solve.solve_dataset(net, StandardRGBEncoder(), str(tmp_path / 'toy'), task, str(tmp_path / 'out2'), metrics=('psnr',))

def test_toy_test_images_of_the_first_classes_only_are_solved(tmp_path):
    """Two toy test images (classes 0 and 1) were refused: "the images carry 2 labels" for a 4-class network."""
    from training.analytic import ExactGenerativeDenoiser
    from training.encoders import StandardRGBEncoder
    from training.toy import toy_teacher
    result = run_python(['-m', 'training.toy', 'images', f'--dest={tmp_path / "toy"}', '--num=2'])
    assert result.returncode == 0, result.stderr
    task = solve.load_task('box_inpainting', dict(steps=4))
    report = solve.solve_dataset(ExactGenerativeDenoiser(toy_teacher()), StandardRGBEncoder(), str(tmp_path / 'toy'), task,
        str(tmp_path / 'out'), metrics=('psnr',))
    assert report['num_images'] == 2

def test_masks_are_written_or_refused_naming_the_folder(tmp_path):
    from inverse.masks import write_masks
    assert write_masks(str(tmp_path / 'masks'), size=16) == ['box-128.png', 'strokes-0.png', 'strokes-1.png', 'strokes-2.png']
    (tmp_path / 'file').write_text('x')
    with pytest.raises(UserError, match='--outdir=.*file is a file, not a folder'):              # Was a traceback.
        write_masks(str(tmp_path / 'file'), size=16)

def test_a_kernel_larger_than_the_image_names_the_fix():
    for task in ('gaussian_deblur_circ', 'motion_deblur_circ'):     # The published 61-pixel kernels on a 16x16 toy image.
        with pytest.raises(UserError, match='sets "kernel_size" to at most 16'):
            get_operator(task, img_size=16, channels=3, kernel_size=61, intensity=0.5)
