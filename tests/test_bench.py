"""The benchmark scripts run and report (their figures are not asserted: wall-clock time is not a test)."""

import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import types

import torch

from conftest import ROOT, run_python

def test_train_step_rejects_a_bad_variant():
    result = run_python(['bench/train_step.py', '--device=cpu', '--variant=cuda_graphs=True'])
    assert result.returncode != 0 and 'cuda_graphs=True needs a CUDA device' in result.stderr

def test_benchmarks_name_the_presets_they_can_build():
    """A preset without the teacher's whole architecture (or an unknown one) is a one-line error, not a traceback."""
    for script, preset, message in [('bench/train_step.py', 'toy', 'does not give the teacher\'s whole architecture'),
            ('bench/sample.py', 'no-such-preset', 'unknown preset "no-such-preset"')]:
        result = run_python([script, '--device=cpu', f'--preset={preset}'])
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr

def test_benchmarks_refuse_bad_input_in_one_line():
    """These were tracebacks: torch's assertion for CUDA on a machine without it, a UserError escaping bench/exact.py,
    int() of a seed range. (On a machine with CUDA, 'cuda:64' is the device it lacks.)"""
    missing = 'cuda:64' if torch.cuda.is_available() else 'cuda'
    for args, message in [(['bench/train_step.py', f'--device={missing}', '--iters=0'], f'--device={missing} but'),
            (['bench/sample.py', f'--device={missing}'], f'--device={missing} but'),
            (['bench/saved_memory.py', f'--device={missing}'], f'--device={missing} but'),
            (['bench/exact.py', '--student=no-such-student.pkl'], 'file not found: no-such-student.pkl'),
            (['bench/toy_quality.py', '--seeds=3-1'], '"3-1" in "3-1" is an empty range')]:
        result = run_python(args)
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, (args, result.stderr[-2000:])

def test_train_step_reports_what_it_measured_when_stopped():
    """Alternating variants, each reported with its ratio to the first; a time limit (SIGTERM, as `timeout` sends)
    cuts the run short but not its report."""
    process = subprocess.Popen([sys.executable, 'bench/train_step.py', '--preset=bench-a', '--batch=2', '--iters=100000',
        '--warmup=0', '--device=cpu', '--variant=off=all', '--variant=default'], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1'))
    try:
        for line in process.stdout:
            if line.startswith('timed iteration 1/'):
                break
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert 'Stopped by SIGTERM' in stdout and stdout.count('median ms/iter') == 2 and '1.00x [off=all]' in stdout
    assert 'per round 1.00x (1.00-1.00)' in stdout

def test_benchmarks_name_the_cpu_they_ran_on(monkeypatch):
    """CPU figures depend on the vector units (bf16 ran 7x slower than fp32 on an AVX2 CPU, faster on one with AVX-512
    BF16), so the benchmarks' header names the CPU's model, torch's vector instructions and whether bf16 is native."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, 'bench'))
    import common
    name = common.device_name(torch.device('cpu'))
    assert re.fullmatch(r'cpu \(.+, [A-Z0-9_]+, bfloat16 (native|emulated)\)', name), name
    assert torch.backends.cpu.get_cpu_capability() in name
    assert name.endswith('native)') == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setattr(common, 'computes_natively', lambda precision, device: False)
    assert common.device_name(torch.device('cpu')).endswith(', bfloat16 emulated)')

def test_train_step_leaves_out_a_variant_that_fails_and_times_the_others():
    """A variant whose compiler breaks (as inductor might on a GPU it never ran on) is left out with its traceback and
    a one-line reason; the other variants are still timed, compared and profiled, and the exit status says that
    something failed: a lent GPU's call keeps the figures of the configurations that work."""
    script = '\n'.join([
        'import sys, torch',
        'from training import training_loop',
        'def broken(graph, inputs): raise RuntimeError("the compiler broke")',
        'training_loop.compile_network = lambda net, **options: torch.compile(net, backend=broken)',
        'sys.argv = ["train_step.py", "--preset=bench-a", "--batch=2", "--iters=1", "--warmup=0", "--device=cpu",'
        ' "--variant=off=all", "--variant=compile=True", "--variant=default", "--profile=2"]',
        'sys.path.insert(0, "bench")',
        'import train_step',
        'train_step.main()'])
    result = run_python(['-c', script])
    assert result.returncode == 1 and 'Traceback' in result.stderr, result.stderr[-2000:]
    reason = "BackendCompilerFailed: backend='broken' raised: RuntimeError: the compiler broke"
    assert f'[compile=True] failed ({reason}): left out' in result.stdout
    assert result.stderr.strip().splitlines()[-1] == f'failed: [compile=True] {reason}'
    assert result.stdout.count('median ms/iter') == 2
    assert '[default] profiled once' in result.stdout and '[off=all] profiled once' in result.stdout
    assert 'timed iteration 1/1: [off=all] ' in result.stdout and '[compile=True]' not in result.stdout.split('timed iteration')[1]

def assert_profile_table(lines, top):
    """bench/common.print_profile's lines on the CPU: the busy time, its split by kind of work (adding up to it,
    convolutions among them) and the `top` largest operators."""
    total = re.fullmatch(r'([\d.]+) ms of cpu time', lines[0]).group(1)
    kinds = {kind.strip(): float(ms) for kind, ms in re.findall(r'([a-z ]+) ([\d.]+) ms \(\d+%\)', lines[1].split('by kind: ')[1])}
    assert abs(sum(kinds.values()) - float(total)) <= 0.05 * (len(kinds) + 1) + 1e-9, lines[1]
    assert 'convolution' in kinds and set(kinds) <= {'convolution', 'attention', 'matmul', 'fused by inductor', 'elementwise and other'}, lines[1]
    assert lines[2].strip() == f'the {top} largest operators:' and all(' calls  ' in line for line in lines[3:3 + top])

def test_profile_counts_cuda_kernel_time_once(monkeypatch):
    """On CUDA an operator's device time is that of the kernels it launched: the busy time counts the kernels alone
    (not operators, not user annotations spanning them), split by kind, with the launching operators listed apart."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, 'bench'))
    from common import profile_lines
    from torch.autograd import DeviceType
    event = lambda key, ms, device_type, annotation=False: types.SimpleNamespace(key=key, count=1,
        self_device_time_total=ms * 1000, device_type=device_type, is_user_annotation=annotation)
    events = [event('aten::convolution', 100, DeviceType.CPU), event('sm90_xmma_fprop_implicit_gemm_f16f16', 100, DeviceType.CUDA),
        event('aten::mul', 20, DeviceType.CPU), event('vectorized_elementwise_kernel<4, MulFunctor>', 20, DeviceType.CUDA),
        event('ProfilerStep#1', 120, DeviceType.CUDA, annotation=True)]
    lines = profile_lines(events, 'cuda', 1, step_ms=200)
    assert lines[0] == '120.0 ms of cuda time, 60% of the 200.0 ms it takes unprofiled'
    assert lines[1] == '    by kind: convolution 100.0 ms (83%), elementwise and other 20.0 ms (17%)'
    assert lines[2:] == ['    the 1 largest kernels:', '       100.0 ms  83.3%       1 calls  sm90_xmma_fprop_implicit_gemm_f16f16',
        '    the 1 largest operators launching them:', '       100.0 ms  83.3%       1 calls  aten::convolution']

def test_train_step_profiles_each_variant():
    result = run_python(['bench/train_step.py', '--preset=bench-a', '--batch=2', '--iters=1', '--warmup=0', '--device=cpu',
        '--variant=off=all', '--variant=default', '--profile=3'])
    assert result.returncode == 0, result.stderr[-2000:]
    for label in ('off=all', 'default'):
        assert_profile_table(result.stdout.split(f'[{label}] profiled once: ')[1].splitlines(), 3)

def test_ops_counts_each_variants_operations_per_phase():
    """bench/ops.py: per-phase operation counts of one eager iteration under CUDA's defaults (no GPU needed), the
    optimizer apart; the grouped weight normalisation issues fewer operations than without it; compile is refused."""
    result = run_python(['bench/ops.py', '--preset=bench-a', '--defaults=cuda', '--variant=default',
        '--variant=off=grouped_weight_norm', '--top=3'])
    assert result.returncode == 0, result.stderr[-2000:]
    totals = {}
    for label in ('default', 'off=grouped_weight_norm'):
        line = result.stdout.split(f'[{label}] ')[1].splitlines()[0]
        counts = dict(re.findall(r'(score|discriminator|generator|total) ([\d,]+)', line))
        totals[label] = int(counts.pop('total').replace(',', ''))
        assert set(counts) == {'score', 'discriminator', 'generator'} and 'optimizer steps ' in line
        assert totals[label] == sum(int(value.replace(',', '')) for value in counts.values())
    assert totals['default'] < totals['off=grouped_weight_norm']
    refused = run_python(['bench/ops.py', '--preset=bench-a', '--variant=compile=True'])
    assert refused.returncode == 2 and 'counted eagerly' in refused.stderr

def test_train_step_reports_when_stopped_while_compiling():
    """SIGTERM during torch.compile reaches the script wrapped in the compiler's own error: still a report, exit 0."""
    process = subprocess.Popen([sys.executable, 'bench/train_step.py', '--preset=bench-a', '--batch=2', '--iters=1',
        '--warmup=0', '--device=cpu', '--variant=compile=True'], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1'))
    try:
        for line in process.stdout:
            if line.startswith('bench-a: batch 2'):
                break
        time.sleep(3)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0 and 'Stopped by SIGTERM' in stdout, stderr[-2000:]

def test_a_sigterm_passes_the_compilers_own_error_handling():
    """The compiler catches Exception around steps it may skip (inductor probing the CPU's vector units by building a
    test program, a cache it may bypass): a SIGTERM there finished the compile and the run as if nothing had happened
    (3 cold starts in 8, the signal 2-25 s in). Its Stopped goes through such a handler, and is still
    recognised wrapped in an error of torch.compile's."""
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    from train_step import Stopped, stop, was_stopped
    try:
        try:
            stop(signal.SIGTERM, None)
        except Exception:
            raise AssertionError('an `except Exception` caught the SIGTERM')
    except Stopped as stopped:
        wrapped = RuntimeError('compiling failed')
        wrapped.__cause__ = stopped
        assert was_stopped(stopped) and was_stopped(wrapped) and not was_stopped(RuntimeError('other'))

def test_gpu_assets_dataset_feeds_its_teacher(tmp_path):
    """Fewer images than classes (512 for ImageNet's 1000 in the GPU check) still give the teacher's class count."""
    from training.dataset import ImageFolderDataset
    from training.encoders import StandardRGBEncoder
    from training.network_io import load_network
    from training.train_setup import check_data_matches
    result = run_python(['bench/gpu_assets.py', '--preset=bench-b', f'--outdir={tmp_path}', '--images=3'])
    assert result.returncode == 0, result.stderr[-2000:]
    teacher, _no_encoder = load_network(str(tmp_path / 'teacher.pkl'), torch.device('cpu'), role='teacher', verbose=False)
    dataset = ImageFolderDataset(str(tmp_path / 'data.zip'))
    assert teacher.label_dim == dataset.label_dim == 10
    check_data_matches(dataset, StandardRGBEncoder(), teacher, cond=True)

def test_sample_compares_students_with_heun():
    result = run_python(['bench/sample.py', '--preset=bench-a', '--batch=2', '--repeats=1', '--heun-steps=2', '--device=cpu', '--profile=2'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'teacher Heun 2 steps (3 NFE)' in result.stdout and result.stdout.count('speed-up x') == 3
    assert result.stdout.count('ms per batch of 2') == 4 and 'peak memory' in result.stdout
    assert_profile_table(result.stdout.split('[student 1 step] profiled once: ')[1].splitlines(), 2)

def test_saved_memory_compares_variants():
    result = run_python(['bench/saved_memory.py', '--preset=bench-a', '--batch=32', '--precision=fp32', '--device=cpu',
        '--variant=off=all', '--variant=default'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('generator phase (G + frozen D)') == 2 and '1.00x [off=all]' in result.stdout

def test_iteration_memory_tallies_live_storages(monkeypatch):
    """bench/iteration_memory.py: the tally holds a storage from the operation that made it until it is freed (views
    and in-place results add nothing); the iteration's figures come per variant, flat gradients holding none between phases."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, 'bench'))
    from iteration_memory import LiveStorage
    tally, mib = LiveStorage(), 2**18                                 # float32 elements per MiB
    weights = torch.zeros(mib)                                        # Made before: not the iteration's.
    with tally:
        first, second = torch.zeros(mib), torch.zeros(2 * mib)
        view = second[:mib]
        weights.add_(1)
        del first
        third = torch.ones(mib)
    assert (tally.peak, tally.live) == (3 * 2**20, 3 * 2**20) and view.numel() + third.numel() == 2 * mib
    result = run_python(['bench/iteration_memory.py', '--preset=bench-a', '--batch=2', '--variant=off=flat_gradients', '--variant=default'])
    assert result.returncode == 0, result.stderr[-2000:]
    held = dict(re.findall(r'\[(.*)\] peak \d+ MiB .* gradients held at the start (\d+) MiB', result.stdout))
    assert int(held['off=flat_gradients']) > 0 and int(held['default']) == 0, result.stdout

def test_variant_settings_apply_in_order():
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    from train_step import parse_variant
    import torch
    speed = parse_variant('on=all off=masked_clip', torch.device('cpu'), 'fp32').speed
    assert not speed['masked_clip'] and all(on for name, on in speed.items() if name != 'masked_clip')
    assert parse_variant('off=all on=masked_clip', torch.device('cpu'), 'fp32').speed == {name: name == 'masked_clip' for name in speed}
    # Compiled variants start from the compiled defaults (on the CPU without channels-last), wherever compile= is written.
    assert not parse_variant('compile=True', torch.device('cpu'), 'fp32').speed['channels_last']
    assert parse_variant('on=channels_last compile=True', torch.device('cpu'), 'fp32').speed['channels_last']

def test_gpu_check_refuses_unknown_modes_and_says_when_cuda_is_missing(tmp_path):
    """bench/gpu_check.sh: an unknown mode is a usage line (exit 2) before anything runs; on a machine without CUDA the
    check (not its DEVICE=cpu rehearsal) ends at once with the verdict line naming why, not step by step."""
    run = lambda *args, **env: subprocess.run(['bash', 'bench/gpu_check.sh', *args], cwd=ROOT, text=True, capture_output=True,
        env=dict(os.environ, WORK=str(tmp_path), **env))
    result = run('compile')
    assert result.returncode == 2 and 'usage: bash bench/gpu_check.sh [timing|options]' in result.stdout
    if not torch.cuda.is_available():
        result = run(DEVICE='cuda')
        assert result.returncode == 1 and result.stdout.splitlines()[-1] == 'GPU check: FAIL (CUDA not available)'

def test_gpu_check_times_the_eager_step_when_the_cold_compile_does_not_finish(tmp_path):
    """bench/gpu_check.sh timing: where the cold compile did not finish (its time ran out, or the compiler failed), the
    timed step leaves compile=True out, which would spend the step compiling again and report nothing, so the eager
    variants are still timed and profiled; where it finished, compile=True is timed beside them. The benchmarks are
    stood in for by a `python` that records its arguments and exits as the cold compile is told to."""
    stand_in = tmp_path / 'bin' / 'python'
    stand_in.parent.mkdir()
    stand_in.write_text(f'''#!/usr/bin/env bash
case "$1" in
    bench/*) echo "$*" >> "$CALLS"; case "$*" in *--iters=0*) exit $COLD_RC;; esac; exit 0;;
esac
exec {sys.executable} "$@"
''')
    stand_in.chmod(0o755)
    def timed_step(cold_rc):
        calls = tmp_path / f'calls-{cold_rc}'
        env = dict(os.environ, PATH=f'{stand_in.parent}:{os.environ["PATH"]}', CALLS=str(calls), COLD_RC=str(cold_rc),
            DEVICE='cpu', SLOW='1', BUDGET='300', WORK=str(tmp_path / 'work'), CACHE_FROM=str(tmp_path / 'no-pack'),
            TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'cache'))
        result = subprocess.run(['bash', 'bench/gpu_check.sh', 'timing'], cwd=ROOT, text=True, capture_output=True, env=env)
        cold, timed, sampled = calls.read_text().splitlines()
        assert '--iters=0' in cold and 'bench/sample.py' in sampled and '--profile=12' in timed, result.stdout
        return result.stdout, timed
    output, timed = timed_step(124)
    assert 'the cold compile did not finish: the timed step leaves compile=True out' in output
    assert '=== bench/train_step.py eager (limit' in output
    assert '--variant=off=all --variant=default --profile=12' in timed and 'compile=True' not in timed
    assert output.splitlines()[-1] == 'GPU check: PASS'
    output, timed = timed_step(0)
    assert 'did not finish' not in output and '--variant=off=all --variant=default --variant=compile=True' in timed
    assert '=== bench/train_step.py eager and compiled (limit' in output

def test_gpu_check_packs_the_compile_cache_and_a_fresh_machine_unpacks_it(tmp_path):
    """bench/gpu_check.sh CACHE_PACK=DIR: inductor's cache (binary files in folders) becomes parts that, found in
    CACHE_FROM at the start of a later call with an empty cache, unpack to the same files, with the machine they were
    made on (a pack from another machine is named as such); a cache that is not empty is left as it is, and one with
    no compiled graphs packs nothing (a call that compiled nothing cannot replace a pack). BUDGET=1 skips every step:
    only the packing runs."""
    cache, pack, fresh = tmp_path / 'cache', tmp_path / 'pack', tmp_path / 'fresh'
    files = {'fxgraph/ab/graph': os.urandom(3000), 'triton/0/kernel.cubin': os.urandom(5000)}
    for name, data in files.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(data)
    (cache / 'locks').mkdir()
    def run(cache_dir, **env):
        env = dict(os.environ, WORK=str(tmp_path / 'work'), DEVICE='cpu', BUDGET='1', TORCHINDUCTOR_CACHE_DIR=str(cache_dir),
            CACHE_FROM=str(pack), **env)
        return subprocess.run(['bash', 'bench/gpu_check.sh', 'timing'], cwd=ROOT, text=True, capture_output=True, env=env).stdout
    assert 'no compiled graphs, nothing packed' in run(tmp_path / 'empty', CACHE_PACK=str(pack)) and not pack.exists()
    assert 'inductor cache: packed into 1 part(s)' in run(cache, CACHE_PACK=str(pack))
    assert [path.name for path in pack.iterdir()] == ['inductor-cache.tgz.part-00']
    output = run(fresh)
    assert 'inductor cache: unpacked from' in output and 'made on torch' in output and 'another' not in output
    assert {str(path.relative_to(fresh)) for path in fresh.rglob('*') if path.is_file()} == {*files, 'made-on.txt'}
    assert all((fresh / name).read_bytes() == data for name, data in files.items())
    (fresh / 'fxgraph/ab/graph').write_bytes(b'newer')
    assert 'not empty, the pack' in run(fresh) and (fresh / 'fxgraph/ab/graph').read_bytes() == b'newer'
    (fresh / 'made-on.txt').write_text('torch 2.11.0+cu130, CUDA 13.0, NVIDIA H200\n')
    (pack / 'inductor-cache.tgz.part-00').unlink()
    with tarfile.open(pack / 'inductor-cache.tgz.part-00', 'w:gz') as packed:
        packed.add(fresh, '.')
    assert 'made on another torch, CUDA or GPU' in run(tmp_path / 'fresh2')
