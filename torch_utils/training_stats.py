"""Scalars reported from anywhere during training (losses, timings), averaged across ranks when collected.

    training_stats.report('Loss/score', loss)          # any rank, any device, any number of values
    collector = training_stats.Collector('Loss/.*')
    collector.update(); collector.mean('Loss/score')
"""

import re
import weakref

import numpy as np
import torch

_state = dict(rank=0, sync_device=None, synced=False)
_pending = {}           # name -> {device: float64 [count, sum, sum of squares]} reported since the last sync
_collectors = weakref.WeakSet()     # Live collectors: each one's running interval receives every synced moment.

def init_multiprocessing(rank, sync_device):
    """This process's rank, and the device the all-reduce runs on (None: the CPU, for gloo)."""
    assert not _state['synced'], 'init_multiprocessing() must come before the first collection'
    _state.update(rank=rank, sync_device=sync_device)

def _moments(values):
    flat = torch.as_tensor(values).detach().reshape(-1).to(torch.float64)
    return torch.stack([torch.ones_like(flat).sum(), flat.sum(), flat.square().sum()])

def report(name, value):
    """Add the values of `value` (a scalar or a tensor) to the statistic `name`; returns `value`."""
    per_device = _pending.setdefault(name, {})
    if torch.as_tensor(value).numel() > 0:
        moments = _moments(value)
        if moments.device in per_device:
            per_device[moments.device] += moments
        else:
            per_device[moments.device] = moments
    return value

def report0(name, value):
    """report() from rank 0 only; the other ranks still register the name, so collections stay in step."""
    return report(name, value if _state['rank'] == 0 else [])

def _sync(names):
    """Fold the pending moments of `names`, summed over ranks, into the running interval of every live collector whose
    pattern they match. (Not into totals since the start, differenced at each update: one NaN made every later
    interval NaN.)"""
    if not names:
        return
    _state['synced'] = True
    device = _state['sync_device'] or torch.device('cpu')
    pending = torch.zeros([len(names), 3], dtype=torch.float64, device=device)
    for row, name in enumerate(names):
        for moments in _pending[name].values():
            pending[row] += moments.to(device)
        _pending[name].clear()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(pending)
    for name, moments in zip(names, pending.cpu()):
        for collector in _collectors:
            if collector._pattern.fullmatch(name):
                collector._running[name] = collector._running.get(name, 0) + moments

class Collector:
    """Means and standard deviations of the statistics matching `regex`, over the interval between the
    last two update() calls (keep_previous: a statistic not reported since keeps its last interval)."""

    def __init__(self, regex='.*', keep_previous=True):
        self._pattern = re.compile(regex)
        self._keep_previous = keep_previous
        self._running = {}       # name -> moments synced since the last update
        self._interval = {}      # name -> moments of the last interval
        _collectors.add(self)
        self.update()            # What was reported before this collector existed is not its to report.
        self._interval.clear()

    def names(self):
        return [name for name in _pending if self._pattern.fullmatch(name)]

    def update(self):
        """Collect (an all-reduce under torchrun: every rank must call it)."""
        if not self._keep_previous:
            self._interval.clear()
        _sync(self.names())
        for name, moments in self._running.items():
            if moments[0] != 0:
                self._interval[name] = moments
        self._running = {}

    def _get(self, name):
        assert self._pattern.fullmatch(name), name
        return self._interval.get(name, torch.zeros(3, dtype=torch.float64))

    def num(self, name):
        return int(self._get(name)[0])

    def mean(self, name):
        count, total, _squares = self._get(name).tolist()
        return total / count if count else float('nan')

    def std(self, name):
        count, total, squares = self._get(name).tolist()
        if not count or not np.isfinite(total):
            return float('nan')
        return float(np.sqrt(max(squares / count - (total / count) ** 2, 0)))

    def as_dict(self):
        """{name: {num, mean, std}} of the last interval (a stats.jsonl record)."""
        return {name: dict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in self.names() if self.num(name)}

    def __getitem__(self, name):
        return self.mean(name)

default_collector = Collector(keep_previous=False)
