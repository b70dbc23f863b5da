"""torch.distributed set-up (torchrun or single process) and atomic checkpoints."""

import os
import re

import torch

from . import training_stats

_sync_device = None

def init():
    """Join the process group when launched by torchrun; otherwise run as a single process."""
    global _sync_device
    if 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        if backend == 'nccl':
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
        torch.distributed.init_process_group(backend=backend, init_method='env://')
        _sync_device = torch.device('cuda') if backend == 'nccl' else None
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=_sync_device)

def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

def get_device():
    """The device this rank computes on: its CUDA device, else MPS where asked, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')

def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

def shutdown():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

def all_reduce_sum(tensor):
    """In-place sum across ranks (a no-op in a single process)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor

def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...]."""
    if not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered

#----------------------------------------------------------------------------

def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves a torn file."""
    temp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)

class CheckpointIO:
    """Saves and restores the state of named objects (modules, optimizers, dicts) in one file."""

    def __init__(self, **kwargs):
        self._state_objs = kwargs

    def save(self, pt_path, verbose=True):
        if verbose:
            print0(f'Saving {pt_path} ... ', end='', flush=True)
        data = dict()
        for name, obj in self._state_objs.items():
            if obj is None:
                data[name] = None
            elif isinstance(obj, dict):
                data[name] = dict(obj)
            elif hasattr(obj, 'state_dict'):
                data[name] = obj.state_dict()
            elif hasattr(obj, '__getstate__'):
                data[name] = obj.__getstate__()
            else:
                raise ValueError(f'cannot checkpoint {name} of type {type(obj).__name__}')
        if get_rank() == 0:
            atomic_save(data, pt_path)
        barrier()
        if verbose:
            print0('done')

    def load(self, pt_path, verbose=True):
        if verbose:
            print0(f'Loading {pt_path} ... ', end='', flush=True)
        data = torch.load(pt_path, map_location=torch.device('cpu'), weights_only=False)
        for name, obj in self._state_objs.items():
            if obj is None:
                pass
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(data[name])
            elif hasattr(obj, 'load_state_dict'):
                obj.load_state_dict(data[name])
            elif hasattr(obj, '__setstate__'):
                obj.__setstate__(data[name])
            else:
                raise ValueError(f'cannot restore {name} of type {type(obj).__name__}')
        if verbose:
            print0('done')

    def load_latest(self, run_dir, pattern=r'training-state-(\d+).pt', verbose=True):
        """Load the checkpoint with the largest number in `run_dir`; return its path, or None."""
        path = latest_checkpoint(run_dir, pattern)
        if path is not None:
            self.load(path, verbose=verbose)
        return path

def latest_checkpoint(run_dir, pattern=r'training-state-(\d+).pt'):
    if not os.path.isdir(run_dir):
        return None
    found = [(int(m.group(1)), f) for f in os.listdir(run_dir) if (m := re.fullmatch(pattern, f))]
    return os.path.join(run_dir, max(found)[1]) if found else None
