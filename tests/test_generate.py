import io
import re

import numpy as np
import PIL.Image
import pytest
import torch
import tqdm

from conftest import run_python, DEVICES
from dnnlib.util import UserError
from helpers import make_teacher
from training.analytic import GaussianMixture, mixture_metrics
from training.toy import toy_teacher
from training.sampling import edm_heun_sampler, generate_images, rank_batches
from training.encoders import StandardRGBEncoder
from training.sampling import check_sampling_options
from training.networks_ncvsd import GenerativeDenoiser
from training.networks_edm2 import set_precision, network_precision

def test_heun_with_exact_teacher_reproduces_the_mixture():
    mixture = toy_teacher(resolution=8, std=0.1)
    n = 2000
    labels = torch.eye(4)[torch.arange(n) % 4]
    samples = edm_heun_sampler(mixture, torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)), labels, num_steps=32)
    metrics = mixture_metrics(mixture, samples, labels)
    assert metrics['class_accuracy'] == 1.0 and metrics['tv'] < 0.07 and abs(metrics['spread'] - 1) < 0.03
    few = mixture_metrics(mixture, edm_heun_sampler(mixture, torch.randn(n, 3, 8, 8), labels, num_steps=2), labels)
    assert abs(few['spread'] - 1) > abs(metrics['spread'] - 1)       # two steps are visibly worse

@pytest.mark.parametrize('device', DEVICES)
def test_images_depend_on_seeds_only(device):
    from training.analytic import ExactGenerativeDenoiser
    net = ExactGenerativeDenoiser(toy_teacher(resolution=8)).to(device)
    def run(batch, rank=0, world=1):
        out = {}
        for r in generate_images(net, StandardRGBEncoder(), list(range(10, 23)), ts=[10, 22, 39], batch_size=batch, rank=rank,
                world_size=world, device=torch.device(device)):
            out.update(zip(r['seeds'], [] if r['images'] is None else r['images'].cpu()))
        return out
    a, b = run(13), run(4)
    c = {**run(3, 0, 2), **run(3, 1, 2)}
    assert set(a) == set(b) == set(c) == set(range(10, 23))
    for seed in a:
        assert torch.equal(a[seed], b[seed]) and torch.equal(a[seed], c[seed])

def test_rank_batches_cover_all_seeds_once():
    seeds = list(range(50))
    parts = [rank_batches(seeds, 8, r, 3) for r in range(3)]
    assert len({len(p) for p in parts}) == 1                       # every rank runs the same number of batches
    flat = sorted(s for p in parts for b in p for s in b)
    assert flat == seeds and max(len(b) for p in parts for b in p) <= 8

def test_rank_0s_progress_bar_ends_at_the_number_of_images():
    """Rank 0 counts each of its batches once per rank; its share is the largest (13 seeds over 2 ranks: 7), so the
    count stops at the total instead of passing it (it showed 14/13)."""
    from training.analytic import ExactGenerativeDenoiser
    net = ExactGenerativeDenoiser(toy_teacher(resolution=8))
    progress = tqdm.tqdm(total=13, file=io.StringIO())
    counts = [progress.n for _result in generate_images(net, StandardRGBEncoder(), list(range(13)), ts=[10, 39], batch_size=3,
        rank=0, world_size=2, progress=progress)]
    assert counts == [6, 10, 13]

def test_option_errors():
    student = GenerativeDenoiser(toy_teacher(resolution=8))
    teacher = toy_teacher(resolution=8)
    with pytest.raises(UserError, match='strictly increasing'):
        check_sampling_options(student, '22,10,39', None, None)
    with pytest.raises(UserError, match='out of range'):
        check_sampling_options(student, None, None, 4)
    with pytest.raises(UserError, match='use --steps'):
        check_sampling_options(teacher, '10,39', 32, None)
    with pytest.raises(UserError, match='--steps=4 is for diffusion teachers'):      # Was ignored silently.
        check_sampling_options(student, None, 4, None)
    assert check_sampling_options(student, None, None, None) == ([10, 22, 39], None)
    assert check_sampling_options(teacher, None, None, None) == (None, 32)
    uncond = GaussianMixture(torch.zeros(1, 3, 8, 8), 0.1).teacher()
    with pytest.raises(UserError, match='unconditional'):
        check_sampling_options(uncond, None, 32, 0)

@pytest.mark.parametrize('command', [['generate_images.py', '--outdir=unused'], ['calculate_metrics.py', 'gen', '--ref=missing-ref.pkl']])
def test_a_bad_ts_is_refused_before_anything_loads(command):
    """A malformed --ts is the first error, before the network and reference load (each may be a long download)."""
    result = run_python(command + ['--net=missing.pkl', '--ts=22,10,39'])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ['Error: --ts=22,10,39: indices must be strictly increasing; e.g. --ts=10,22,39']

def test_running_out_of_memory_names_the_batch(monkeypatch):
    """A GPU out of memory while sampling was torch's traceback; now it names --batch (the training loop's test names
    --batch-gpu)."""
    from training import sampling
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(sampling, 'sample_batch', out_of_memory)
    with pytest.raises(UserError, match='cpu ran out of memory at --batch=4; use a smaller --batch'):
        next(generate_images(GenerativeDenoiser(toy_teacher(resolution=8)), StandardRGBEncoder(), list(range(8)), batch_size=4))

def test_non_finite_weights_and_samples_are_refused(tmp_path, monkeypatch):
    """A diverged run's snapshot (NaN weights) and a batch that overflows both sampled black images and said "Done"."""
    import pickle
    from training import sampling
    from training.network_io import load_network
    path = make_teacher(tmp_path / 'teacher.pkl')
    data = pickle.load(open(path, 'rb'))
    with torch.no_grad():
        data['ema'].unet.out_conv.weight[0, 0, 0, 0] = float('nan')
    pickle.dump(data, open(path, 'wb'))
    with pytest.raises(UserError, match='teacher.pkl holds non-finite weights .* the first unet.out_conv.weight'):
        load_network(str(path), torch.device('cpu'), verbose=False)
    monkeypatch.setattr(sampling, 'sample_batch', lambda net, noise, *args: noise.clone().fill_(float('inf')))
    with pytest.raises(UserError, match='sampling the batch of seeds 4 to 7 gave non-finite values'):
        list(generate_images(GenerativeDenoiser(toy_teacher(resolution=8)), StandardRGBEncoder(), list(range(4, 12)), batch_size=4))

def test_cli_teacher_and_export(tmp_path):
    teacher = make_teacher(tmp_path / 'teacher.pkl')
    result = run_python(['generate_images.py', f'--net={teacher}', '--steps=2', f'--outdir={tmp_path / "out"}', '--seeds=0-2,7',
        '--class=1', '--subdirs', f'--grid={tmp_path / "grid.png"}'])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / 'out' / '000000').iterdir()) == ['000000.png', '000001.png', '000002.png', '000007.png']
    assert np.array(PIL.Image.open(tmp_path / 'grid.png')).shape == (32, 32, 3)
    bad = run_python(['generate_images.py', f'--net={teacher}', f'--outdir={tmp_path / "x"}', '--class=9'])
    assert bad.returncode == 1 and 'out of range' in bad.stderr and 'Traceback' not in bad.stderr
    for blocked in ([f'--outdir={tmp_path / "grid.png"}'], [f'--outdir={tmp_path / "x"}', f'--grid={tmp_path / "grid.png" / "g.png"}']):
        bad = run_python(['generate_images.py', f'--net={teacher}', '--steps=2', *blocked])   # A file where a folder goes.
        assert bad.returncode == 1 and 'is a file, not a folder' in bad.stderr and 'Traceback' not in bad.stderr, bad.stderr
        assert 'Loading network' not in bad.stdout

def test_a_full_disk_names_the_image_and_leaves_no_torn_file(tmp_path):
    """Images were written in place by PIL: a full disk was its traceback, and the image being written stayed torn."""
    import textwrap
    teacher = make_teacher(tmp_path / 'teacher.pkl')
    out = tmp_path / 'out'
    script = tmp_path / 'full_disk.py'
    script.write_text(textwrap.dedent(f'''
        import errno, pathlib, sys
        from torch_utils import misc
        import generate_images
        encode_png = misc.encode_png
        def disk_fills_after_two_images(array, **options):
            if len(list(pathlib.Path({str(out)!r}).glob('*.png'))) == 2:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return encode_png(array, **options)
        misc.encode_png = disk_fills_after_two_images
        sys.argv = ['generate_images.py', '--net={teacher}', '--outdir={out}', '--seeds=0-3', '--steps=2', '--device=cpu']
        generate_images.main()'''))
    result = run_python([str(script)])
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert re.search(r'cannot write .*000002.png \(OSError: \[Errno 28\] No space left on device\); make room', result.stderr)
    assert sorted(p.name for p in out.iterdir()) == ['000000.png', '000001.png']       # No temporary file.
    assert all(np.array(PIL.Image.open(out / name)).shape == (16, 16, 3) for name in ('000000.png', '000001.png'))

def test_a_training_state_given_as_a_network_names_the_snapshots(tmp_path):
    """It was "not an NCVSD export ... make one with python -m training.network_io export", which takes a snapshot."""
    from training.network_io import load_network_data
    path = tmp_path / 'training-state-0000016.pt'
    torch.save(dict(state=dict(cur_nimg=16384), G={}, S={}, D={}, ema=dict(stds=[0.05])), path)
    with pytest.raises(UserError, match="training-state-0000016.pt is a training-state checkpoint, for resuming its run; "
            "pass one of the run's network-snapshot-"):
        load_network_data(str(path), verbose=False)

def test_export_round_trip(tmp_path):
    import pickle
    import dnnlib
    from training.network_io import load_exported
    from training.networks_ncvsd import ConditionalPrecond
    from conftest import load_fixture
    data = load_fixture('ncvsd_networks_small.pt')
    net = set_precision(ConditionalPrecond(**data['config']).eval(), 'bf16')
    net.load_state_dict(data['generator_state_dict'])
    snapshot = tmp_path / 'snap.pkl'
    with open(snapshot, 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=GenerativeDenoiser(net, gamma=0.3), encoder=StandardRGBEncoder()), f)
    result = run_python(['-m', 'training.network_io', 'export', str(snapshot), str(tmp_path / 'student.pt')])
    assert result.returncode == 0, result.stderr
    blocked = run_python(['-m', 'training.network_io', 'export', str(snapshot), str(snapshot / 'student.pt')])   # Was a traceback.
    assert blocked.returncode == 1 and 'snap.pkl is a file, not a folder' in blocked.stderr and 'Traceback' not in blocked.stderr
    raw = torch.load(tmp_path / 'student.pt', weights_only=True)              # no pickled code inside
    assert raw['format'] == 'ncvsd-export-v1'
    loaded = load_exported(str(tmp_path / 'student.pt'))
    assert loaded['ema'].gamma == 0.3 and type(loaded['encoder']).__name__ == 'StandardRGBEncoder'
    assert raw['precision'] == network_precision(loaded['ema'].model) == 'bf16'     # not a constructor argument
    with torch.no_grad():
        out = loaded['ema'].model(data['x'], data['sigma'], data['cond_x'], data['cond_sigma'], data['class_labels'], force_fp32=True)
    assert torch.allclose(out, data['generator_D_x'], rtol=1e-5, atol=1e-6)

def test_released_style_pickle_loads_and_samples(tmp_path, monkeypatch):
    """The released checkpoint pickles the wrapper by reference as training.networks_edm2.GenerativeDenoiser."""
    import pickle
    import dnnlib
    from conftest import load_fixture
    from training.networks_ncvsd import ConditionalPrecond
    data = load_fixture('ncvsd_networks_small.pt')
    net = ConditionalPrecond(**data['config']).eval()
    net.load_state_dict(data['generator_state_dict'])
    wrapper = GenerativeDenoiser(net)
    monkeypatch.setattr(GenerativeDenoiser, '__module__', 'training.networks_edm2')
    payload = pickle.dumps(dnnlib.EasyDict(ema=wrapper))
    monkeypatch.undo()
    import pickletools
    strings, referenced = [], []
    for op, arg, _pos in pickletools.genops(payload):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == 'STACK_GLOBAL' and strings[-1] == 'GenerativeDenoiser':
            referenced.append(strings[-2])
    assert referenced == ['training.networks_edm2']
    (tmp_path / 'released.pkl').write_bytes(payload)
    result = run_python(['generate_images.py', f'--net={tmp_path / "released.pkl"}', '--ts=10,22,39', f'--outdir={tmp_path / "out"}', '--seeds=0-1'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['000000.png', '000001.png']

def test_module_entry_points_show_help_and_change_nothing(tmp_path):
    """`--help` of every `python -m` entry point prints usage, exits 0 and writes nothing."""
    for module in ('training.network_io', 'inverse.masks', 'training.phema'):
        result = run_python(['-m', module, '--help'], cwd=str(tmp_path))
        assert result.returncode == 0 and 'Usage:' in result.stdout, (module, result.stderr)
    assert list(tmp_path.iterdir()) == []
