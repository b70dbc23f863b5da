import os
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import run_python, ROOT, DEVICES
from dnnlib.util import UserError
from evaluation import frechet

STANDIN = '--detector=fd_stand=standin_detectors.PoolingDetector'
ENV = {'PYTHONPATH': f'{ROOT}{os.pathsep}{os.path.join(ROOT, "tests")}'}

def test_frechet_distance_closed_form_for_gaussians():
    """Diagonal covariances: FD = ‖Δμ‖² + Σ (√a − √b)²."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)

def test_frechet_distance_against_scipy_on_random_features():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    s1, s2 = frechet.FeatureStats(6), frechet.FeatureStats(6)
    s1.append(torch.as_tensor(x))
    s2.append(torch.as_tensor(y))
    (_, mu1, sig1), (_, mu2, sig2) = s1.finalize(), s2.finalize()
    assert np.allclose(sig1, np.cov(x, rowvar=False)) and np.allclose(mu2, y.mean(0))
    reference = np.square(mu1 - mu2).sum() + np.trace(sig1 + sig2 - 2 * scipy.linalg.sqrtm(sig1 @ sig2).real)
    assert frechet.frechet_distance(mu1, sig1, mu2, sig2) == pytest.approx(reference, rel=1e-9)

@pytest.mark.parametrize('device', DEVICES)
def test_fd_of_a_set_against_itself_is_zero(device):
    from standin_detectors import PoolingDetector
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, device=device)
    stats = frechet.compute_stats([images[:40], images[40:]], {'fd_stand': PoolingDetector()}, 16)
    features = PoolingDetector()(images.cpu())
    assert np.allclose(stats['fd_stand']['mu'], features.mean(0).numpy(), rtol=1e-10)
    assert np.allclose(stats['fd_stand']['sigma'], np.cov(features.numpy(), rowvar=False), rtol=1e-8)
    assert frechet.fd_scores(stats, stats)['fd_stand'] == pytest.approx(0, abs=1e-8)
    assert stats['fd_stand']['num_images'] == 64

def test_reference_round_trip_and_format(tmp_path):
    ref = {'fid': dict(mu=np.arange(3.0), sigma=np.eye(3)), 'fd_dinov2': dict(mu=np.ones(2), sigma=np.eye(2) * 2)}
    for name in ('ref.pkl', 'ref.npz'):
        frechet.save_reference(ref, str(tmp_path / name))
        loaded = frechet.load_reference(str(tmp_path / name))
        assert set(loaded) == {'fid', 'fd_dinov2'}
        assert np.array_equal(loaded['fid']['sigma'], np.eye(3)) and np.array_equal(loaded['fd_dinov2']['mu'], np.ones(2))
    with open(tmp_path / 'ref.pkl', 'rb') as f:
        raw = pickle.load(f)                                 # plain pickle of {metric: {'mu', 'sigma'}}, as EDM2 reads it
    assert isinstance(raw, dict) and isinstance(raw['fid']['mu'], np.ndarray)

class Payload:
    def __reduce__(self):
        return (os.system, ('touch PWNED_BY_REFERENCE',))

def test_malicious_reference_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump({'fid': {'mu': np.zeros(2), 'sigma': Payload()}}, f)
    with pytest.raises(UserError, match='only numpy arrays and builtins'):
        frechet.load_reference(str(tmp_path / 'evil.pkl'))
    assert not (tmp_path / 'PWNED_BY_REFERENCE').exists()

def test_reference_mismatch_is_refused():
    ours = {'fid': dict(mu=0, sigma=0, detector='a', resolution=64)}
    with pytest.raises(UserError, match='resolution=512'):
        frechet.check_reference({'fid': dict(mu=0, sigma=0, detector='a', resolution=512)}, ours, 'ref.pkl')
    with pytest.raises(UserError, match='no "fid"'):
        frechet.check_reference({'fd_dinov2': dict(mu=0, sigma=0)}, ours, 'ref.pkl')

def test_missing_detector_weights_message(tmp_path):
    with pytest.raises(UserError, match='--inception=PATH'):
        frechet.InceptionV3Detector(str(tmp_path / 'absent.pkl'))

def test_dinov2_architecture_matches_the_checkpoint_layout():
    from evaluation.dinov2 import VisionTransformer
    net = VisionTransformer(dim=64, depth=2, num_heads=4)
    keys = set(net.state_dict())
    assert {'cls_token', 'pos_embed', 'mask_token', 'patch_embed.proj.weight', 'blocks.1.ls2.gamma',
            'blocks.0.attn.qkv.weight', 'blocks.0.mlp.fc1.bias', 'norm.weight'} <= keys
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 64)

@pytest.fixture(scope='module')
def metric_assets(tmp_path_factory):
    from helpers import make_teacher, make_dataset
    root = tmp_path_factory.mktemp('metrics')
    teacher = make_teacher(root / 'teacher.pkl')
    data = make_dataset(root / 'src', root / 'data.zip')
    result = run_python(['calculate_metrics.py', 'ref', f'--data={data}', f'--dest={root / "ref.pkl"}', '--metrics=fd_stand', STANDIN], env=ENV)
    assert result.returncode == 0, result.stderr
    return dict(teacher=str(teacher), data=str(data), ref=str(root / 'ref.pkl'), root=root)

def test_calc_against_own_reference_is_zero(metric_assets, tmp_path):
    out = tmp_path / 'scores.json'
    result = run_python(['calculate_metrics.py', 'calc', f'--images={metric_assets["data"]}', f'--ref={metric_assets["ref"]}',
        '--metrics=fd_stand', STANDIN, f'--out={out}', '--workers=0', '--batch=5'], env=ENV)  # The reference: 2 workers, 64.
    assert result.returncode == 0, result.stderr
    assert '12/12' in result.stderr                  # The progress bar.
    import json
    assert json.load(open(out))['fd_stand'] == pytest.approx(0, abs=1e-6)
    too_many = run_python(['calculate_metrics.py', 'calc', f'--images={metric_assets["data"]}', f'--ref={metric_assets["ref"]}',
        '--metrics=fd_stand', STANDIN, '--num=100'], env=ENV)
    assert too_many.returncode == 1 and 'fewer than --num=100' in too_many.stderr
    (tmp_path / 'file').write_text('x')
    blocked_output = tmp_path / 'file' / 'scores'
    for args in (['ref', f'--data={metric_assets["data"]}', f'--dest={blocked_output}'],      # Refused before the statistics.
            ['calc', f'--images={metric_assets["data"]}', f'--ref={metric_assets["ref"]}', f'--out={blocked_output}']):
        blocked = run_python(['calculate_metrics.py', *args, '--metrics=fd_stand', STANDIN], env=ENV)
        assert blocked.returncode == 1 and 'is a file, not a folder' in blocked.stderr and 'Traceback' not in blocked.stderr, blocked.stderr

def test_a_detector_out_of_memory_names_the_batch(metric_assets):
    """A detector out of GPU memory was torch's traceback (sampling already named --batch); now it names --batch too."""
    result = run_python(['calculate_metrics.py', 'calc', f'--images={metric_assets["data"]}', f'--ref={metric_assets["ref"]}',
        '--metrics=fd_stand', '--detector=fd_stand=standin_detectors.OutOfMemoryDetector', '--batch=16'], env=ENV)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert 'ran out of memory at --batch=16; use a smaller --batch' in result.stderr

def test_gen_one_and_two_processes_agree(metric_assets, tmp_path):
    args = ['gen', f'--net={metric_assets["teacher"]}', '--steps=2', '--num-images=12', '--batch=4', f'--ref={metric_assets["ref"]}',
        '--metrics=fd_stand', STANDIN, '--device=cpu']
    single = run_python(['calculate_metrics.py', *args, f'--out={tmp_path / "one.json"}'], env=ENV)
    assert single.returncode == 0, single.stderr
    double = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'calculate_metrics.py', *args,
        f'--out={tmp_path / "two.json"}'], env=dict(ENV, OMP_NUM_THREADS='1'))
    assert double.returncode == 0, double.stderr[-2000:]
    import json
    one, two = json.load(open(tmp_path / 'one.json')), json.load(open(tmp_path / 'two.json'))
    assert one['num_images'] == two['num_images'] == {'fd_stand': 12}
    assert one['fd_stand'] == pytest.approx(two['fd_stand'], rel=1e-6)
    assert one['fd_stand'] > 0.01

@pytest.mark.parametrize('command', ['calc', 'ref'])
def test_user_paths_are_checked_before_any_detector_is_fetched(tmp_path, command):
    """Offline, a missing --images/--data or --ref is reported as such, not as a failed detector download."""
    args = ['calculate_metrics.py', command, '--metrics=fid', '--inception=https://127.0.0.1:9/inception.pkl']
    args += ([f'--images={tmp_path / "nowhere"}', f'--ref={tmp_path / "absent.pkl"}'] if command == 'calc'
        else [f'--data={tmp_path / "nowhere.zip"}', f'--dest={tmp_path / "ref.pkl"}'])
    result = run_python(args, env=ENV)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert ('absent.pkl' if command == 'calc' else 'nowhere.zip') in result.stderr and 'inception' not in result.stderr.lower()

@pytest.mark.parametrize('command', ['calc', 'gen'])
@pytest.mark.parametrize('case, message', [
    ('metric', 'has no "fid" statistics; choose --metrics from fd_stand'),
    ('detector', 'computed with detector=pooling-standin but these images have detector=other-standin'),
    ('resolution', 'computed with resolution=16 but these images have resolution=8'),
])
def test_a_reference_that_cannot_match_is_refused_before_the_work(metric_assets, tmp_path, command, case, message):
    """A reference without the metric, or of another detector or resolution, was refused after every image was scored
    (with gen, after 50,000 were generated). The stand-ins used here fail on their first batch, so an error other than
    theirs shows that the refusal came first; a missing metric is refused before its detector is fetched."""
    from helpers import make_dataset, make_teacher
    if case == 'resolution':
        source = (make_teacher(tmp_path / 'teacher8.pkl', resolution=8) if command == 'gen'
            else make_dataset(tmp_path / 'src', tmp_path / 'data8.zip', resolution=8))
    else:
        source = metric_assets['teacher' if command == 'gen' else 'data']
    args = ['calculate_metrics.py', command, f'--ref={metric_assets["ref"]}', '--device=cpu']
    args += [f'--net={source}', '--steps=2', '--num-images=12'] if command == 'gen' else [f'--images={source}']
    args += (['--metrics=fid', '--inception=https://127.0.0.1:9/inception.pkl'] if case == 'metric'
        else ['--metrics=fd_stand', f'--detector=fd_stand=standin_detectors.{"Other" if case == "detector" else "OutOfMemory"}Detector'])
    result = run_python(args, env=ENV)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert message in result.stderr and 'inception' not in result.stderr.lower(), result.stderr
    assert 'out of memory' not in result.stderr and 'scored images' not in result.stderr, result.stderr
    if case == 'metric':
        assert 'Loading network' not in result.stdout

@pytest.mark.parametrize('command', ['calc', 'ref'])
@pytest.mark.parametrize('case, message', [
    ('rectangular', 'holds 12x8 images but square ones are needed; reconvert with dataset_tool.py convert --resolution=8x8'),
    ('latents', 'holds 8-channel latents, not images'),
    ('one_image', 'holds 1 image; the covariance of a Fréchet distance needs at least 2'),     # Was a LinAlgError.
])
def test_data_the_detectors_cannot_take_is_one_line(tmp_path, command, case, message):
    """Images that are not square, VAE latents (dataset_tool.py encode) and a single image were an AssertionError, a
    shape error deep in a detector and scipy's error."""
    from training.dataset_io import write_dataset
    rng = np.random.default_rng(0)
    shape = dict(rectangular=(8, 12, 3), one_image=(8, 8, 3)).get(case)
    items = [(rng.integers(0, 255, shape, dtype=np.uint8) if shape else rng.standard_normal((8, 4, 4)).astype(np.float32), None)
        for _ in range(1 if case == 'one_image' else 4)]
    data = tmp_path / 'data.zip'
    write_dataset(str(data), iter(items), len(items))
    args = [f'--images={data}', f'--ref={tmp_path / "ref.pkl"}'] if command == 'calc' else [f'--data={data}', f'--dest={tmp_path / "ref.pkl"}']
    if command == 'calc':
        frechet.save_reference({'fd_stand': dict(mu=np.zeros(8), sigma=np.eye(8))}, str(tmp_path / 'ref.pkl'))
    result = run_python(['calculate_metrics.py', command, *args, '--metrics=fd_stand', STANDIN], env=ENV)
    assert result.returncode == 1 and 'Traceback' not in result.stderr and message in result.stderr, result.stderr
