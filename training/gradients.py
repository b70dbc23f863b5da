"""How a trained network's gradients are finished before its optimizer step: averaged across ranks (DDP's buckets,
exchanged while the backward pass goes on), unscaled and made finite, in a few operations rather than one per
parameter."""

import contextlib
import inspect
import warnings

import torch

import dnnlib
from torch_utils import distributed as dist

FLAT_GRADIENTS = True       # Speed option: one rank's gradients as views of one buffer (FlatGradients).

# The networks' buffers (Fourier features) are fixed and equal on every rank: not re-sent at each forward pass.
# torch 2.13 renamed DDP's argument (the old name warns there); older versions, the GPU machine's 2.11 included, lack the new one.
FIXED_BUFFERS = (dict(forward_sync_buffers=False)
    if 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters else dict(broadcast_buffers=False))

def gradient_averaging(net, device, loss_scaling=1.0, force_finite=True):
    """`net` in DistributedDataParallel when there are several ranks: gradients averaged across ranks in buckets
    that are all-reduced while the backward pass goes on, and finished there (finish_buckets); `net` itself on one
    rank."""
    if dist.get_world_size() == 1:
        return net
    # Gradients reach DDP in the layout autograd keeps, which may differ from the bucket's in size-1 dims only (a 1x1
    # kernel's on channels-last activations): the same memory, which DDP's stride check reports as slow on every rank.
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides', category=UserWarning)
    wrapper = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
        gradient_as_bucket_view=True, **FIXED_BUFFERS)
    wrapper.register_comm_hook(dnnlib.EasyDict(loss_scaling=loss_scaling, force_finite=force_finite), finish_buckets)
    for name in ('img_resolution', 'img_channels', 'label_dim'):            # What GenerativeDenoiser reads.
        setattr(wrapper, name, getattr(net, name))
    return wrapper

def finish_buckets(state, bucket):
    """DDP communication hook: a bucket's gradients divided by the number of ranks and summed across them (DDP's own
    averaging), then finished as finish_gradients_ finishes them on one rank: one operation per bucket, not per
    parameter."""
    gradients = bucket.buffer().div_(dist.get_world_size())
    exchange = torch.distributed.all_reduce(gradients, async_op=True).get_future()
    return exchange.then(lambda done: finish_(done.value()[0:1], state.loss_scaling, state.force_finite)[0])

def finish_gradients_(module, loss_scaling, force_finite=True):
    """Undo loss scaling and zero non-finite values of the gradients of `module` on one rank; a DistributedDataParallel
    module has done so in its buckets (gradient_averaging)."""
    if not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        finish_([p.grad for p in module.parameters() if p.grad is not None], loss_scaling, force_finite)

@torch.no_grad()
def finish_(gradients, loss_scaling, force_finite):
    """The (averaged) `gradients` divided by the loss scaling and their non-finite values zeroed, in place."""
    if gradients and loss_scaling != 1:
        torch._foreach_div_(gradients, loss_scaling)
    for gradient in gradients if force_finite else ():
        torch.nan_to_num(gradient, nan=0, posinf=0, neginf=0, out=gradient)
    return gradients

@contextlib.contextmanager
def gradients_unset(modules):
    """The parameters' gradients set to None inside the block and put back after it, for compiled forward passes:
    dynamo converts every gradient it finds on a parameter, and one that is a view (of FlatGradients' buffer or of a DDP
    bucket) gets symbolic sizes and storage offset, a quarter of the first iteration's tracing time."""
    unset = [(param, param.grad) for module in modules for param in module.parameters() if param.grad is not None]
    for param, _gradient in unset:
        param.grad = None
    try:
        yield
    finally:
        for param, gradient in unset:
            param.grad = gradient

class FlatGradients:
    """One rank's gradients of a network's parameters as views of one flat buffer, as DDP's buckets hold them on
    several ranks: zeroed, unscaled and made finite in one operation each, not one per parameter. The backward pass
    adds into the views (autograd accumulates into an existing gradient in place), so the values are those of
    per-parameter gradients, bitwise. Between its phases the buffer holds no memory (release)."""

    def __init__(self, parameters):
        self.parameters = list(parameters)
        sizes = [param.numel() for param in self.parameters]
        self.buffer = self.parameters[0].new_zeros([sum(sizes)])
        self.nbytes = self.buffer.untyped_storage().nbytes()
        self.views = [view.view_as(param) for param, view in zip(self.parameters, self.buffer.split(sizes))]

    @staticmethod
    def applies_to(module):
        """Whether `module` (a network on one rank, not a DDP wrapper) has parameters of one dtype on one device."""
        kinds = {(param.dtype, param.device) for param in module.parameters()}
        return not isinstance(module, torch.nn.parallel.DistributedDataParallel) and len(kinds) == 1

    def zero_(self):
        """Zeroed gradients, set as the parameters', for a phase's accumulation rounds."""
        self.buffer.untyped_storage().resize_(self.nbytes)         # Storage operations: no kernel, views kept.
        self.buffer.zero_()
        for param, view in zip(self.parameters, self.views):
            param.grad = view

    def finish_(self, loss_scaling, force_finite=True):
        finish_([self.buffer], loss_scaling, force_finite)

    def release(self):
        """After the optimizer step: the gradients unset and their memory given back until the phase comes again
        (a network's gradients held only in its own phase: less than per parameter, where they stayed until then)."""
        for param in self.parameters:
            param.grad = None
        self.buffer.untyped_storage().resize_(0)
