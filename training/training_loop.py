"""The NCVSD distillation loop (README, Notes on the method): fake score, discriminator and generator phases."""

import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
import time

import numpy as np
import psutil
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training import network_io
from training.networks_edm2 import set_precision
from training.networks_ncvsd import ConditionalPrecond, ConditionalDiscriminator, GenerativeDenoiser, DEFAULT_GAMMA
from training.noise_levels import PAPER_CHAINS, DEFAULT_TS
from training.phema import PowerFunctionEMA
from training.sampling import StackedRandomGenerator, random_labels, save_image_grid
from training import gradients
from training.gradients import FlatGradients, finish_gradients_, gradient_averaging, gradients_unset
from training.speed import compile_network

#----------------------------------------------------------------------------
# Schedules and small pieces.

def use_published_backends():
    """The backend settings of the published training: cuDNN picks its fastest kernels, float32 convolutions and
    matmuls stay IEEE float32 (torch's defaults let cuDNN use TF32) and float16 matmuls reduce in float32."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

def learning_rate_schedule(cur_nimg, batch_size, ref_lr=0.010, ref_batches=35000, rampup_Mimg=10):
    """ref_lr / sqrt(max(nimg / (ref_batches·batch), 1)) · min(nimg / (rampup_Mimg·1e6), 1)."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr

class RandomState:
    """Every random number generator of every rank (the run's generator on its device, torch's CPU and
    CUDA generators), checkpointed for exact resumption."""

    def __init__(self, device, seed):
        self.device = torch.device(device)
        self.rng = torch.Generator(self.device).manual_seed(seed)
        torch.manual_seed(seed)
        self.saved_ranks = None             # After a resume on another number of ranks: how many wrote the checkpoint.

    def state_dict(self):
        state = dict(device=self.device.type, generator=self.rng.get_state(), cpu=torch.get_rng_state())
        if self.device.type == 'cuda':
            state['cuda'] = torch.cuda.get_rng_state(self.device)
        return dict(ranks=dist.all_gather_object(state))

    def load_state_dict(self, states):
        saved_device = states['ranks'][0].get('device', 'cpu')
        if saved_device != self.device.type:
            raise UserError(f'the checkpoint was written by a run on {saved_device} but this run is on {self.device.type}; '
                f'resume with --device={saved_device}, or start a new --outdir')
        if len(states['ranks']) != dist.get_world_size():
            self.start_new_streams(states['ranks'])
            return
        state = states['ranks'][dist.get_rank()]
        self.rng.set_state(state['generator'])
        torch.set_rng_state(state['cpu'])
        if 'cuda' in state:
            torch.cuda.set_rng_state(state['cuda'], self.device)

    def start_new_streams(self, saved):
        """Resumed on another number of ranks, no saved stream is this rank's: each rank seeds new ones from all the saved
        streams and its rank, so that its noise differs from the other ranks' and a rerun draws the same."""
        digest = hashlib.sha256(b''.join(state['generator'].numpy().tobytes() for state in saved)).digest()
        seed = int(np.random.SeedSequence([int.from_bytes(digest, 'little'), dist.get_rank()]).generate_state(1, np.uint64)[0])
        self.rng.manual_seed(seed)
        torch.manual_seed(seed)
        self.saved_ranks = len(saved)

def infinite_batches(data_loader, encoder, device):
    """Endless (images in network space [N, C, H, W], labels [N, L]) on `device`; copied from pinned memory without
    making the host wait for the device."""
    for images, labels in data_loader:
        images = encoder.encode_latents(torch.as_tensor(images).to(device, non_blocking=True))
        yield images, torch.as_tensor(labels).to(device, torch.float32, non_blocking=True)

def data_batches(dataset, encoder, device, seed, batch_size, batch_gpu, cur_nimg, num_workers, worker_init_fn):
    """infinite_batches() of this rank's share of the data, from where a run at cur_nimg stands in the shuffled order:
    each iteration reads 3 × batch_size images over all ranks, one batch per phase."""
    sampler = misc.InfiniteSampler(dataset, rank=dist.get_rank(), num_replicas=dist.get_world_size(), seed=seed,
        start_idx=(cur_nimg // batch_size) * 3 * batch_size)
    data_loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu, num_workers=num_workers,
        pin_memory=(device.type == 'cuda'), prefetch_factor=(2 if num_workers > 0 else None), worker_init_fn=worker_init_fn)
    return infinite_batches(data_loader, encoder, device)

#----------------------------------------------------------------------------
# Set-up.

def build_students(init_net, network_kwargs, device, copy_logvar=False):
    """Generator, fake score and discriminator with the architecture and UNet weights of `init_net`
    (an EDM2 Precond: the teacher itself, or a network fitted to an exact teacher); kwargs override.
    copy_logvar: G and S also take its logvar head (the published code keeps theirs random)."""
    kwargs = dict(init_net.init_kwargs)
    kwargs.update(network_kwargs)
    for name in ('img_resolution', 'img_channels', 'label_dim'):
        kwargs[name] = getattr(init_net, name)
    nets = []
    for cls in (ConditionalPrecond, ConditionalPrecond, ConditionalDiscriminator):
        net = cls(**kwargs).init_from_pretrained(init_net, copy_logvar)
        nets.append(net.train().to(device).prepare_for_training())
    return nets

PHASES = ('score', 'discriminator', 'generator')        # The phases of an iteration, in order.

def phase_networks(G, S, D):
    """{phase: the network it trains}."""
    return dict(score=S, discriminator=D, generator=G)

def build_optimizers(G, S, D, betas=(0.9, 0.99), eps=1e-8):
    """{phase: Adam over its network's parameters}; the learning rate is set at every step. On CUDA the fused
    kernel updates every parameter in one launch (the same mathematics); elsewhere the foreach implementation, one
    call per operation for all parameters (bitwise the per-parameter loop's results, without its Python overhead)."""
    implementation = dict(fused=True) if next(G.parameters()).device.type == 'cuda' else dict(foreach=True)
    return {phase: torch.optim.Adam(net.parameters(), lr=0, betas=betas, eps=eps, **implementation)
        for phase, net in phase_networks(G, S, D).items()}

def build_run(teacher, init_net, network_kwargs, precision, loss_kwargs, optimizer_kwargs, ema_stds, copy_logvar, seed, device):
    """Everything a run trains and keeps, new (EasyDict): the frozen teacher, G, S, D, loss_fn, optimizers, ema,
    random_state and state (images seen, training time), and checkpoint, the CheckpointIO that saves and restores them."""
    run = dnnlib.EasyDict(teacher=network_io.prepare_frozen(teacher, device))
    torch.manual_seed(seed)                                 # The same initial weights on every rank.
    run.G, run.S, run.D = build_students(run.teacher if init_net is None else init_net.to(device), network_kwargs, device, copy_logvar)
    for net in ((run.G, run.S, run.D, run.teacher) if precision is not None else ()):
        set_precision(net, precision)
    run.loss_fn = dnnlib.util.construct_class_by_name(class_name='training.loss.NCVSDLoss', **loss_kwargs)
    run.optimizers = build_optimizers(run.G, run.S, run.D, **optimizer_kwargs)
    run.ema = PowerFunctionEMA(run.G, stds=ema_stds)
    run.random_state = RandomState(device, seed + dist.get_rank())
    run.state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0.0)
    run.checkpoint = dist.CheckpointIO(state=run.state, G=run.G, S=run.S, D=run.D, S_opt=run.optimizers['score'],
        D_opt=run.optimizers['discriminator'], G_opt=run.optimizers['generator'], ema=run.ema, rng=run.random_state)
    return run

class NCVSDIteration:
    """One NCVSD iteration: fake score, discriminator and generator phases, each on its own
    batches with gradient accumulation, a cross-rank gradient average and one Adam step."""

    def __init__(self, G, S, D, teacher, loss_fn, optimizers, gamma, num_rounds, batch_gpu_total, g_lr_scaling=0.01,
        d_lr_scaling=0.01, loss_scaling=1.0, force_finite=True, rng=None, compile_options=None):
        self.nets = phase_networks(G, S, D)
        device = next(G.parameters()).device
        self.averaging = {phase: gradient_averaging(net, device, loss_scaling, force_finite) for phase, net in self.nets.items()}
        self.flat_gradients = {}                                    # phase -> FlatGradients, on one rank.
        self.compiled = compile_options is not None
        run = (lambda net: compile_network(net, **compile_options)) if self.compiled else (lambda net: net)
        # What the losses call (compiled or not): each network as it trains in its own phase (through its gradient
        # averaging) and as a frozen participant in the others.
        self.G, self.S, self.D, self.teacher = run(G), run(S), run(D), run(teacher)
        frozen = phase_networks(self.G, self.S, self.D)
        self.training = {phase: frozen[phase] if wrapper is self.nets[phase] else run(wrapper) for phase, wrapper in self.averaging.items()}
        self.loss_fn = loss_fn
        self.G_denoiser = GenerativeDenoiser(self.G, gamma=gamma)    # G as the loss samples it: G(y, σ) with fresh noise.
        self.G_denoiser_training = GenerativeDenoiser(self.training['generator'], gamma=gamma)
        self.optimizers = optimizers
        self.lr_scalings = dict(score=1.0, discriminator=d_lr_scaling, generator=g_lr_scaling)
        self.num_rounds = num_rounds
        self.batch_gpu_total = batch_gpu_total
        self.loss_scaling = loss_scaling
        self.force_finite = force_finite
        self.rng = rng

    def run(self, batches, lr, use_gan=True, timer=None):
        """Run the three phases; `timer(name)` (optional) is a context manager around each phase."""
        if self.compiled:       # CUDA graphs (if any) may reuse the memory of the last iteration's outputs.
            torch.compiler.cudagraph_mark_step_begin()
        for name in PHASES:
            with (timer(name) if timer is not None else contextlib.nullcontext()):
                self.run_phase(self.nets[name], self.optimizers[name], lr * self.lr_scalings[name], name, batches, use_gan)

    def run_phase(self, net, optimizer, lr, name, batches, use_gan):
        for other in self.nets.values():
            other.requires_grad_(other is net)
        flat = self.zero_gradients(name, optimizer)
        for round_idx in range(self.num_rounds):
            synchronize = round_idx == self.num_rounds - 1 or not hasattr(self.averaging[name], 'no_sync')
            with (contextlib.nullcontext() if synchronize else self.averaging[name].no_sync()):    # Exchange once, at the end.
                images, labels = next(batches)
                with gradients_unset(self.nets.values()) if self.compiled else contextlib.nullcontext():
                    loss = self.phase_loss(name, images, labels if self.teacher.label_dim else None, use_gan)
                loss.sum().mul(self.loss_scaling / self.batch_gpu_total).backward()
        if flat is not None:
            flat.finish_(self.loss_scaling, self.force_finite)
        else:
            finish_gradients_(self.averaging[name], self.loss_scaling, self.force_finite)
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.step()
        if flat is not None:
            flat.release()
        net.project_()

    def zero_gradients(self, name, optimizer):
        """Zeroed gradients for the phase: its network's FlatGradients (returned) on one rank under FLAT_GRADIENTS,
        made at first use; else unset, per parameter or in DDP's buckets (None)."""
        net = self.averaging[name]
        if not (gradients.FLAT_GRADIENTS and FlatGradients.applies_to(net)):
            optimizer.zero_grad(set_to_none=True)
            return None
        if name not in self.flat_gradients:
            self.flat_gradients[name] = FlatGradients(net.parameters())
        self.flat_gradients[name].zero_()
        return self.flat_gradients[name]

    def phase_loss(self, name, images, labels, use_gan):
        if name == 'score':
            loss = self.loss_fn.score_loss(self.G_denoiser, self.training['score'], images, labels, rng=self.rng)
        elif name == 'discriminator':
            loss = self.loss_fn.discriminator_loss(self.G_denoiser, self.training['discriminator'], images, labels, rng=self.rng)
        else:
            loss, gan_loss = self.loss_fn.generator_loss(self.G_denoiser_training, self.S, self.teacher, images, labels,
                discriminator=self.D, use_gan=use_gan, rng=self.rng)
            if gan_loss is not None:
                training_stats.report('Loss/generator', loss)
                training_stats.report('Loss/gan', gan_loss)
                return loss.flatten(1).sum(dim=1) + gan_loss
        training_stats.report(f'Loss/{name}', loss)
        return loss

#----------------------------------------------------------------------------
# Outputs.

def fine_stamps_needed(total_nimg, *intervals):
    """Whether two events of a run (multiples of an interval, and the end) could share a whole kimg."""
    for interval in filter(None, intervals):
        last_multiple = (total_nimg - 1) // interval * interval
        if interval < 1000 or (total_nimg % interval and last_multiple // 1000 == total_nimg // 1000):
            return True
    return False

class SnapshotWriter:
    """network-snapshot-<kimg>-<std>.pkl (+ .png sample grid of fixed seeds) for every EMA length."""

    def __init__(self, run_dir, ema, gamma, encoder, loss_fn, teacher, ts, grid_seeds, device, dataset_kwargs=None, fine_stamps=False):
        self.run_dir, self.ema, self.gamma, self.encoder, self.loss_fn = run_dir, ema, gamma, encoder, loss_fn
        self.teacher, self.ts, self.grid_seeds, self.device = teacher, ts, grid_seeds, device
        self.dataset_kwargs, self.fine_stamps = dataset_kwargs, fine_stamps

    def save(self, cur_nimg):
        """Write the snapshots (rank 0), their networks in float16 as EDM2 and the published code store them, and a grid
        sampled from the stored weights; returns {ema suffix: exact metrics of the grid samples, or None}."""
        results = {}
        if dist.get_rank() != 0:
            return results
        for ema_net, suffix in self.ema.get():
            stored = copy.deepcopy(ema_net).eval().requires_grad_(False).to('cpu', torch.float16)
            denoiser = GenerativeDenoiser(stored, gamma=self.gamma)
            data = dnnlib.EasyDict(ema=denoiser, encoder=self.encoder, dataset_kwargs=self.dataset_kwargs, loss_fn=self.loss_fn)
            base = os.path.join(self.run_dir, f'network-snapshot-{dnnlib.util.nimg_stamp(cur_nimg, self.fine_stamps)}{suffix}')
            with dnnlib.util.atomic_file(base + '.pkl') as f:
                pickle.dump(data, f)
            results[suffix] = save_sample_grid(denoiser.to(self.device, torch.float32), self.encoder, self.ts, self.teacher,
                self.grid_seeds, base + '.png')
        return results

_skipped_grid_reasons = set()

@torch.no_grad()
def save_sample_grid(denoiser, encoder, ts, teacher, seeds, path):
    """Draw samples for fixed seeds, save them as a grid; exact metrics where the teacher has them."""
    device = next(denoiser.parameters()).device
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution], device=device)
    labels = random_labels(rnd, denoiser.label_dim, len(seeds), device)
    samples = denoiser.sample(noise, labels, ts=ts, randn_like=rnd.randn_like)
    try:
        save_image_grid(encoder.decode(samples), path)
    except UserError as err:
        if str(err) not in _skipped_grid_reasons:                  # Once per reason, not at every snapshot.
            _skipped_grid_reasons.add(str(err))
            print(f'Sample grids skipped: {err}')
    if hasattr(teacher, 'exact_metrics'):
        return teacher.exact_metrics(samples, labels)
    return None

@torch.no_grad()
def final_exact_metrics(ema, gamma, teacher, device, num=2000, batch=500, seed=0):
    """{'Final<ema>/<k>-step/<metric>': value}: exact metrics of every EMA at 1, 2 and 4 steps on `num`
    samples (classes uniform), printed as they come."""
    results, labels = {}, None
    if teacher.label_dim:
        labels = torch.eye(teacher.label_dim, device=device)[torch.arange(num, device=device) % teacher.label_dim]
    for ema_net, suffix in ema.get():
        denoiser = GenerativeDenoiser(copy.deepcopy(ema_net).eval().requires_grad_(False), gamma=gamma).to(device)
        shape = [num, denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution]
        for steps, ts in PAPER_CHAINS.items():
            rng = torch.Generator(device).manual_seed(seed)
            noise = torch.randn(shape, generator=rng, device=device)
            samples = torch.cat([denoiser.sample(noise[i:i + batch], None if labels is None else labels[i:i + batch], ts=ts,
                randn_like=misc.randn_like_from(rng)) for i in range(0, num, batch)])
            metrics = teacher.exact_metrics(samples, labels)
            dist.print0(f'Exact metrics of EMA {suffix[1:]}, {steps} step(s) --ts={",".join(map(str, ts))}, {num} samples: '
                + '  '.join(f'{name} {value:.3f}' for name, value in metrics.items()))
            results.update({f'Final{suffix}/{steps}-step/{name}': value for name, value in metrics.items()})
    return results

def compiled_graphs_needed(cur_nimg, start_nimg, batch_size, gan_warmup_nimg):
    """What the iteration at cur_nimg of a compiled run compiles, or None: the first compiles every phase's graphs, the
    first with the GAN term the discriminator's pass in the generator phase."""
    if cur_nimg == start_nimg:
        return 'the first iteration compiles the networks of each phase'
    if cur_nimg >= gan_warmup_nimg > cur_nimg - batch_size:
        return 'the GAN term starts: this iteration compiles the discriminator\'s pass in the generator phase'
    return None

@contextlib.contextmanager
def compilation_report(compiling, compile_options):
    """Around an iteration: where it compiles (`compiling`, from compiled_graphs_needed; None: it does not), says what
    before and its time after."""
    if not compiling:
        yield
        return
    dist.print0(f'torch.compile ({", ".join(map(str, compile_options.values()))}): {compiling} (with inductor: '
        'minutes, unless inductor\'s cache, TORCHINDUCTOR_CACHE_DIR, holds them from an earlier run)', flush=True)
    start = time.time()
    yield
    dist.print0(f'torch.compile: iteration {time.time() - start:.1f} s, compilation included')

@contextlib.contextmanager
def reported_phase(name):
    """Prints the time a phase took, in an iteration that compiles (compiled_graphs_needed)."""
    start = time.time()
    yield
    dist.print0(f'torch.compile: {name} phase {time.time() - start:.1f} s', flush=True)

def report0_from_rank0(values):
    """report0() a {name: value} that only rank 0 computed: every rank must report the same names."""
    for name, value in dist.all_gather_object(values)[0].items():
        training_stats.report0(name, value)

def report_status(state, start_time, prev_time, prev_nimg, stats_path, training_sec=None, device=None):
    """One status line and one stats.jsonl record of the interval since (prev_time, prev_nimg); returns the new
    reference. As in EDM2, sec/kimg counts the seconds spent in iterations (training_sec; default: the whole interval)
    and maintenance the rest (snapshots, sample grids, checkpoints); GPU memory peaks are those of the interval."""
    cur_time = time.time()
    kimg = state.cur_nimg / 1000
    training_sec = cur_time - prev_time if training_sec is None else training_sec
    sec_per_kimg = training_sec / max((state.cur_nimg - prev_nimg) / 1000, 1e-8)
    maintenance_sec = max(cur_time - prev_time - training_sec, 0.0)
    total_sec = state.total_elapsed_time + cur_time - start_time         # The run's time, over its resumes.
    cpu_mem, gpu_mem, gpu_reserved = memory_report(device)
    training_stats.report0('Progress/kimg', kimg)
    training_stats.report0('Timing/total_sec', total_sec)
    training_stats.report0('Timing/sec_per_kimg', sec_per_kimg)
    training_stats.report0('Timing/maintenance_sec', maintenance_sec)
    training_stats.report0('Resources/cpu_mem_gb', cpu_mem)
    training_stats.report0('Resources/peak_gpu_mem_gb', gpu_mem)
    training_stats.report0('Resources/peak_gpu_mem_reserved_gb', gpu_reserved)
    collector = append_stats(stats_path, cur_time)
    means = {name.split('/')[1]: collector.mean(name) for name in ('Loss/score', 'Loss/discriminator', 'Loss/generator') if collector.num(name)}
    losses = '  '.join(f'{name} {mean:<8.4f}' for name, mean in means.items())
    dist.print0(f'kimg {kimg:<9.3f} time {dnnlib.util.format_time(total_sec):<9s} '
        f'sec/kimg {sec_per_kimg:<8.2f} maintenance {maintenance_sec:<7.2f} {losses}  cpumem {cpu_mem:<5.2f} '
        f'gpumem {gpu_mem:<5.2f} reserved {gpu_reserved:<5.2f}', flush=True)
    warning = nonfinite_loss_warning(means)
    if warning:
        dist.print0(warning, flush=True)
    return cur_time, state.cur_nimg

def nonfinite_loss_warning(means):
    """A warning naming the phases whose mean loss over the interval ({phase: mean}) is not finite, else None."""
    phases = [name for name, mean in means.items() if not math.isfinite(mean)]
    if not phases:
        return None
    return (f'Warning: the {" and ".join(phases)} loss was not finite in this interval; its non-finite gradients are '
        'zeroed (as in the published code), so such steps teach nothing: lower --lr, or with --precision=fp16 try bf16 or fp32')

def append_stats(stats_path, timestamp):
    """Collect what was reported since the last record (all ranks) and append it to stats.jsonl (rank 0)."""
    collector = training_stats.default_collector
    collector.update()
    if dist.get_rank() == 0:
        with open(stats_path, 'at') as f:
            f.write(json.dumps(dict(collector.as_dict(), timestamp=timestamp)) + '\n')
    return collector

def memory_report(device=None):
    """GiB of (this process's resident memory with its data workers', the peak GPU memory allocated and reserved on
    `device` since the last call: the peaks restart here; zeros off CUDA)."""
    process = psutil.Process(os.getpid())
    cpu = process.memory_info().rss
    for worker in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):             # A worker may end between the listing and the reading.
            cpu += worker.memory_info().rss
    if device is None or torch.device(device).type != 'cuda':
        return cpu / 2**30, 0.0, 0.0
    gpu, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    return cpu / 2**30, gpu / 2**30, reserved / 2**30

class ScheduledOutputs:
    """What a run writes between iterations: snapshots, status lines (and stats.jsonl records) and checkpoints, each at
    the multiples of its interval (0: none) and at the end, and a checkpoint when the run is stopped. Keeps the run's
    clocks: the time since the start or the last checkpoint, added to state.total_elapsed_time at each one, and the
    seconds spent in iterations since the last status line."""

    def __init__(self, run_dir, state, checkpoint, snapshots, status_nimg, snapshot_nimg, checkpoint_nimg, fine_stamps, device, nets):
        self.run_dir, self.state, self.checkpoint, self.snapshots, self.device = run_dir, state, checkpoint, snapshots, device
        self.nets = nets                                            # {name: trained network}, checked at each checkpoint.
        self.intervals = dict(status=status_nimg, snapshot=snapshot_nimg, checkpoint=checkpoint_nimg)
        self.fine_stamps = fine_stamps
        self.stats_path = os.path.join(run_dir, 'stats.jsonl')
        self.start_nimg = state.cur_nimg
        self.start_time = time.time()
        self.prev_status = (self.start_time, state.cur_nimg)      # (time, images) the next status line measures from.
        self.training_sec = 0.0                                     # Seconds in iterations since the last status line.

    @contextlib.contextmanager
    def training(self):
        """Around an iteration: its seconds count as training in the next status line, the rest as maintenance."""
        start = time.time()
        yield
        self.training_sec += time.time() - start

    def on_schedule(self, name):
        return bool(self.intervals[name]) and self.state.cur_nimg % self.intervals[name] == 0

    def write(self, done, stopped):
        """Write what is due at state.cur_nimg. A run that resumes writes nothing before its first iteration (the run
        it resumes wrote it), unless it is done; a finished run resumed writes no checkpoint."""
        progressed = self.state.cur_nimg != self.start_nimg
        if done or (progressed and self.on_schedule('snapshot')):
            exact = self.snapshots.save(self.state.cur_nimg)
            report0_from_rank0({f'Exact{suffix}/{name}': value for suffix, metrics in exact.items()
                for name, value in (metrics or {}).items()})
        if done or (progressed and self.on_schedule('status')):
            self.prev_status = report_status(self.state, self.start_time, *self.prev_status, self.stats_path, self.training_sec,
                self.device)
            self.training_sec = 0.0
        on_schedule = done or self.on_schedule('checkpoint')
        if (on_schedule or stopped) and progressed:
            self.state.total_elapsed_time += time.time() - self.start_time
            self.start_time = time.time()
            stamp = dnnlib.util.nimg_stamp(self.state.cur_nimg, self.fine_stamps or not on_schedule)   # Off the schedule: exact.
            self.checkpoint.save(os.path.join(self.run_dir, f'training-state-{stamp}.pt'))
            dist.check_ranks_agree(self.nets, f'gradient averaging should prevent it: please report it with log.txt. training-state-'
                f'{stamp}.pt holds rank 0\'s state, from which the same command resumes every rank alike')

class Stopped(Exception):
    """The loop stopped on a signal after writing a checkpoint. The message says how to resume; exit_status is the
    shell's for that signal (143 for SIGTERM), so that a job script sees the run as unfinished."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status

def batch_rounds(batch_size, batch_gpu, world_size, intervals):
    """(per-rank batch per round, accumulation rounds) of a run; a UserError where the batch does not split over the
    ranks and rounds, or an interval ({option name: images}, 0 for none) is not a multiple of it."""
    batch_gpu = batch_gpu or batch_size // world_size
    if batch_size % (world_size * batch_gpu) != 0:
        raise UserError(f'--batch={batch_size} is not divisible by ranks × --batch-gpu = {world_size} × {batch_gpu}; '
            'choose a batch that is a multiple of both')
    for name, value in intervals.items():
        if value and value % batch_size != 0:
            raise UserError(f'--{name}={value} is not a multiple of --batch={batch_size}')
    return batch_gpu, batch_size // world_size // batch_gpu

#----------------------------------------------------------------------------
# The loop.

def training_loop(
    run_dir,                            # Output folder; resumed from its latest training-state-*.pt.
    teacher,                            # Frozen teacher denoiser D_θ(x; σ) (Precond interface): the target of VSD.
    dataset,                            # Training data: items (uint8 images or latent arrays, one-hot labels).
    encoder,                            # Dataset items -> network space (pixels to [-1, 1], or VAE latents).
    dataset_kwargs      = None,         # How the dataset was built; recorded in the snapshots.
    network_kwargs      = {},           # Overrides of init_net's constructor arguments (e.g. use_fp16).
    precision           = None,         # UNet bodies of students and teacher: 'fp32', 'fp16' or 'bf16' (None: as built).
    init_net            = None,         # EDM2 network the students start from (default: the teacher).
    loss_kwargs         = {},           # NCVSDLoss arguments: P_mean, P_std of t ~ LogNormal, gan_loss_scaling.
    optimizer_kwargs    = dict(betas=(0.9, 0.99), eps=1e-8),    # Adam's moments and epsilon.
    lr_kwargs           = {},           # learning_rate_schedule(): ref_lr, ref_batches (inverse-sqrt decay), rampup_Mimg.
    g_lr_scaling        = 0.01,         # Generator learning rate relative to the fake score's.
    d_lr_scaling        = 0.01,         # Discriminator learning rate relative to the fake score's.
    gamma               = DEFAULT_GAMMA,    # Noise inflation σ̂ = σ(1 + γ) of the generative denoiser.
    gan_warmup_nimg     = 0,            # Images before the generator's GAN term switches on.
    ema_stds            = (0.050, 0.100),   # Relative standard deviations of the power-function EMAs (one snapshot each).
    copy_teacher_logvar = False,        # Students' logvar heads start as the teacher's (published: their own random init).
    seed                = 0,            # Initial weights, data order and noise; rank r draws from seed + r.
    batch_size          = 2048,         # Images per iteration and phase, over all ranks.
    batch_gpu           = None,         # Images per rank and accumulation round (default: batch_size / ranks).
    total_nimg          = 1 << 20,      # Training length in images.
    status_nimg         = 1 << 14,      # Status line and stats.jsonl record interval (0: at the end only).
    snapshot_nimg       = 1 << 18,      # Snapshot interval (0: at the end only).
    checkpoint_nimg     = 1 << 20,      # Training-state interval (0: at the end only).
    loss_scaling        = 1.0,          # Loss multiplier before backward, divided out of the gradients.
    force_finite        = True,         # Zero non-finite gradient entries before the Adam step.
    ts                  = DEFAULT_TS,   # Grid indices of the snapshots' sample grids.
    num_workers         = 0,            # DataLoader worker processes per rank.
    grid_size           = 64,           # Samples in each snapshot's grid (seeds 0..grid_size-1).
    final_samples       = 2000,         # Exact teachers: samples per exact metric at the end of the run.
    compile_options     = None,         # torch.compile arguments for the networks of the iteration (dict(backend='inductor')); None: eager.
    device              = None,         # Device of this rank (default: the one torch_utils.distributed chose).
):
    device = torch.device(device) if device is not None else dist.get_device()
    world_size = dist.get_world_size()
    batch_gpu, num_rounds = batch_rounds(batch_size, batch_gpu, world_size,
        dict(duration=total_nimg, status=status_nimg, snapshot=snapshot_nimg, checkpoint=checkpoint_nimg))
    use_published_backends()
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)

    # Networks, loss, optimizers, EMA and random streams, resumed from the latest checkpoint.
    run = build_run(teacher, init_net, network_kwargs, precision, loss_kwargs, optimizer_kwargs, ema_stds,
        copy_teacher_logvar, seed, device)
    run.checkpoint.load_latest(run_dir)
    state = run.state                                       # Images seen and training time, as checkpointed.
    if run.random_state.saved_ranks is not None:
        dist.print0(f'Note: the checkpoint was written by {run.random_state.saved_ranks} ranks and this run has {world_size}: the '
            'weights, optimizer states, EMAs and data position go on, with new random streams, so the run will not end '
            f'bit-identical to one on {run.random_state.saved_ranks} ranks')
    stop = dist.StopOnSignal()                              # SIGTERM: a checkpoint, then stop.
    batches = data_batches(dataset, encoder, device, seed, batch_size, batch_gpu, state.cur_nimg, num_workers, stop.worker_init_fn)

    dist.print0(f'Training: {total_nimg // 1000} kimg, batch {batch_size} = {world_size} ranks × {num_rounds} rounds × {batch_gpu}, '
        f'device {device}, starting at {state.cur_nimg // 1000} kimg')
    iteration = NCVSDIteration(run.G, run.S, run.D, run.teacher, run.loss_fn, run.optimizers, gamma, num_rounds,
        batch_size // world_size, g_lr_scaling, d_lr_scaling, loss_scaling, force_finite, run.random_state.rng, compile_options)
    fine_stamps = fine_stamps_needed(total_nimg, snapshot_nimg, checkpoint_nimg)
    snapshots = SnapshotWriter(run_dir, run.ema, gamma, encoder, run.loss_fn, run.teacher, ts, list(range(grid_size)), device,
        dataset_kwargs, fine_stamps)
    outputs = ScheduledOutputs(run_dir, state, run.checkpoint, snapshots, status_nimg, snapshot_nimg, checkpoint_nimg, fine_stamps,
        device, dict(G=run.G, S=run.S, D=run.D))

    with stop:
        while True:
            done = state.cur_nimg >= total_nimg
            stopped = not done and stop.requested()
            outputs.write(done, stopped)
            if stopped:
                raise Stopped(f'Stopped by {stop.name} at {state.cur_nimg / 1000:.3f} kimg; the last checkpoint holds the run: '
                    'run the same command to resume it', 128 + stop.signum)
            if done:
                break
            lr = learning_rate_schedule(state.cur_nimg, batch_size, **lr_kwargs)     # At the images seen before this iteration.
            training_stats.report('Loss/learning_rate', lr)                     # The fake score's; G's and D's are scaled.
            compiling = compile_options and compiled_graphs_needed(state.cur_nimg, outputs.start_nimg, batch_size, gan_warmup_nimg)
            with outputs.training():
                with compilation_report(compiling, compile_options), misc.memory_advice(device, f'--batch-gpu={batch_gpu}',
                        'use a smaller --batch-gpu (more accumulation rounds: the same hyperparameters, the random draws '
                        'dealt to other images)'):
                    iteration.run(batches, lr, use_gan=state.cur_nimg >= gan_warmup_nimg, timer=reported_phase if compiling else None)
                state.cur_nimg += batch_size
                run.ema.update(cur_nimg=state.cur_nimg, batch_size=batch_size)

    if hasattr(run.teacher, 'exact_metrics'):
        report0_from_rank0(final_exact_metrics(run.ema, gamma, run.teacher, device, final_samples) if dist.get_rank() == 0 else {})
        append_stats(outputs.stats_path, time.time())
    return run.G, run.S, run.D, run.ema
