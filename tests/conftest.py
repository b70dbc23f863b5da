import os
import sys

def threads_per_process():
    """Threads for torch in a test process and the processes it starts: at most 2, and under pytest-xdist (`-n N`)
    the cores' share of each worker: 2 workers of 2 threads on 2 cores spin-wait for each other's cores."""
    return max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))))

if 'PYTEST_XDIST_WORKER_COUNT' in os.environ:         # Before torch starts its threads; the tests' processes inherit it.
    os.environ['OMP_NUM_THREADS'] = str(threads_per_process())

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
sys.path.insert(0, ROOT)
torch.set_num_threads(min(torch.get_num_threads(), threads_per_process()))      # A user's OMP_NUM_THREADS may ask for fewer.

def pytest_configure(config):
    """torch's deprecation warning about its own code (importing inductor defines torch.utils.mkldnn's TorchScript
    classes): not ours to act on, and 14 of them stood in every run's summary where ours (none) would show."""
    config.addinivalue_line('filterwarnings', r'ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning:torch\.jit\._script')

# Core tests run on every device present; CUDA shows as skipped where there is none.
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA not available'))]

def load_fixture(name):
    return torch.load(os.path.join(FIXTURES, name), weights_only=True)

@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's download cache from a test."""
    monkeypatch.setenv('NCVSD_CACHE_DIR', str(tmp_path / 'cache'))

@pytest.fixture(autouse=True)
def _same_start_in_any_order():
    """Each test starts alike wherever it runs (an xdist worker runs the tests in any order): torch's global generator
    seeded, and a statistics interval of its own (what an earlier test reported is collected here, never in the
    test's status lines)."""
    from torch_utils import training_stats
    torch.manual_seed(0)
    training_stats.default_collector.update()

@pytest.fixture
def speed_options():
    """The speed options as the test found them, restored after it."""
    from training.speed import set_speed_options
    previous = set_speed_options()
    yield
    set_speed_options(**previous)

def run_python(args, cwd=None, env=None, timeout=300):
    """Run `python args...` in a fresh process from the repository root; returns CompletedProcess."""
    import subprocess
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable] + list(args), cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
