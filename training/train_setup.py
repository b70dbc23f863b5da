"""From presets and command-line options to a training_loop() call (the library side of train_ncvsd.py)."""

import json
import os
import pickle
import sys

import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from training import network_io, run_config, speed
from training.encoders import StandardRGBEncoder, StabilityVAEEncoder
from training.toy import fit_denoiser_network
from training.training_loop import Stopped, batch_rounds, training_loop, use_published_backends

def check_data_matches(dataset, encoder, teacher, cond):
    """Clear errors when the data cannot feed the teacher (resolution, channels, labels)."""
    item = torch.as_tensor(dataset[0][0])[None]
    encoded = encoder.encode_latents(item)
    expected = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    if list(encoded.shape[1:]) != expected:
        raise UserError(f'the dataset gives items of shape {list(encoded.shape[1:])} (channels, height, width) '
            f'but the teacher expects {expected}; convert the data at {teacher.img_resolution}x{teacher.img_resolution} '
            'with dataset_tool.py (and encode it for latent-space teachers)')
    if cond and teacher.label_dim != 0 and dataset.label_dim != teacher.label_dim:
        raise UserError(f'the dataset has {dataset.label_dim} classes but the teacher has label_dim={teacher.label_dim}; '
            'use the matching dataset, or --cond=False for an unconditional teacher')
    if cond and teacher.label_dim == 0 and dataset.label_dim != 0:
        raise UserError('the teacher is unconditional but the dataset has labels; pass --cond=False')
    if not cond and teacher.label_dim != 0:
        raise UserError(f'--cond=False but the teacher is class-conditional (label_dim={teacher.label_dim}) and needs a class '
            'for every image; drop --cond=False (and use a dataset with its labels)')

def load_teacher(config):
    """(teacher, encoder or None) from --net, or the preset's built-in exact teacher."""
    if config.net:
        return network_io.load_network(config.net, dist.get_device(), role='teacher', verbose=dist.get_rank() == 0)
    if config.teacher:
        return dnnlib.util.construct_class_by_name(**config.teacher), None
    hint = f' (the published one: --net={config.teacher_url})' if config.teacher_url else ''
    raise UserError(f'preset "{config.preset}" needs a teacher: pass --net=PATH_OR_URL of an EDM2 pickle{hint}')

def make_data(config, teacher, encoder):
    """(dataset, encoder, dataset_kwargs) from --data, or samples of an exact teacher."""
    if config.data:
        dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=config.data,
            use_labels=bool(config.cond), xflip=False, cache=True, label_dim=teacher.label_dim or None)
        dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        if dataset.num_channels == 2 * teacher.img_channels:        # VAE latents: decode with --vae, else the encoding VAE
            vae = config.vae or dataset.info.get('vae')
            encoder = StabilityVAEEncoder(**({'vae_name': vae} if vae else {})) if vae or encoder is None else encoder
        elif encoder is None:
            encoder = StandardRGBEncoder()
        return dataset, encoder, dataset_kwargs
    if hasattr(teacher, 'make_dataset'):
        dataset, encoder = teacher.make_dataset(seed=config.seed)
        return dataset, encoder, dnnlib.EasyDict(class_name='exact teacher samples')
    raise UserError('--data is required (a dataset zip made by dataset_tool.py) unless the teacher is an exact mixture')

def make_init_net(config, teacher):
    """The EDM2 network the students start from: the teacher, or (exact teachers) a network fitted to it,
    cached in the run folder so that a resumed run starts from the same weights."""
    if hasattr(teacher, 'unet'):
        return None
    if not config.student_init:
        raise UserError(f'the teacher of preset "{config.preset}" is not an EDM2 network; the preset needs "student_init" (see presets/toy.json)')
    path = os.path.join(config.outdir, 'student-init.pkl')
    if os.path.isfile(path):
        return network_io.load_network_data(path, verbose=dist.get_rank() == 0)['ema']
    init_kwargs = dict(config.student_init)
    net = fit_denoiser_network(teacher, config.network_arch, seed=config.seed, device=dist.get_device(),
        verbose=dist.get_rank() == 0, **init_kwargs)
    if dist.get_rank() == 0:
        os.makedirs(config.outdir, exist_ok=True)
        with dnnlib.util.atomic_file(path) as f:
            pickle.dump(dnnlib.EasyDict(ema=net), f)
    return net

def check_device_options(config, opts, device):
    """float16 bodies and CUDA graphs exist on CUDA only: an explicit --fp16=True, --precision=fp16 or
    --cuda-graphs=True elsewhere is an error, a preset's float16 is noted (and computed in float32), and so is
    bfloat16 on a device that only emulates it (suggested in the error only where native)."""
    if config.cuda_graphs and device.type != 'cuda':
        raise UserError(f'--cuda-graphs=True needs CUDA but this run is on {device.type}; drop it (--compile=True works everywhere)')
    note = network_io.emulated_precision_note(config.precision, device)
    if note:
        dist.print0(note)
    if device.type == 'cuda' or config.precision != 'fp16':
        return
    if opts.get('fp16') or opts.get('precision') == 'fp16':
        network_io.refuse_float16(device, '--fp16=True' if opts.get('fp16') else '--precision=fp16')
    dist.print0(f'Note: preset "{config.preset}" asks for float16, which runs on CUDA only; computing in float32 on {device.type}')

def launch(opts, dry_run=False):
    config = run_config.resolve_options(opts)
    batch_rounds(config.batch, config.batch_gpu, dist.launched_world_size(),     # Before any loading: errors at once.
        dict(duration=config.duration, status=config.status, snapshot=config.snapshot, checkpoint=config.checkpoint))
    if dry_run:
        print(json.dumps(config, indent=2))
        print('Dry run: the configuration above is valid; nothing was loaded or written.')
        return
    device = dist.init(config.device)
    dnnlib.util.check_output_folder(config.outdir, f'--outdir={config.outdir}')
    check_device_options(config, opts, device)
    speed.use_device_defaults(device, compiled=config.compile, precision=config.precision)
    use_published_backends()                                # From the start: the toy's initial fit runs under them too.
    latest = dist.latest_checkpoint(config.outdir)
    finished_nimg = None if latest is None else dist.checkpoint_nimg(latest)    # A damaged checkpoint: found before loading.
    teacher, encoder = load_teacher(config)
    dataset, encoder, dataset_kwargs = make_data(config, teacher, encoder)
    check_data_matches(dataset, encoder, teacher, bool(config.cond))
    if run_config.check_run_options(config.outdir, config, finished_nimg):
        dist.shutdown()
        return
    exit_status = 0
    with dist.run_folder_lock(config.outdir, f'--outdir={config.outdir}'):
        run_config.write_run_options(config.outdir, config)
        logger = dnnlib.util.Logger(os.path.join(config.outdir, 'log.txt')) if dist.get_rank() == 0 else None
        try:
            run_training(config, teacher, dataset, encoder, dataset_kwargs)
        except Stopped as stopped:
            dist.print0(stopped, flush=True)
            exit_status = stopped.exit_status
        finally:
            if logger is not None:
                logger.close()
    dist.shutdown()
    if exit_status:
        sys.exit(exit_status)

def compile_options(config):
    """torch.compile's arguments for the networks of the iteration, or None for eager. CUDA graphs alone record
    torch's own kernels (the cudagraphs backend: no code generation, a short start-up); with --compile,
    inductor's fused kernels (mode reduce-overhead)."""
    if config.cuda_graphs:
        return dict(backend='inductor', mode='reduce-overhead') if config.compile else dict(backend='cudagraphs')
    return dict(backend='inductor') if config.compile else None

def run_training(config, teacher, dataset, encoder, dataset_kwargs):
    dist.print0(json.dumps(config, indent=2))
    training_loop(
        run_dir=config.outdir, teacher=teacher, dataset=dataset, encoder=encoder, dataset_kwargs=dataset_kwargs,
        network_kwargs=dict(use_fp16=config.precision != 'fp32'), precision=config.precision, init_net=make_init_net(config, teacher),
        loss_kwargs=dict(P_mean=config.P_mean, P_std=config.P_std, gan_loss_scaling=config.gan_loss_scaling),
        lr_kwargs=dict(ref_lr=config.lr, ref_batches=config.ref_batches, rampup_Mimg=config.rampup_Mimg),
        g_lr_scaling=config.g_lr_scaling, d_lr_scaling=config.d_lr_scaling, gamma=config.gamma,
        gan_warmup_nimg=int(config.gan_warmup_Kimg * 1000), ema_stds=config.ema_stds,
        copy_teacher_logvar=bool(config.copy_teacher_logvar), seed=config.seed, batch_size=config.batch,
        batch_gpu=config.batch_gpu, total_nimg=config.duration, status_nimg=config.status, snapshot_nimg=config.snapshot,
        checkpoint_nimg=config.checkpoint, loss_scaling=config.ls, ts=config.ts,
        num_workers=config.workers if config.workers is not None else (2 if dist.get_device().type == 'cuda' else 0),
        grid_size=config.grid_size, final_samples=config.final_samples, compile_options=compile_options(config),
        device=dist.get_device(),
    )
