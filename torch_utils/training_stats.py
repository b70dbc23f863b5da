"""Scalar statistics reported from anywhere during training, averaged across ranks on demand."""

import re

import numpy as np
import torch

_num_moments = 3            # [count, sum, sum of squares]
_reduce_dtype = torch.float64
_counter_dtype = torch.float64
_rank = 0
_sync_device = None
_sync_called = False
_counters = dict()          # name -> device -> [count, sum, sumsq] accumulated since the last collect
_cumulative = dict()        # name -> [count, sum, sumsq] since the beginning

def init_multiprocessing(rank, sync_device):
    """Set the rank and the device used to all-reduce statistics (None: the CPU, for gloo)."""
    global _rank, _sync_device
    assert not _sync_called
    _rank = rank
    _sync_device = sync_device

def report(name, value):
    """Record a scalar or a tensor of values under `name`; returns `value` unchanged."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value

def report0(name, value):
    """report() on rank 0 only (others still take part in collection)."""
    report(name, value if _rank == 0 else [])
    return value

class Collector:
    """Averages of the reported statistics whose names match `regex`, since the last update()."""

    def __init__(self, regex='.*', keep_previous=True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name):
        assert self._regex.fullmatch(name)
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name):
        return int(self._get_delta(name)[0])

    def mean(self, name):
        delta = self._get_delta(name)
        return float('nan') if int(delta[0]) == 0 else float(delta[1] / delta[0])

    def std(self, name):
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return np.sqrt(max(raw_var - np.square(mean), 0))

    def as_dict(self):
        """{name: {num, mean, std}} for every statistic reported since the last update (the stats.jsonl record)."""
        return {name: dict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in self.names() if self.num(name) > 0}

    def __getitem__(self, name):
        return self.mean(name)

def _sync(names):
    """All-reduce the pending counters of `names` and fold them into the cumulative totals."""
    global _sync_called
    if len(names) == 0:
        return []
    _sync_called = True
    deltas = []
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.copy_(torch.zeros_like(counter))
        deltas.append(delta)
    deltas = torch.stack(deltas)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]

default_collector = Collector(keep_previous=False)
