"""Process group and device of this rank (torchrun or a single process), stopping on SIGTERM, and atomic checkpoints.

The backend follows the device: nccl when every local rank owns a GPU, gloo on the CPU otherwise.
"""

import contextlib
import functools
import gc
import importlib
import itertools
import multiprocessing
import os
import re
import signal
import socket
import threading

import torch

from dnnlib.util import UserError, STAMP_PATTERN, atomic_file, error_summary, make_output_folder
from . import training_stats

_device = None          # This rank's device, chosen by init().

def _env_int(name, default):
    return int(os.environ.get(name, default))

def parse_device(requested):
    """torch.device of a --device value; a UserError unless it names cpu, cuda, cuda:N or mps."""
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f'--device={requested} is not a device this code runs on; use cuda, cuda:N, cpu or mps')
    return device

def choose_device(requested=None, local_ranks=1, local_rank=0):
    """(device, note or None) for this rank. requested: None (automatic), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = None if requested is None else parse_device(requested)
    kind = None if device is None else device.type
    if kind == 'cuda' and num_gpus == 0:
        raise UserError(f'--device={requested} but CUDA is not available here; use --device=cpu (or leave --device out)')
    index = None if device is None else device.index
    if kind == 'cuda' and index is not None and index >= num_gpus:
        raise UserError(f'--device={requested} but this machine has {num_gpus} GPU(s), cuda:0 to cuda:{num_gpus - 1}; '
            'choose one of them')
    if kind == 'cuda' and local_ranks > num_gpus:
        raise UserError(f'--device={requested} with {local_ranks} ranks on this machine needs {local_ranks} GPUs, '
            f'it has {num_gpus}; use --nproc_per_node={num_gpus} or --device=cpu')
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f'--device={requested} but MPS is not available here; use --device=cpu')
    if kind not in (None, 'cuda'):
        return device, None
    if kind is None and local_ranks > num_gpus:
        note = (f'Note: {local_ranks} ranks on this machine but {num_gpus} GPU(s): computing on the CPU with gloo; '
            f'use --nproc_per_node={num_gpus} to compute on CUDA') if num_gpus else None
        return torch.device('cpu'), note
    return torch.device('cuda', local_rank if index is None or local_ranks > 1 else index), None

def launched_world_size():
    """The number of ranks torchrun launched (1 without torchrun), known before init()."""
    return _env_int('WORLD_SIZE', 1)

def init(device=None):
    """Choose this rank's device and, under torchrun with several ranks, join the process group."""
    global _device
    world_size = launched_world_size()
    local_rank = _env_int('LOCAL_RANK', 0)
    local_ranks = _env_int('LOCAL_WORLD_SIZE', world_size)
    _device, note = choose_device(device, local_ranks, local_rank)
    if _device.type == 'cuda':
        torch.cuda.set_device(_device)
    if world_size > 1 and not torch.distributed.is_initialized():
        importlib.import_module('torch.distributed.nn')     # Before the group: its defaults then hold None (see shutdown).
        backend = 'nccl' if _device.type == 'cuda' else 'gloo'
        torch.distributed.init_process_group(backend=backend, init_method='env://')
    if note and get_rank() == 0:
        print(note, flush=True)
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=_device if _device.type == 'cuda' else None)
    return _device

def get_device():
    """The device chosen by init(); before init(), CUDA if present, else the CPU."""
    if _device is not None:
        return _device
    return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')

def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()

def get_rank():
    return torch.distributed.get_rank() if is_distributed() else 0

def get_world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1

def barrier():
    if is_distributed():
        torch.distributed.barrier()

def shutdown():
    """Destroy the process group, which ends its threads, while the interpreter is whole: an object still holding the
    group keeps its gloo threads running into the interpreter's exit, where a two-rank test was seen to abort (exit -6,
    'terminate called without an active exception', once in some hundreds of runs). Two such holders: reference
    cycles around a DDP wrapper (collected here first), and torch.distributed.nn's functions, whose `group=group.WORLD`
    defaults are evaluated when DDP first imports the module (init() imports it before the group exists: None)."""
    if is_distributed():
        gc.collect()
        torch.distributed.destroy_process_group()

def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)

def all_reduce_sum(tensor):
    """Sum over ranks, in place; a single process leaves the tensor as it is. nccl reduces CUDA tensors
    only, so a CPU tensor makes the round trip through this rank's GPU."""
    if not is_distributed():
        return tensor
    if torch.distributed.get_backend() == 'nccl' and tensor.device.type != 'cuda':
        on_gpu = tensor.to(get_device())
        torch.distributed.all_reduce(on_gpu)
        return tensor.copy_(on_gpu)
    torch.distributed.all_reduce(tensor)
    return tensor

def all_gather_object(obj):
    """The list of every rank's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    everyone = [None for _ in range(get_world_size())]
    torch.distributed.all_gather_object(everyone, obj)
    return everyone

def _bits(tensor):
    """A float tensor's bits as integers of its width, so that NaN equals NaN; other tensors as they are."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])

def check_ranks_agree(modules, advice):
    """A UserError on every rank where any rank's parameters or buffers of `modules` ({name: module}) differ from rank
    0's by a bit, naming the first such tensor; `advice` says what to do. Averaged gradients keep the ranks identical,
    so a difference is a defect (a tensor outside the averaging, an update of one rank's own). One broadcast per tensor
    and one host sync: a check for checkpoints, not iterations."""
    if not is_distributed():
        return
    names, differs = [], []
    for module_name, module in modules.items():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            reference = tensor.detach().clone(memory_format=torch.contiguous_format)
            torch.distributed.broadcast(reference, src=0)
            differs.append((_bits(reference) != _bits(tensor.detach())).any())
            names.append(f'{module_name}.{name}')
    if not names:
        return
    ranks_differing = all_reduce_sum(torch.stack(differs).to(torch.int32))    # [tensors]: how many ranks differ from rank 0
    differing = ranks_differing.nonzero().flatten().tolist()
    if differing:
        first = differing[0]
        raise UserError(f'the ranks have diverged: {names[first]} differs from rank 0\'s on {ranks_differing[first].item()} of '
            f'the {get_world_size() - 1} other ranks ({len(differing)} of the {len(names)} tensors differ); {advice}')

#----------------------------------------------------------------------------
# Stopping on SIGTERM.

class StopOnSignal:
    """While active (a context manager), SIGTERM (a scheduler's preemption or time limit, torchrun passing its own on)
    only asks the training loop to stop. requested() gives every rank the same answer at the same call, so that all
    stop after the same iteration. A rank often gets two (a scheduler signals every process of the job, and torchrun
    passes its own on): the second does nothing more. SIGKILL (or Ctrl-C) stops at once.

    A scheduler's SIGTERM reaches the DataLoader workers too, and the loop still needs their batches to finish its
    iteration: workers started with `worker_init_fn` let it pass until the loop has ended, and exit on it after (torch
    and multiprocessing stop leftover workers with it)."""

    def __init__(self, signum=signal.SIGTERM):
        self.signum, self.received, self.previous, self.group = signum, False, None, None
        self.ended = multiprocessing.Event()                            # Shared with the forked workers.
        self.worker_init_fn = functools.partial(_shield_worker, signum, self.ended)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # Python sets handlers there only.
            previous = signal.signal(self.signum, self._receive)
            self.previous = signal.SIG_DFL if previous is None else previous     # None: set outside Python.
        if is_distributed() and torch.distributed.get_backend() != 'gloo':
            self.group = torch.distributed.new_group(backend='gloo')    # The flag crosses on the CPU: no GPU wait.
        return self

    def _receive(self, signum, frame):
        self.received = True

    def __exit__(self, *exc_info):
        self.ended.set()
        if self.previous is not None:
            signal.signal(self.signum, self.previous)

    def requested(self):
        """Whether any rank has received the signal (a CPU all-reduce where there are several ranks)."""
        if not is_distributed():
            return self.received
        flag = torch.tensor([int(self.received)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    @property
    def name(self):
        return signal.Signals(self.signum).name

def _shield_worker(signum, ended, _worker_id):
    signal.signal(signum, functools.partial(_worker_receive, ended))

def _worker_receive(ended, signum, frame):
    """In a DataLoader worker: nothing until the loop has ended, then exit at once. Status 0: torch's SIGCHLD handler
    reports a worker killed by a signal as a failure, with a traceback in the middle of the process's exit."""
    if ended.is_set():
        os._exit(0)

#----------------------------------------------------------------------------
# Checkpoints.

def atomic_save(obj, path):
    """torch.save through dnnlib.util.atomic_file: a crash never leaves a torn file, a full disk is a clear error."""
    with atomic_file(path) as f:
        torch.save(obj, f)

def _capture(obj):
    """What a checkpoint stores of one object: a dict's items, or its state_dict."""
    return dict(obj) if isinstance(obj, dict) else obj.state_dict()

def _restore(obj, saved):
    if isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    else:
        obj.load_state_dict(saved)

@contextlib.contextmanager
def run_folder_lock(run_dir, option):
    """Held by rank 0 while a run writes `run_dir` (made if needed), so that a second run started there (the same job
    twice, a requeued job whose first copy still runs) is refused at once instead of interleaving its files. The OS
    releases the lock when the process ends, however it ends; where the file system has no locks, there is none."""
    lock, holder = None, None
    if get_rank() == 0:
        make_output_folder(run_dir, option)
        lock = open(os.path.join(run_dir, '.run-lock'), 'a+')
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or 'a process'
            lock.close()
        except (ImportError, OSError):          # No fcntl (Windows), or a file system without flock.
            pass
        else:
            with contextlib.suppress(OSError):      # Who holds it, for the message (unbuffered): no reason to fail.
                os.ftruncate(lock.fileno(), 0)
                os.write(lock.fileno(), f'pid {os.getpid()} on {socket.gethostname()}\n'.encode())
    holder = all_gather_object(holder)[0]
    if holder is not None:
        raise UserError(f'{option}: another run ({holder}) is writing to this folder; wait for it to end, or choose '
            'another folder')
    try:
        yield
    finally:
        if lock is not None:
            lock.close()

class CheckpointIO:
    """One file holding the state of named objects (dicts, or anything with state_dict/load_state_dict)."""

    def __init__(self, **objects):
        self._objects = objects

    def save(self, pt_path, verbose=True):
        if verbose:
            print0(f'Saving {pt_path} ... ', end='', flush=True)
        contents = {name: _capture(obj) for name, obj in self._objects.items()}
        if get_rank() == 0:
            atomic_save(contents, pt_path)
        barrier()
        if verbose:
            print0('done')

    def load(self, pt_path, verbose=True):
        if verbose:
            print0(f'Loading {pt_path} ... ', end='', flush=True)
        contents = read_checkpoint(pt_path)
        for name, obj in self._objects.items():
            _restore(obj, contents[name])
        if verbose:
            print0('done')

    def load_latest(self, run_dir, verbose=True):
        """Restore the newest checkpoint of `run_dir`; its path, or None when there is none."""
        path = latest_checkpoint(run_dir)
        if path is not None:
            self.load(path, verbose=verbose)
        return path

def read_checkpoint(pt_path, mmap=False):
    """A checkpoint's contents (on the CPU; mmap: tensors read only when used); a damaged file is a UserError saying
    how to go on."""
    try:
        return torch.load(pt_path, map_location='cpu', weights_only=False, mmap=mmap)
    except Exception as err:                        # A truncated or overwritten file fails in many ways.
        raise UserError(f'{pt_path} cannot be read ({error_summary(err)}); it is damaged: '
            'delete it to resume from the checkpoint before it, or start again in a new --outdir')

CHECKPOINT_NAME = re.compile(rf'training-state-({STAMP_PATTERN})\.pt')

def checkpoint_nimg(path):
    """Images seen by the run when it wrote the checkpoint at `path` (memory-mapped: the weights are not read)."""
    return int(read_checkpoint(path, mmap=True)['state']['cur_nimg'])

def latest_checkpoint(run_dir):
    """The newest training-state-<kimg>.pt of `run_dir`, or None; the same on every rank, else a UserError (ranks on
    nodes that do not share the folder would resume from different points and hang at the end)."""
    path = newest_checkpoint(run_dir)
    views = all_gather_object(path)
    if len(set(views)) > 1:
        seen = ', '.join(f'rank {rank}: {os.path.basename(view) if view else "none"}' for rank, view in enumerate(views))
        raise UserError(f'the ranks see different checkpoints in {run_dir} ({seen}); every rank must read the same '
            'folder: put --outdir on storage that all nodes share')
    return path

def newest_checkpoint(run_dir):
    """The newest training-state-<kimg>.pt in this process's view of `run_dir`, or None. A whole <kimg> (0000005) stands
    for any image count within that kimg: where a stopped run's exact one (0000005.040) shares it, the counts stored in
    the files decide."""
    if not os.path.isdir(run_dir):
        return None
    stamps = {name: m.group(1) for name in os.listdir(run_dir) if (m := CHECKPOINT_NAME.fullmatch(name))}
    if not stamps:
        return None
    newest_kimg = max(int(float(stamp)) for stamp in stamps.values())
    newest = [name for name, stamp in stamps.items() if int(float(stamp)) == newest_kimg]
    paths = [os.path.join(run_dir, name) for name in newest]
    if any('.' not in stamps[name] for name in newest) and len(newest) > 1:
        return max(paths, key=checkpoint_nimg)
    return max(paths, key=lambda path: float(stamps[os.path.basename(path)]))
