import copy
import os
import pickle
import sys
import textwrap
import zipfile

import pytest
import torch

from conftest import run_python, ROOT, DEVICES
from helpers import make_teacher, make_dataset, assert_same_weights
from training.dataset import ImageFolderDataset
from training.encoders import StandardRGBEncoder
from training.training_loop import training_loop, build_students, learning_rate_schedule
from training.network_io import load_network_data, prepare_frozen

@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp('assets')
    return dict(teacher=str(make_teacher(root / 'teacher.pkl')), data=str(make_dataset(root / 'src', root / 'data.zip')),
        teacher_res8=str(make_teacher(root / 'teacher8.pkl', resolution=8)),
        teacher_uncond=str(make_teacher(root / 'teacher_uncond.pkl', label_dim=0)), root=root)

def train_cli(assets, outdir, *extra, device='cpu'):
    """train_ncvsd.py on the tiny preset, pinned to `device` (tests of CPU behaviour must not drift to CUDA)."""
    return run_python(['train_ncvsd.py', '--preset=tiny', f'--net={assets["teacher"]}', f'--data={assets["data"]}', f'--outdir={outdir}',
        f'--device={device}', *extra])

@pytest.mark.parametrize('device', DEVICES)
def test_one_iteration_moves_every_student_and_not_the_teacher(assets, tmp_path, device):
    teacher = load_network_data(assets['teacher'], verbose=False)['ema']
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    initial = [net.state_dict() for net in build_students(prepare_frozen(pickle.loads(pickle.dumps(teacher)), 'cpu'), {'use_fp16': False}, 'cpu')]
    initial = [{k: v.clone() for k, v in state.items()} for state in initial]
    G, S, D, ema = training_loop(run_dir=str(tmp_path), teacher=teacher, dataset=ImageFolderDataset(assets['data']),
        encoder=StandardRGBEncoder(), network_kwargs={'use_fp16': True}, lr_kwargs=dict(ref_lr=0.01, ref_batches=0, rampup_Mimg=0),
        batch_size=4, batch_gpu=2, total_nimg=4, status_nimg=4, snapshot_nimg=0, checkpoint_nimg=0, grid_size=4, seed=0, device=device)
    for net, before in zip((G, S, D), initial):
        assert next(net.parameters()).device.type == device
        changed = [name for name, value in net.state_dict().items() if not torch.equal(value.cpu(), before[name])]
        assert len(changed) > 0.5 * len(before), type(net).__name__
        assert all(torch.isfinite(value).all() for value in net.state_dict().values())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value.float().cpu(), teacher_before[name].float()), name
    stats = [line for line in open(tmp_path / 'stats.jsonl')]
    assert len(stats) == 1
    import json
    record = json.loads(stats[0])
    for name in ('Loss/score', 'Loss/discriminator', 'Loss/generator', 'Loss/gan'):
        assert record[name]['num'] > 0 and torch.isfinite(torch.tensor(record[name]['mean'])), name

def test_learning_rate_schedule():
    assert learning_rate_schedule(5e6, 2048, ref_lr=0.01, ref_batches=35000, rampup_Mimg=10) == pytest.approx(0.005)
    assert learning_rate_schedule(35000 * 2048 * 4, 2048, ref_lr=0.01, ref_batches=35000, rampup_Mimg=10) == pytest.approx(0.005)

@pytest.mark.parametrize('device', DEVICES)
def test_resume_gives_identical_weights(assets, tmp_path, device):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    assert train_cli(assets, straight, '--duration=24', '--checkpoint=8', '--snapshot=24', device=device).returncode == 0
    first = train_cli(assets, resumed, '--duration=8', '--checkpoint=8', '--snapshot=24', device=device)
    assert first.returncode == 0, first.stderr
    second = train_cli(assets, resumed, '--duration=24', '--checkpoint=8', '--snapshot=24', device=device)
    assert second.returncode == 0, second.stderr
    assert 'Loading' in second.stdout and 'training-state' in second.stdout
    a = torch.load(straight / 'training-state-0000000.024.pt', weights_only=False)
    b = torch.load(resumed / 'training-state-0000000.024.pt', weights_only=False)
    assert a['state']['cur_nimg'] == b['state']['cur_nimg'] == 24
    for key in ('G', 'S', 'D'):
        assert_same_weights(a[key], b[key], device, key)
    for index, (ema_a, ema_b) in enumerate(zip(a['ema']['emas'], b['ema']['emas'])):
        assert_same_weights(ema_a, ema_b, device, f'ema {index}')

def test_intervals_under_a_kimg_never_overwrite_files(assets, tmp_path):
    result = train_cli(assets, tmp_path, '--duration=24', '--snapshot=8', '--checkpoint=8')
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    for stamp in ('0000000.008', '0000000.016', '0000000.024'):
        assert f'training-state-{stamp}.pt' in names
        assert f'network-snapshot-{stamp}-0.050.pkl' in names and f'network-snapshot-{stamp}-0.100.png' in names
    resumed = train_cli(assets, tmp_path, '--duration=32', '--snapshot=8', '--checkpoint=8')
    assert resumed.returncode == 0 and 'training-state-0000000.024.pt' in resumed.stdout, resumed.stderr

def test_file_names_keep_whole_kimg_where_they_cannot_collide():
    from dnnlib.util import nimg_stamp
    from training.training_loop import fine_stamps_needed
    assert not fine_stamps_needed(16384, 4096, 4096) and not fine_stamps_needed(64 << 20, 1 << 20, 4 << 20)
    assert nimg_stamp(16384, False) == '0000016' and nimg_stamp(256, True) == '0000000.256'
    assert fine_stamps_needed(768, 256, 0)                          # 256, 512, 768 images: all in kimg 0
    assert fine_stamps_needed(1500, 1024, 0)                        # the end (1.5 kimg) after the snapshot at 1.024
    assert fine_stamps_needed(2500, 2048, 0) and not fine_stamps_needed(3500, 2048, 0)

def test_snapshot_loads_in_a_fresh_process_and_samples(assets, tmp_path):
    result = train_cli(assets, tmp_path, '--duration=8', '--snapshot=8')
    assert result.returncode == 0, result.stderr
    log = (tmp_path / 'log.txt').read_text()
    assert 'kimg 0.008' in log and 'Training:' in log
    for suffix in ('-0.050', '-0.100'):
        assert (tmp_path / f'network-snapshot-0000000.008{suffix}.pkl').is_file()
        assert (tmp_path / f'network-snapshot-0000000.008{suffix}.png').is_file()
    check = textwrap.dedent(f'''
        import pickle, torch
        data = pickle.load(open({str(tmp_path / "network-snapshot-0000000.008-0.050.pkl")!r}, 'rb'))
        net = data['ema']
        assert type(net).__name__ == 'GenerativeDenoiser' and set(data) >= {{'ema', 'encoder', 'dataset_kwargs', 'loss_fn'}}
        assert {{value.dtype for value in net.state_dict().values()}} == {{torch.float16}}     # As EDM2 stores its networks.
        labels = torch.eye(4)[:2]
        x = net(torch.randn(2, 3, 16, 16) * 80, 80.0, labels=labels, ts=[10, 22, 39])
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
        print(data['encoder'].decode(x).dtype)
    ''')
    out = run_python(['-c', check])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'torch.uint8'

def run_two_ranks(assets, tmp_path, runs):
    """Under torchrun, two gloo ranks run training_loop on the test teacher and data once per {name: keyword overrides}
    (values written by repr), in tmp_path/name; returns [{name: dict(G, S, D state dicts)} of each rank]."""
    calls = ''.join(f'''
        G, S, D, ema = training_loop(**dict(options, run_dir={str(tmp_path / name)!r}, **{overrides!r}))
        torch.save(dict(G=G.state_dict(), S=S.state_dict(), D=D.state_dict()), {str(tmp_path)!r} + f'/{name}{{dist.get_rank()}}.pt')'''
        for name, overrides in runs.items())
    script = tmp_path / 'ddp_run.py'
    script.write_text(textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from torch_utils import distributed as dist
        from training.dataset import ImageFolderDataset
        from training.encoders import StandardRGBEncoder
        from training.network_io import load_network_data
        from training.training_loop import training_loop
        dist.init()
        options = dict(teacher=load_network_data({assets["teacher"]!r}, verbose=False)['ema'], dataset=ImageFolderDataset({assets["data"]!r}),
            encoder=StandardRGBEncoder(), network_kwargs={{'use_fp16': False}}, lr_kwargs=dict(ref_lr=0.01, ref_batches=0, rampup_Mimg=0),
            batch_size=8, batch_gpu=2, total_nimg=16, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=0, grid_size=4)''')
        + textwrap.dedent(calls) + '\ndist.shutdown()\n')
    result = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)], env={'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    return [{name: torch.load(tmp_path / f'{name}{rank}.pt') for name in runs} for rank in range(2)]

def test_two_process_torchrun_keeps_ranks_identical(assets, tmp_path):
    ranks = [saved['run'] for saved in run_two_ranks(assets, tmp_path, dict(run=dict(status_nimg=8, checkpoint_nimg=16)))]
    initial = load_network_data(assets['teacher'], verbose=False)['ema'].float().state_dict()
    for key in ('G', 'S', 'D'):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), (key, name)
    assert not torch.equal(ranks[0]['G']['enc.enc.16x16_conv.weight'], initial['unet.enc.16x16_conv.weight'])
    checkpoint = torch.load(tmp_path / 'run' / 'training-state-0000000.016.pt', weights_only=False)
    assert len(checkpoint['rng']['ranks']) == 2

def test_ranks_that_diverge_stop_at_the_checkpoint_with_a_clear_error(assets, tmp_path):
    """Averaged gradients keep the ranks' weights identical, and each checkpoint checks it (as EDM2 does): where one
    rank's weights drift (here rank 1 nudges a weight of G after each iteration), every rank stops after the checkpoint
    with one line naming the tensor, instead of training on with ranks that disagree. Rank 0's state is saved."""
    script = tmp_path / 'drift.py'
    script.write_text(textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from dnnlib.util import UserError
        from torch_utils import distributed as dist
        from training import training_loop as loop
        from training.dataset import ImageFolderDataset
        from training.encoders import StandardRGBEncoder
        from training.network_io import load_network_data
        run = loop.NCVSDIteration.run
        def drifting_run(self, *args, **kwargs):
            run(self, *args, **kwargs)
            if dist.get_rank() == 1:
                with torch.no_grad():
                    dict(self.nets['generator'].named_parameters())['enc.enc.16x16_conv.weight'].add_(1e-3)
        loop.NCVSDIteration.run = drifting_run
        dist.init()
        try:
            loop.training_loop(run_dir={str(tmp_path / 'run')!r}, teacher=load_network_data({assets["teacher"]!r}, verbose=False)['ema'],
                dataset=ImageFolderDataset({assets["data"]!r}), encoder=StandardRGBEncoder(), network_kwargs={{'use_fp16': False}},
                batch_size=8, batch_gpu=2, total_nimg=16, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=8, grid_size=4)
        except UserError as err:
            print(f'rank {{dist.get_rank()}}: {{err}}')
        dist.shutdown()
    '''))
    result = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)], env={'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        assert (f"rank {rank}: the ranks have diverged: G.enc.enc.16x16_conv.weight differs from rank 0's on 1 of the 1 other ranks"
            in result.stdout), result.stdout
    assert os.listdir(tmp_path / 'run') == ['training-state-0000000.008.pt']

def test_a_compiled_two_process_run_matches_the_eager_one(assets, tmp_path):
    """torchrun --compile: the DDP wrappers compiled (dynamo splits their graphs at the buckets), two accumulation
    rounds per rank, the second under no_sync with the gradients in DDP's buckets. Ranks stay identical, and the
    weights are the eager run's within 1e-3 of the update (aot_eager: inductor differs only in generated kernels)."""
    runs = dict(initial=dict(total_nimg=0, seed=0), eager=dict(seed=0), compiled=dict(seed=0, compile_options=dict(backend='aot_eager')))
    rank0, rank1 = run_two_ranks(assets, tmp_path, runs)
    flat = lambda state: torch.cat([value.flatten().float() for value in state.values()])
    for key in ('G', 'S', 'D'):
        for name, value in rank0['compiled'][key].items():
            assert torch.equal(value, rank1['compiled'][key][name]), (key, name)
        update = flat(rank0['eager'][key]) - flat(rank0['initial'][key])
        assert float(update.norm()) > 0 and float((flat(rank0['compiled'][key]) - flat(rank0['eager'][key])).norm()) <= 1e-3 * float(update.norm()), key

def loop_options(assets):
    """training_loop() arguments of the tiny runs below: batch 8 in rounds of 2, a checkpoint every 8 images, on the CPU."""
    return dict(teacher=load_network_data(assets['teacher'], verbose=False)['ema'], dataset=ImageFolderDataset(assets['data']),
        encoder=StandardRGBEncoder(), network_kwargs={'use_fp16': False}, lr_kwargs=dict(ref_lr=0.01, ref_batches=0, rampup_Mimg=0),
        batch_size=8, batch_gpu=2, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=8, grid_size=4, device='cpu')

def test_a_checkpoint_resumes_on_another_number_of_ranks(assets, tmp_path, capsys):
    """A preempted job given fewer or more processes was refused. Now the run goes on from the checkpoint's weights with a
    note; each rank draws new noise, different from the other ranks' and the same when the resume is rerun."""
    import shutil
    options = loop_options(assets)
    training_loop(run_dir=str(tmp_path / 'grown'), total_nimg=16, **options)
    ranks = run_two_ranks(assets, tmp_path, dict(halved=dict(total_nimg=16, checkpoint_nimg=8), grown=dict(total_nimg=24, checkpoint_nimg=8)))
    grown = torch.load(tmp_path / 'grown' / 'training-state-0000000.024.pt', weights_only=False)
    first, second = grown['rng']['ranks']
    assert not torch.equal(first['generator'], second['generator']) and not torch.equal(first['cpu'], second['cpu'])
    for key in ('G', 'S', 'D'):
        for name, value in ranks[0]['grown'][key].items():
            assert torch.equal(value, ranks[1]['grown'][key][name]), (key, name)
    capsys.readouterr()
    shrunk = []
    for name in ('shrunk', 'shrunk_again'):
        shutil.copytree(tmp_path / 'halved', tmp_path / name)
        G, S, D, ema = training_loop(run_dir=str(tmp_path / name), total_nimg=24, **options)
        shrunk.append(torch.load(tmp_path / name / 'training-state-0000000.024.pt', weights_only=False))
        assert 'written by 2 ranks and this run has 1' in capsys.readouterr().out
    halved = torch.load(tmp_path / 'halved' / 'training-state-0000000.016.pt', weights_only=False)
    assert shrunk[0]['state']['cur_nimg'] == 24
    for key in ('G', 'S', 'D'):
        assert_same_weights(shrunk[0][key], shrunk[1][key], 'cpu', key)
        assert any(not torch.equal(value, halved[key][name]) for name, value in shrunk[0][key].items()), key

def test_ranks_that_see_different_checkpoints_stop_with_a_clear_error(assets, tmp_path):
    """An --outdir that is not shared between nodes: rank 0 found its checkpoint and resumed at 8 images, rank 1 found
    none and started at 0, so the ranks ran different numbers of iterations and the run hung at the end. Rank 1's view
    is stood in for by a folder of its own."""
    training_loop(run_dir=str(tmp_path / 'node0'), total_nimg=8, **loop_options(assets))
    script = tmp_path / 'unshared.py'
    script.write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {ROOT!r})
        from torch_utils import distributed as dist
        from training.dataset import ImageFolderDataset
        from training.encoders import StandardRGBEncoder
        from training.network_io import load_network_data
        from training.training_loop import training_loop
        dist.init()
        training_loop(run_dir={str(tmp_path)!r} + f'/node{{dist.get_rank()}}', teacher=load_network_data({assets["teacher"]!r}, verbose=False)['ema'],
            dataset=ImageFolderDataset({assets["data"]!r}), encoder=StandardRGBEncoder(), network_kwargs={{'use_fp16': False}},
            batch_size=8, batch_gpu=2, total_nimg=24, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=8, grid_size=4)
        '''))
    result = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)], env={'OMP_NUM_THREADS': '1'},
        timeout=120)
    assert result.returncode != 0
    assert 'the ranks see different checkpoints' in result.stderr and 'rank 0: training-state-0000000.008.pt, rank 1: none' in result.stderr, result.stderr[-3000:]

@pytest.mark.parametrize('start', [0, 24, 45])
def test_the_data_stream_resumes_at_the_same_images_on_any_number_of_ranks(start):
    """Rank r of W reads positions start + r, start + r + W, ... of one shuffled stream (epochs of 10 images here), so the
    images of each phase batch are the same whatever the number of ranks a run resumes on."""
    import itertools
    from torch_utils.misc import InfiniteSampler
    def batches(world, num_batches=6, batch=8):
        streams = [iter(InfiniteSampler(range(10), rank=rank, num_replicas=world, seed=3, start_idx=start)) for rank in range(world)]
        return [sorted(itertools.chain.from_iterable(list(itertools.islice(stream, batch // world)) for stream in streams))
            for _ in range(num_batches)]
    order = InfiniteSampler(range(10), seed=3).epoch_order
    positions = range(start, start + 48)
    assert batches(1) == [sorted(int(order(p // 10)[p % 10]) for p in positions[i:i + 8]) for i in range(0, 48, 8)]
    assert batches(2) == batches(4) == batches(1)

def test_sigterm_writes_a_checkpoint_and_the_run_resumes_bitwise(assets, tmp_path):
    """SIGTERM (a scheduler's preemption or time limit) killed the run, losing all since the last checkpoint. Now every
    rank finishes the same iteration, one checkpoint is written, and the resumed run ends with the weights of one never
    stopped. Two ranks under torchrun; the signal goes to the whole process group, as a scheduler's does, so each rank
    gets it twice (directly, and from torchrun)."""
    import signal
    import subprocess
    import sys
    import time
    def command(outdir, duration):
        return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_ncvsd.py', '--preset=tiny',
            f'--net={assets["teacher"]}', f'--data={assets["data"]}', f'--outdir={outdir}', f'--duration={duration}', '--status=8',
            '--checkpoint=4000', '--snapshot=4000', '--device=cpu', '--workers=1']        # Workers get the signal too.
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    stopped, straight = tmp_path / 'stopped', tmp_path / 'straight'
    run = subprocess.Popen(command(stopped, 4000), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    deadline = time.time() + 120
    while 'kimg 0.016' not in ((stopped / 'log.txt').read_text() if (stopped / 'log.txt').exists() else ''):
        assert run.poll() is None and time.time() < deadline, run.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert run.returncode != 0 and 'Stopped by SIGTERM at 0.0' in output, output[-3000:]
    checkpoints = list(stopped.glob('training-state-*.pt'))
    assert len(checkpoints) == 1, checkpoints
    stopped_nimg = torch.load(checkpoints[0], weights_only=False)['state']['cur_nimg']
    assert 16 <= stopped_nimg < 4000 and checkpoints[0].name == f'training-state-{stopped_nimg / 1000:011.3f}.pt'
    for outdir in (stopped, straight):
        result = subprocess.run(command(outdir, stopped_nimg + 16), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert f'Loading {checkpoints[0]}' in (stopped / 'log.txt').read_text()
    name = f'training-state-{(stopped_nimg + 16) / 1000:011.3f}.pt'
    a, b = (torch.load(outdir / name, weights_only=False) for outdir in (stopped, straight))
    for key in ('G', 'S', 'D'):
        assert_same_weights(a[key], b[key], 'cpu', key)
    for index, (ema_a, ema_b) in enumerate(zip(a['ema']['emas'], b['ema']['emas'])):
        assert_same_weights(ema_a, ema_b, 'cpu', f'ema {index}')

def test_the_newest_checkpoint_is_found_where_a_whole_kimg_and_an_exact_one_share_a_kimg(tmp_path):
    """A whole <kimg> in a name (0000005) stands for any count in that kimg; a stopped run's exact one (0000005.040) can
    share it, older or newer."""
    from torch_utils.distributed import atomic_save, latest_checkpoint
    def write(stamp, nimg):
        atomic_save(dict(state=dict(cur_nimg=nimg)), tmp_path / f'training-state-{stamp}.pt')
    write('0000004', 4096)
    write('0000005.040', 5040)
    assert latest_checkpoint(str(tmp_path)).endswith('0000005.040.pt')
    write('0000005', 5120)                          # Written after a resume from 5.040: newer, though 5 < 5.040.
    assert latest_checkpoint(str(tmp_path)).endswith('training-state-0000005.pt')

OPTION_ERRORS = {'ts', 'batch', 'duration', 'no_duration', 'outdir_file', 'torn_checkpoint', 'fp16', 'precision_fp16', 'cuda_graphs', 'precision_contradiction', 'preset',
    'preset_unknown_key', 'preset_missing_key', 'preset_ema_std', 'lr_nan', 'preset_not_finite', 'device'}

@pytest.mark.parametrize('case, message', [
    ('ts', 'strictly increasing'),
    ('batch', 'not divisible'),
    ('duration', '--duration=12 is not a multiple of --batch=8'),
    ('no_duration', '--duration=0 trains on no images'),            # Wrote a 0-kimg snapshot and a nonsense status line.
    ('resolution', 'the teacher expects [3, 8, 8]'),
    ('labels', 'pass --cond=False'),
    ('unlabelled', '--cond=False but the teacher is class-conditional (label_dim=4)'),   # Was a traceback in the first iteration.
    ('not_a_network', 'holds no network'),
    ('damaged_pickle', 'junk.pkl is not a network pickle (ValueError'),
    ('damaged_export', 'junk.pt is not a weights-only network file'),
    ('outdir_file', 'is a file, not a folder'),
    ('torn_checkpoint', 'training-state-0000000.008.pt cannot be read (RuntimeError'),
    ('missing', 'file not found'),
    ('other_run', 'different run'),
    ('other_run_without_checkpoint', 'different run that wrote no checkpoint (differs in seed)'),    # Its snapshots were overwritten.
    ('preset', 'unknown preset'),
    ('fp16', '--fp16=True needs CUDA'),
    ('precision_fp16', '--precision=fp16 needs CUDA'),
    ('cuda_graphs', '--cuda-graphs=True needs CUDA'),
    ('precision_contradiction', 'contradicts --precision=bf16'),
    ('preset_unknown_key', 'unknown key(s) learning_rate'),
    ('preset_missing_key', 'lacks P_mean, lr'),
    ('preset_ema_std', 'ema_stds=0.5: the std of a power-function EMA'),   # Found when the EMA was built, after loading.
    ('lr_nan', 'lr=nan: not a finite number'),                         # Was accepted: every step zeroed, with warnings.
    ('preset_not_finite', 'P_mean=inf: not a finite number'),
    ('device', '--device=tpu is not a device this code runs on'),     # Was torch's traceback.
    ('corrupt_image_in_a_worker', 'corrupt.zip: cannot decode image 00000/img000000'),  # Was the worker's traceback.
])
def test_clear_errors(assets, tmp_path, case, message):
    extra = []
    net, data, outdir = assets['teacher'], assets['data'], tmp_path / 'run'
    if case == 'ts':
        extra = ['--ts=22,10,39']
    elif case == 'batch':
        extra = ['--batch=8', '--batch-gpu=3']
    elif case == 'duration':
        extra = ['--batch=8', '--duration=12']
    elif case == 'no_duration':
        extra = ['--duration=0']
    elif case == 'resolution':
        net = assets['teacher_res8']
    elif case == 'labels':
        net = assets['teacher_uncond']
    elif case == 'unlabelled':
        extra = ['--cond=False']
    elif case == 'not_a_network':
        net = str(tmp_path / 'junk.pkl')
        with open(net, 'wb') as f:
            pickle.dump({'weights': [1, 2]}, f)
    elif case.startswith('damaged_'):                # A text file unpickles into a ValueError; a zip's head alone, not at all.
        net = str(tmp_path / ('junk.pkl' if case == 'damaged_pickle' else 'junk.pt'))
        (tmp_path / os.path.basename(net)).write_bytes(b'garbage\n' if case == 'damaged_pickle' else b'PK\x03\x04junk')
    elif case == 'missing':
        net = str(tmp_path / 'nowhere.pkl')
    elif case == 'outdir_file':
        outdir.write_text('a file where the run folder should be')
    elif case == 'torn_checkpoint':                  # Was a traceback from deep inside torch.load.
        outdir.mkdir()
        (outdir / 'training-state-0000000.008.pt').write_bytes(b'PK\x03\x04 cut short')
    elif case == 'fp16':
        extra = ['--fp16=True']
    elif case == 'precision_fp16':
        extra = ['--precision=fp16']
    elif case == 'cuda_graphs':
        extra = ['--cuda-graphs=True']
    elif case == 'precision_contradiction':
        extra = ['--fp16=True', '--precision=bf16']
    elif case == 'lr_nan':
        extra = ['--lr=nan']
    elif case == 'device':
        extra = ['--device=tpu']
    elif case == 'corrupt_image_in_a_worker':       # DataLoader workers are the CUDA default.
        data = str(tmp_path / 'corrupt.zip')
        with zipfile.ZipFile(assets['data']) as source, zipfile.ZipFile(data, 'w') as dest:
            for name in source.namelist():
                corrupt = name.endswith('.png') and name != '00000/img00000000.png'     # The first is read at start-up.
                dest.writestr(name, b'not a png' if corrupt else source.read(name))
        extra = ['--workers=2']
    elif case.startswith('other_run'):
        assert train_cli(assets, outdir, '--duration=8').returncode == 0
        extra = ['--duration=16', '--seed=5']
        for checkpoint in (outdir.glob('training-state-*.pt') if case == 'other_run_without_checkpoint' else ()):
            checkpoint.unlink()                     # Killed before its first checkpoint.
    preset = {'preset': 'nonsense'}.get(case, 'tiny')
    if case.startswith('preset_'):
        import json
        from training.run_config import load_preset
        values = dict(load_preset('tiny'))
        if case == 'preset_unknown_key':
            values['learning_rate'] = values['lr']
        elif case == 'preset_ema_std':
            values['ema_stds'] = [0.05, 0.5]
        elif case == 'preset_not_finite':
            values['P_mean'] = float('inf')
        else:
            del values['lr'], values['P_mean']
        preset = str(tmp_path / 'custom.json')
        (tmp_path / 'custom.json').write_text(json.dumps(values))
    args = ['train_ncvsd.py', f'--preset={preset}', f'--net={net}', f'--data={data}', f'--outdir={outdir}', '--device=cpu', *extra]
    result = run_python(args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    if case in OPTION_ERRORS:                       # Found before anything is loaded or fitted: at once.
        assert 'Loading network' not in result.stdout, result.stdout[-2000:]
    if case not in ('other_run', 'other_run_without_checkpoint', 'outdir_file', 'torn_checkpoint', 'corrupt_image_in_a_worker'):
        assert not outdir.exists()                  # A refused run leaves no empty run folder.

@pytest.mark.filterwarnings('ignore:This DataLoader will create')
def test_data_loader_workers_read_a_zip_the_parent_has_opened(assets):
    """Forked workers must not share the parent's zip handle (its file position): each opens its own."""
    dataset = ImageFolderDataset(assets['data'])
    expected = [dataset[i][0] for i in range(len(dataset))]                 # The parent reads first.
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=4, multiprocessing_context='fork')
    for _epoch in range(3):
        images = torch.cat([batch for batch, _labels in loader])
        assert all(torch.equal(images[i], torch.as_tensor(expected[i])) for i in range(len(dataset)))

def test_device_choice_and_its_errors(monkeypatch):
    from dnnlib.util import UserError
    from torch_utils.distributed import choose_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert choose_device(None, local_ranks=1) == (torch.device('cuda', 0), None)
    device, note = choose_device(None, local_ranks=2, local_rank=1)             # Two ranks, one GPU: gloo on the CPU.
    assert device == torch.device('cpu') and 'gloo' in note and '--nproc_per_node=1' in note
    assert choose_device('cpu', local_ranks=2) == (torch.device('cpu'), None)
    with pytest.raises(UserError, match='needs 2 GPUs'):
        choose_device('cuda', local_ranks=2)
    assert choose_device('cuda:0') == (torch.device('cuda', 0), None)
    with pytest.raises(UserError, match='has 1 GPU'):                   # Was accepted, to fail in set_device.
        choose_device('cuda:1')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    assert choose_device(None, local_ranks=2) == (torch.device('cpu'), None)
    with pytest.raises(UserError, match='CUDA is not available'):
        choose_device('cuda')
    for requested in ('tpu', 'cuda:x', 'meta'):                         # Were torch's RuntimeError, or accepted.
        with pytest.raises(UserError, match=f'--device={requested} is not a device'):
            choose_device(requested)

@pytest.mark.parametrize('native', [False, True])
def test_emulated_bfloat16_is_noted_and_not_suggested(assets, monkeypatch, capsys, native):
    """bf16 on a CPU without AVX-512 BF16 or AMX (oneDNN's check) computes correctly but several times slower (an AVX2
    CPU: bench-a's step 7x): training and the sampling loads note it at start-up, and the fp16-on-CPU error suggests
    bf16 only where the CPU has it."""
    from dnnlib import EasyDict
    from dnnlib.util import UserError
    from training.network_io import load_network
    from training.train_setup import check_device_options
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: native)
    cpu = torch.device('cpu')
    check_device_options(EasyDict(cuda_graphs=False, precision='bf16', preset='tiny'), {'precision': 'bf16'}, cpu)
    assert ('(--precision=bf16) is emulated' in capsys.readouterr().out) != native
    load_network(assets['teacher'], cpu, precision='bf16')
    assert ('(--precision=bf16) is emulated' in capsys.readouterr().out) != native
    load_network(assets['teacher'], cpu, precision='fp32')
    assert 'emulated' not in capsys.readouterr().out
    with pytest.raises(UserError, match='--precision=fp16 needs CUDA') as error:
        check_device_options(EasyDict(cuda_graphs=False, precision='fp16', preset='tiny'), {'precision': 'fp16'}, cpu)
    assert ('use --precision=bf16' in str(error.value)) == native
    with pytest.raises(UserError, match='--precision=fp16 needs CUDA') as error:      # Sampling: not silently float32.
        load_network(assets['teacher'], cpu, precision='fp16')
    assert ('use --precision=bf16' in str(error.value)) == native

def test_checkpoint_from_another_device_is_refused():
    from dnnlib.util import UserError
    from training.training_loop import RandomState
    state = RandomState('cpu', 0).state_dict()
    state['ranks'][0]['device'] = 'cuda'
    with pytest.raises(UserError, match='resume with --device=cuda'):
        RandomState('cpu', 0).load_state_dict(state)

def test_out_of_memory_names_batch_gpu(assets, tmp_path, monkeypatch):
    from dnnlib.util import UserError
    from training import training_loop as loop
    def run_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(loop.NCVSDIteration, 'run', run_out_of_memory)
    teacher = load_network_data(assets['teacher'], verbose=False)['ema']
    with pytest.raises(UserError, match='use a smaller --batch-gpu'):
        training_loop(run_dir=str(tmp_path), teacher=teacher, dataset=ImageFolderDataset(assets['data']), encoder=StandardRGBEncoder(),
            network_kwargs={'use_fp16': False}, batch_size=4, batch_gpu=2, total_nimg=4, status_nimg=4, snapshot_nimg=0,
            checkpoint_nimg=0, grid_size=4, device='cpu')

#----------------------------------------------------------------------------
# The published training dynamics.

def tiny_run(assets, tmp_path, **kwargs):
    teacher = load_network_data(assets['teacher'], verbose=False)['ema']
    options = dict(run_dir=str(tmp_path), teacher=teacher, dataset=ImageFolderDataset(assets['data']), encoder=StandardRGBEncoder(),
        network_kwargs={'use_fp16': False}, lr_kwargs=dict(ref_lr=0.1, ref_batches=0, rampup_Mimg=0), batch_size=4, batch_gpu=4,
        total_nimg=8, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=0, grid_size=4, device='cpu', seed=0)
    return training_loop(**dict(options, **kwargs))

def test_a_compiled_run_reports_the_iterations_that_compile(assets, tmp_path, capsys, monkeypatch):
    """A compiled run says before its first iteration, and before its first with the GAN term (a new graph of the
    discriminator), that the iteration compiles, then how long each phase and the iteration took; other iterations
    print nothing of it. The reporting does not depend on what compiles, so the networks stay eager here (tracing
    them would cost the suite 20 s)."""
    from training import training_loop as loop
    monkeypatch.setattr(loop, 'compile_network', lambda net, **options: net)
    tiny_run(assets, tmp_path, compile_options=dict(backend='inductor'), total_nimg=12, gan_warmup_nimg=8)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('torch.compile')]
    assert len(lines) == 10, lines
    for announced, expected in zip((lines[0], lines[5]), ('the first iteration compiles', 'the GAN term starts')):
        assert expected in announced, lines
    for first in (1, 6):
        phases = [line.split(' phase ')[0] for line in lines[first:first + 3]]
        assert phases == [f'torch.compile: {name}' for name in ('score', 'discriminator', 'generator')], lines
        assert lines[first + 3].startswith('torch.compile: iteration') and lines[first + 3].endswith('s, compilation included')

def mpconv_weights(net):
    from training.networks_edm2 import MPConv
    return {name: layer.weight.detach().clone() for name, layer in net.named_modules() if isinstance(layer, MPConv)}

def test_discriminator_raw_norms_grow_while_G_and_S_stay_normalised(assets, tmp_path):
    from training.networks_edm2 import normalize
    torch.manual_seed(0)                                                 # The loop builds its students after the same seed.
    teacher = prepare_frozen(load_network_data(assets['teacher'], verbose=False)['ema'], 'cpu')
    before = mpconv_weights(build_students(teacher, {'use_fp16': False}, 'cpu')[2])
    G, S, D, _ema = tiny_run(assets, tmp_path, g_lr_scaling=1.0, d_lr_scaling=1.0)
    for net in (G, S):
        for name, weight in mpconv_weights(net).items():
            assert torch.allclose(weight, normalize(weight), rtol=1e-4, atol=1e-5), name
    after = mpconv_weights(D)
    grown = [name for name in after if after[name].norm() > before[name].norm() * (1 + 1e-5)]
    assert len(grown) > 0.8 * len(after), sorted(set(after) - set(grown))
    assert not any(torch.allclose(weight, normalize(weight), rtol=1e-4) for weight in after.values())   # Never renormalised in place.

def test_students_start_with_their_own_logvar_head_and_the_teacher_unet(assets):
    teacher = prepare_frozen(load_network_data(assets['teacher'], verbose=False)['ema'], 'cpu')
    torch.manual_seed(1)
    G, S, D = build_students(teacher, {'use_fp16': False}, 'cpu')
    for student in (G, S):
        assert not torch.equal(student.logvar_linear.weight, teacher.logvar_linear.weight)
        assert not torch.equal(student.logvar_fourier.freqs, teacher.logvar_fourier.freqs)
    from training.networks_edm2 import normalize
    unet = teacher.unet.state_dict()
    for part, in_place in ((G.enc, True), (G.ctrl, True), (G.dec, True), (S.enc, True), (D.enc, False), (D.ctrl, False)):
        shared = [name for name in part.state_dict() if name in unet and name.endswith('weight') and unet[name].ndim > 1]
        assert len(shared) > 5
        for name in shared:                             # G and S renormalise their copy in place; D keeps it raw.
            expected = normalize(unet[name]) if in_place else unet[name]
            assert torch.allclose(part.state_dict()[name], expected, atol=1e-6), name
    G_copy, _, _ = build_students(teacher, {'use_fp16': False}, 'cpu', copy_logvar=True)    # The documented option.
    assert torch.equal(G_copy.logvar_linear.weight, normalize(teacher.logvar_linear.weight))

def test_first_update_of_a_rampup_runs_at_learning_rate_zero(assets, tmp_path, monkeypatch):
    from training import training_loop as loop
    rates, run = [], loop.NCVSDIteration.run
    def recording_run(self, batches, lr, **kwargs):
        rates.append(lr)
        return run(self, batches, lr, **kwargs)
    monkeypatch.setattr(loop.NCVSDIteration, 'run', recording_run)
    tiny_run(assets, tmp_path, lr_kwargs=dict(ref_lr=0.01, ref_batches=0, rampup_Mimg=1))
    assert rates == [0.0, pytest.approx(0.01 * 4 / 1e6)]

@pytest.mark.parametrize('loss_scaling', [1.0, 8.0])
def test_non_finite_gradients_are_zeroed(loss_scaling):
    from training.gradients import finish_gradients_
    net = torch.nn.Linear(3, 2)
    for param in net.parameters():
        param.grad = torch.full_like(param, 2.0 * loss_scaling)
    net.weight.grad[0, 0], net.weight.grad[1, 2], net.bias.grad[0] = float('nan'), float('inf'), float('-inf')
    finish_gradients_(net, loss_scaling)
    assert net.weight.grad[0, 0] == 0 and net.weight.grad[1, 2] == 0 and net.bias.grad[0] == 0
    assert net.weight.grad[0, 1] == 2.0 and net.bias.grad[1] == 2.0

def test_batch_gpu_splits_the_batch_into_rounds_and_changes_no_update(monkeypatch):
    """--batch-gpu decides how a rank's batch is split into accumulation rounds. Where every random draw is a function of
    its image alone (here), any split gives the same update to float rounding: the losses are normalised by the whole
    per-rank batch, GAN term included. (In a run the draws are dealt in round order, so a split changes them as a seed
    would.)"""
    from conftest import load_fixture
    from training import loss as loss_module
    from training.loss import NCVSDLoss
    from training.networks_edm2 import Precond, mark_constant
    from training.training_loop import NCVSDIteration, phase_networks
    def pseudo_noise(x):                                    # Unit variance, a function of x alone.
        return torch.sin(x * 1000) * 2 ** 0.5
    class PerImageDraws(NCVSDLoss):
        def sample_condition(self, images, rng=None):
            sigma = images.flatten(1).mean(1).abs().mul(10).add(0.05).reshape(-1, 1, 1, 1)
            return images + pseudo_noise(images) * sigma, sigma
        def sample_t(self, images, rng=None):
            return images.flatten(1).std(1).reshape(-1, 1, 1, 1)
    monkeypatch.setattr(loss_module, 'randn_like_from', lambda rng: pseudo_noise)
    data = load_fixture('ncvsd_networks_small.pt')
    teacher = mark_constant(Precond(**data['config']).eval().requires_grad_(False))
    teacher.load_state_dict(data['teacher_state_dict'])
    torch.manual_seed(0)
    initial = build_students(teacher, {'use_fp16': False}, 'cpu')
    gen = torch.Generator().manual_seed(1)
    phase_batches = [(torch.randn(8, 3, 16, 16, generator=gen) * 0.5, torch.eye(10)[torch.randint(10, [8], generator=gen)])
        for _phase in range(3)]
    results = {}
    for batch_gpu in (8, 4, 2):
        G, S, D = [copy.deepcopy(net) for net in initial]
        # SGD: an update linear in the gradient (Adam's first step is ±lr, which would amplify rounding).
        optimizers = {phase: torch.optim.SGD(net.parameters()) for phase, net in phase_networks(G, S, D).items()}
        step = NCVSDIteration(G, S, D, teacher, PerImageDraws(), optimizers, 0.414, num_rounds=8 // batch_gpu,
            batch_gpu_total=8, g_lr_scaling=1.0, d_lr_scaling=1.0)
        rounds = ((images[i:i + batch_gpu], labels[i:i + batch_gpu]) for images, labels in phase_batches for i in range(0, 8, batch_gpu))
        step.run(rounds, lr=1e-3, use_gan=True)
        results[batch_gpu] = [torch.cat([value.flatten() for value in net.state_dict().values()]) for net in (G, S, D)]
    before = [torch.cat([value.flatten() for value in net.state_dict().values()]) for net in initial]
    for index, name in enumerate('GSD'):
        update = float((results[8][index] - before[index]).norm())
        assert update > 0, name
        for batch_gpu in (4, 2):
            assert float((results[batch_gpu][index] - results[8][index]).norm()) <= 1e-3 * update, (name, batch_gpu)

def test_flat_gradients_accumulate_and_finish_in_their_parameters():
    """FlatGradients: after zero_(), backward passes accumulate into the parameters' views of the buffer (the values of
    per-parameter gradients); finish_ unscales and zeroes non-finite values there; release() unsets the gradients and
    frees the buffer's memory, which the next zero_() takes again, zeroed, with the views set as gradients."""
    from training.gradients import FlatGradients
    net, gen = torch.nn.Linear(3, 2), torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, 3, generator=gen) for _ in range(2)]
    reference = copy.deepcopy(net)
    for x in inputs:
        reference(x).square().sum().backward()
    flat = FlatGradients(net.parameters())
    flat.zero_()
    for x in inputs:
        (net(x).square().sum() * 8.0).backward()
    assert all(param.grad.data_ptr() == view.data_ptr() for param, view in zip(net.parameters(), flat.views))
    net.weight.grad[0, 0], net.bias.grad[1] = float('nan'), float('-inf')
    flat.finish_(loss_scaling=8.0)
    assert net.weight.grad[0, 0] == 0 and net.bias.grad[1] == 0
    assert torch.equal(net.weight.grad[1], reference.weight.grad[1]) and torch.equal(net.bias.grad[:1], reference.bias.grad[:1])
    flat.release()
    assert net.weight.grad is None and net.bias.grad is None and flat.buffer.untyped_storage().nbytes() == 0
    flat.zero_()
    assert net.weight.grad is flat.views[0] and net.bias.grad is flat.views[1] and not flat.buffer.any()
    net(inputs[0]).square().sum().backward()
    assert net.bias.grad.data_ptr() == flat.views[1].data_ptr() and flat.buffer.any()

NETWORKS_FOR_AVERAGING = dict(
    linear="""
        net = torch.nn.Linear(4, 3)
        net.img_resolution = net.img_channels = net.label_dim = 0
        inputs, kwargs = (torch.randn(5, 4, generator=torch.Generator().manual_seed(1)),), {}
    """,
    pointwise_conv_channels_last="""
        net = torch.nn.Conv2d(64, 32, kernel_size=1)
        net.img_resolution = net.img_channels = net.label_dim = 0
        x = torch.randn(16, 64, 8, 8, generator=torch.Generator().manual_seed(1))
        inputs, kwargs = (x.contiguous(memory_format=torch.channels_last),), {}
    """,
    grouped_student="""
        from training.networks_ncvsd import ConditionalPrecond
        from training.speed import set_speed_options
        set_speed_options(grouped_weight_norm=True)
        net = ConditionalPrecond(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_channels=16,
            channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4]).prepare_for_training()
        gen = torch.Generator().manual_seed(1)
        inputs = (torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([0.5, 2.0]), torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([0.1, 0.3]))
        kwargs = dict(return_logvar=True)                                 # Every parameter in use, as in training.
    """)

@pytest.mark.parametrize('network', list(NETWORKS_FOR_AVERAGING))
def test_gradients_are_averaged_across_ranks(tmp_path, network):
    """Two gloo ranks with identical batches: the reduced gradient is each rank's own (the mean, not the sum), in the
    first step and after DDP has rebuilt its buckets, unscaled in DDP's buckets; the student normalises its weights by
    group (grouped_weight_norm), whose backward nodes ready a UNet level's gradients at once. Where a rank's gradients
    are not finite, the reduced ones are zeroed on every rank. The DDP wrapper is freed before the group is destroyed,
    and the group's gloo threads end with it (running into the interpreter's exit, they once aborted a rank there).
    A 1x1 convolution on channels-last activations gets its weight's gradient with other strides in the size-1 dims
    only (the same memory layout), which DDP's layout check would report as a performance warning on every rank."""
    script = tmp_path / 'average.py'
    script.write_text(textwrap.dedent(f'''
        import copy, gc, os, sys, weakref, torch
        sys.path.insert(0, {ROOT!r})
        from torch_utils import distributed as dist
        from training.gradients import gradient_averaging, finish_gradients_
        gc.disable()                        # Only shutdown() may free the cycles that keep the DDP wrapper alive.
        dist.init('cpu')
        torch.manual_seed(0)
    ''') + textwrap.dedent(NETWORKS_FOR_AVERAGING[network]) + textwrap.dedent(f'''
        reference, averaging = copy.deepcopy(net), gradient_averaging(net, torch.device('cpu'), loss_scaling=8.0)
        squares = lambda outputs: sum(output.square().sum() for output in (outputs if isinstance(outputs, tuple) else (outputs,)))
        steps = []
        for step in range(2):
            reference.zero_grad(set_to_none=True)
            (squares(reference(*inputs, **kwargs)) * 8.0).backward()   # Loss scaling 8.
            own = [p.grad.clone() / 8.0 for p in reference.parameters()]
            net.zero_grad(set_to_none=True)
            (squares(averaging(*inputs, **kwargs)) * 8.0).backward()
            finish_gradients_(averaging, loss_scaling=8.0)
            steps.append(dict(own=own, reduced=[p.grad.clone() for p in net.parameters()]))
        net.zero_grad(set_to_none=True)                                   # Rank 1's gradients all non-finite:
        (squares(averaging(*inputs, **kwargs)) * (float('inf') if dist.get_rank() == 1 else 8.0)).backward()
        finish_gradients_(averaging, loss_scaling=8.0)
        steps.append(dict(own=[torch.zeros_like(p) for p in net.parameters()], reduced=[p.grad.clone() for p in net.parameters()]))
        torch.save(steps, {str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.pt')
        wrapper = weakref.ref(averaging)
        del averaging
        tasks = '/proc/self/task'                                   # Linux: the names of this process's threads.
        def gloo_threads():
            names = []
            for task in os.listdir(tasks):
                try:
                    names.append(open(f'{{tasks}}/{{task}}/comm').read().strip())
                except FileNotFoundError:                           # A thread that ended after listdir.
                    pass
            return [name for name in names if 'gloo' in name]
        assert not os.path.isdir(tasks) or gloo_threads(), 'no gloo threads to watch: have they been renamed?'
        dist.shutdown()
        assert wrapper() is None, 'the DDP wrapper outlived the process group'
        assert not os.path.isdir(tasks) or not gloo_threads(), f'gloo threads {{gloo_threads()}} outlived the process group'
    '''))
    result = run_python(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)], env={'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'deprecated' not in result.stderr, result.stderr[-3000:]           # DDP's arguments as this torch names them.
    assert 'Grad strides do not match' not in result.stderr, result.stderr[-3000:]   # 1x1 kernels: a false alarm.
    for rank in range(2):
        for saved in torch.load(tmp_path / f'rank{rank}.pt'):
            for own, reduced in zip(saved['own'], saved['reduced']):
                assert torch.allclose(reduced, own, rtol=1e-6, atol=1e-9), (own, reduced)

def test_rerunning_a_finished_run_changes_nothing(assets, tmp_path):
    assert train_cli(assets, tmp_path, '--duration=8', '--snapshot=8').returncode == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    again = train_cli(assets, tmp_path, '--duration=8', '--snapshot=8', '--ts=10,39')
    assert again.returncode == 0, again.stderr
    assert 'finished run' in again.stdout and 'nothing changed' in again.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before

def test_a_second_run_in_a_running_runs_outdir_is_refused_and_a_killed_run_leaves_no_lock(assets, tmp_path):
    """Two jobs in one --outdir (a job started twice, a requeued job whose first copy still runs) both resumed and
    interleaved their checkpoints and logs. Now the second is refused before it writes; the lock dies with its process."""
    import signal
    import subprocess
    from dnnlib.util import UserError
    from torch_utils.distributed import run_folder_lock
    outdir = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', 'import time; from torch_utils.distributed import run_folder_lock\n'
        f'with run_folder_lock({str(outdir)!r}, "--outdir"):\n    print("locked", flush=True); time.sleep(300)'],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        second = train_cli(assets, outdir, '--duration=8')
        assert second.returncode != 0 and f'another run (pid {holder.pid} on ' in second.stderr, second.stderr[-2000:]
        assert sorted(p.name for p in outdir.iterdir()) == ['.run-lock']        # It wrote nothing.
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_folder_lock(str(outdir), '--outdir'):
        with pytest.raises(UserError, match='another run'):     # Another open of the file, as another process would.
            with run_folder_lock(str(outdir), '--outdir'):
                pass
    assert train_cli(assets, outdir, '--duration=8').returncode == 0

@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full, a device that is always full')
def test_the_lock_of_a_run_folder_on_a_full_disk_leaves_the_error_to_the_files(tmp_path):
    """Writing the holder's pid into the lock file is for the message only: a full disk there is no traceback, at entry
    or at exit (the run's next write names the disk). The lock file is stood in for by /dev/full."""
    from torch_utils.distributed import run_folder_lock
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / '.run-lock').symlink_to('/dev/full')
    with run_folder_lock(str(tmp_path / 'run'), '--outdir'):
        pass

def test_dry_run_prints_the_resolved_configuration_and_writes_nothing(assets, tmp_path):
    import json
    result = train_cli(assets, tmp_path / 'run', '--dry-run', '--lr=0.5')
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout[:result.stdout.rindex('}') + 1])
    assert config['lr'] == 0.5 and config['gamma'] == 0.414 and config['ts'] == [10, 22, 39] and config['seed'] == 0
    assert not (tmp_path / 'run').exists()
    split = run_python(['train_ncvsd.py', '--preset=tiny', f'--outdir={tmp_path / "run"}', '--dry-run', '--batch=8', '--batch-gpu=4'],
        env={'WORLD_SIZE': '3'})                    # The ranks torchrun would start: 8 does not split over 3 × 4.
    assert split.returncode != 0 and '--batch=8 is not divisible by ranks × --batch-gpu = 3 × 4' in split.stderr, split.stderr

@pytest.mark.parametrize('script', sorted(f for f in os.listdir(os.path.join(ROOT, 'quick_start')) if f.startswith('train-')))
def test_quick_start_training_scripts_are_valid_runs_on_eight_ranks(tmp_path, script):
    """Each quick_start/train-*.sh, its torchrun replaced by one process that sees 8 ranks: its options resolve (preset,
    batch split, durations) without loading anything."""
    import json
    import subprocess
    (tmp_path / 'torchrun').write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        f'WORLD_SIZE=8 exec {sys.executable} "$@"\n')
    (tmp_path / 'torchrun').chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}', PYTHONPATH=ROOT)
    result = subprocess.run(['bash', os.path.join('quick_start', script), '--dry-run'], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads(result.stdout[:result.stdout.rindex('}') + 1])
    assert config['preset'] == script[len('train-'):-len('.sh')] and config['batch'] % (8 * config['batch_gpu']) == 0
    assert 'nothing was loaded or written' in result.stdout

def test_every_option_and_preset_key_is_declared_once_with_its_part_in_the_run_identity():
    """Each CLI option and preset key is a run_config key: part of the identity, or declared resumable."""
    import glob
    import train_ncvsd
    from training.run_config import KEYS, load_preset
    options = {param.name for param in train_ncvsd.main.params} - {'dry_run'}
    assert options <= set(KEYS), options - set(KEYS)
    for path in glob.glob(os.path.join(ROOT, 'presets', '*.json')):
        assert set(load_preset(path)) <= set(KEYS), path
    assert {'lr', 'seed', 'batch', 'P_mean', 'gamma', 'net', 'data', 'teacher'} <= {k for k, key in KEYS.items() if not key.resumable}

def test_precision_reaches_students_and_teacher(assets, tmp_path, monkeypatch):
    """--precision=bf16 runs on the CPU: every network of the loop computes its body in bfloat16."""
    from training import training_loop as loop
    seen = []
    def recording_set_precision(net, precision):
        seen.append((type(net).__name__, precision))
        return set_precision(net, precision)
    from training.networks_edm2 import set_precision
    monkeypatch.setattr(loop, 'set_precision', recording_set_precision)
    tiny_run(assets, tmp_path, precision='bf16')
    assert sorted(seen) == sorted([('ConditionalPrecond', 'bf16'), ('ConditionalPrecond', 'bf16'), ('ConditionalDiscriminator', 'bf16'), ('Precond', 'bf16')])
    snapshot = pickle.load(open(next(tmp_path.glob('network-snapshot-*-0.050.pkl')), 'rb'))['ema']
    assert snapshot.model.use_fp16 and snapshot.model.reduced_dtype == 'bfloat16'

def test_training_sets_the_published_backends(assets, tmp_path):
    """No TF32 convolutions or matmuls, float16 matmuls reducing in float32 (torch's defaults allow both), cuDNN
    benchmarking: as the published training sets them. (Restored by hand: torch.backends.cuda.matmul's flags are
    answered by __getattr__, which pytest 9.2's monkeypatch takes for attributes to delete.)"""
    flags = ((torch.backends.cudnn, 'allow_tf32'), (torch.backends.cuda.matmul, 'allow_tf32'),
        (torch.backends.cuda.matmul, 'allow_fp16_reduced_precision_reduction'))
    settings = {(owner, name): True for owner, name in flags}
    settings[(torch.backends.cudnn, 'benchmark')] = False
    before = {flag: getattr(*flag) for flag in settings}
    try:
        for (owner, name), value in settings.items():
            setattr(owner, name, value)
        tiny_run(assets, tmp_path)
        assert [getattr(owner, name) for owner, name in flags] == [False, False, False]
        assert torch.backends.cudnn.benchmark
    finally:
        for (owner, name), value in before.items():
            setattr(owner, name, value)

def test_sec_per_kimg_after_a_resume_is_measured_from_the_resume(assets, tmp_path):
    import re, time
    first = train_cli(assets, tmp_path, '--duration=16', '--status=8', '--checkpoint=8', '--snapshot=16')
    assert first.returncode == 0, first.stderr
    os.remove(tmp_path / 'training-state-0000000.016.pt')                     # Resume from 8 images...
    time.sleep(8)                                                             # ...after a pause that is not training.
    resumed = train_cli(assets, tmp_path, '--duration=16', '--status=8', '--checkpoint=8', '--snapshot=16')
    assert resumed.returncode == 0, resumed.stderr
    rate = lambda out: [float(v) for v in re.findall(r'sec/kimg (\S+)', out)]
    assert len(rate(resumed.stdout)) == 1 and rate(resumed.stdout)[0] < 3 * max(rate(first.stdout)) + 200, (first.stdout, resumed.stdout)

def test_status_lines_count_snapshot_writing_as_maintenance_not_training(assets, tmp_path, monkeypatch):
    """As in EDM2, sec/kimg is the time spent in iterations; writing snapshots (and grids, checkpoints) is reported as
    maintenance. Each snapshot here takes 100 s on the loop's clock, in both status intervals."""
    import json, types, time
    from training import training_loop as loop
    clock = types.SimpleNamespace(offset=0.0)
    monkeypatch.setattr(loop, 'time', types.SimpleNamespace(time=lambda: time.time() + clock.offset))
    save = loop.SnapshotWriter.save
    def slow_save(self, cur_nimg):
        clock.offset += 100
        return save(self, cur_nimg)
    monkeypatch.setattr(loop.SnapshotWriter, 'save', slow_save)
    training_loop(run_dir=str(tmp_path), total_nimg=16, **dict(loop_options(assets), status_nimg=8, snapshot_nimg=8))
    records = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert len(records) == 2
    for record in records:
        assert record['Timing/maintenance_sec']['mean'] >= 100
        assert record['Timing/sec_per_kimg']['mean'] * 8 / 1000 < 100
    assert records[1]['Timing/total_sec']['mean'] >= 200                    # The run's time includes its maintenance.
    assert [record['Loss/learning_rate']['mean'] for record in records] == [pytest.approx(0.01)] * 2   # EDM2's record of it.

def test_cpu_memory_in_a_status_line_counts_the_data_workers():
    """cpumem, as in EDM2, is the resident memory of the process and its children (the DataLoader workers): a child
    holding 256 MiB adds at least that much."""
    import subprocess, psutil
    from training.training_loop import memory_report
    child = subprocess.Popen([sys.executable, '-c', 'import sys; block = b"x" * (256 << 20); print("ready", flush=True); sys.stdin.read()'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == 'ready\n'
        assert memory_report()[0] - psutil.Process().memory_info().rss / 2**30 >= 0.25
    finally:
        child.stdin.close()
        child.wait()

@pytest.mark.parametrize('device', DEVICES)
def test_gpu_memory_in_a_status_line_is_the_intervals_peak(device):
    """gpumem and reserved, as in EDM2, are the peaks on the run's device since the last status line (zeros off CUDA):
    a 256 MiB block freed before one status line counts in it, and not in the next."""
    from training.training_loop import memory_report
    block = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    del block
    _, first_peak, first_reserved = memory_report(torch.device(device))
    _, second_peak, _ = memory_report(torch.device(device))
    if device == 'cpu':
        assert first_peak == first_reserved == second_peak == 0
    else:
        assert first_peak >= 0.25 and first_reserved >= 0.25 and second_peak < first_peak - 0.2

def run_until_the_toy_fit(tmp_path, probe, *options):
    """Launch the toy preset on the CPU with `options` in a fresh process, which prints `probe` (a Python expression;
    torch and training.speed imported) where the toy's initial network would be fitted, and stops there."""
    script = tmp_path / 'fit.py'
    script.write_text(textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        import train_ncvsd
        from training import speed, train_setup
        def fit(*args, **kwargs):
            print('at the fit:', {probe})
            sys.exit(0)
        train_setup.fit_denoiser_network = fit
        train_ncvsd.main(['--preset=toy', '--outdir={tmp_path / "run"}', '--device=cpu', *{list(options)!r}])
    '''))
    result = run_python([str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split('at the fit: ')[-1].strip()

def test_the_run_sets_the_published_backends_before_fitting_the_toy_init(tmp_path):
    """The toy's initial network is fitted under the run's backend settings (no TF32 on a GPU), which launch sets
    first: torch's default lets cuDNN use TF32 for float32 convolutions."""
    assert run_until_the_toy_fit(tmp_path, 'torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32') == 'False False'

def test_the_run_sets_the_speed_options_for_its_precision(tmp_path):
    """launch sets the speed options as they measure best on its device for its bodies' precision: in bfloat16 on the
    CPU without torch's fused attention kernel (training.speed.PRECISION_OFF)."""
    probe = "speed.get_speed_options() == speed.device_defaults(torch.device('cpu'), precision='bf16') != speed.device_defaults(torch.device('cpu'))"
    assert run_until_the_toy_fit(tmp_path, probe, '--precision=bf16') == 'True'

def test_a_nonfinite_loss_is_named_in_a_warning_after_the_status_line(tmp_path, capsys):
    """A NaN in one sample makes its phase's whole gradient NaN, which the loop zeroes: training goes on learning
    nothing, so the status line is followed by a warning naming the phases."""
    from dnnlib import EasyDict
    from torch_utils import training_stats
    from training.training_loop import report_status
    state = EasyDict(cur_nimg=16, total_elapsed_time=0.0)
    for phase, value in (('score', float('nan')), ('discriminator', 0.7), ('generator', float('inf'))):
        training_stats.report(f'Loss/{phase}', torch.tensor([value, 1.0]))
    report_status(state, 0.0, 0.0, 0, str(tmp_path / 'stats.jsonl'))
    status, warning = capsys.readouterr().out.strip().split('\n')
    assert status.startswith('kimg 0.016') and 'score nan' in status and 'discriminator 0.8500' in status
    assert warning.startswith('Warning: the score and generator loss was not finite in this interval')
    training_stats.report('Loss/score', torch.tensor([0.5]))
    report_status(state, 0.0, 0.0, 0, str(tmp_path / 'stats.jsonl'))
    assert 'Warning' not in capsys.readouterr().out
