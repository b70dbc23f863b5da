"""From presets and command-line options to a training_loop() call (the library side of train_ncvsd.py)."""

import json
import os
import pickle

import torch


import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from training import loading
from training.analytic import fit_denoiser_network
from training.encoders import StandardRGBEncoder, StabilityVAEEncoder
from training.noise_levels import parse_ts
from training.training_loop import training_loop

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'presets')

def load_preset(name):
    """A preset by name (presets/<name>.json) or path."""
    path = name if name.endswith('.json') else os.path.join(PRESET_DIR, f'{name}.json')
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith('.json'))
        raise UserError(f'unknown preset "{name}"; choose one of {", ".join(known)} or give a .json path')
    with open(path) as f:
        return dnnlib.EasyDict(json.load(f))

def resolve_options(opts):
    """Preset values overridden by the options the user gave."""
    config = load_preset(opts['preset'])
    config.update({k: v for k, v in opts.items() if k != 'preset'})
    config.preset = opts['preset']
    for key in ('duration', 'status', 'snapshot', 'checkpoint'):
        config[key] = dnnlib.util.parse_nimg(config.get(key, 0))
    config.ts = parse_ts(config.get('ts', '10,22,39'))
    return config

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
        raise UserError(f'the teacher is unconditional but the dataset has labels; pass --cond=False')

RESUMABLE_CHANGES = ('duration', 'status', 'snapshot', 'checkpoint', 'ts', 'batch_gpu', 'grid_size', 'vae')   # Safe to change on resume.

def checkpoint_nimg(path):
    """Images seen by the run when it wrote the checkpoint at `path` (memory-mapped: the weights are not read)."""
    return int(torch.load(path, map_location='cpu', weights_only=False, mmap=True)['state']['cur_nimg'])

def check_run_options(run_dir, options):
    """An outdir belongs to one run: refuse to resume a run with different settings. Returns True when the
    run has already reached options['duration'] (then nothing is written)."""
    latest = dist.latest_checkpoint(run_dir)
    path = os.path.join(run_dir, 'training_options.json')
    identity = {k: v for k, v in options.items() if k not in RESUMABLE_CHANGES}
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        previous = {k: v for k, v in previous.items() if k in identity}
        changed = sorted(k for k in set(identity) | set(previous) if identity.get(k) != previous.get(k))
        if changed and latest is not None:
            raise UserError(f'--outdir={run_dir} holds checkpoints of a different run (differs in {", ".join(changed)}); '
                'use a new --outdir, or the original settings to resume')
    if latest is not None and checkpoint_nimg(latest) >= options['duration']:
        dist.print0(f'--outdir={run_dir} holds a finished run ({checkpoint_nimg(latest) / 1000:g} kimg); nothing to do, nothing changed. '
            'Pass a longer --duration to continue it.')
        return True
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        temp = path + '.tmp'
        with open(temp, 'w') as f:
            json.dump(options, f, indent=2)
        os.replace(temp, path)
    return False

def load_teacher(config):
    """(teacher, encoder or None) from --net, or the preset's built-in exact teacher."""
    if config.get('net'):
        data = loading.load_network_data(config.net, verbose=dist.get_rank() == 0)
        return loading.check_diffusion_network(data['ema'], config.net), data.get('encoder', None)
    if config.get('teacher'):
        return dnnlib.util.construct_class_by_name(**config.teacher), None
    hint = f' (the published one: --net={config.teacher_url})' if config.get('teacher_url') else ''
    raise UserError(f'preset "{config.preset}" needs a teacher: pass --net=PATH_OR_URL of an EDM2 pickle{hint}')

def make_data(config, teacher, encoder):
    """(dataset, encoder, dataset_kwargs) from --data, or samples of an exact teacher."""
    if config.get('data'):
        dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=config.data,
            use_labels=bool(config.get('cond', True)), xflip=False, cache=True)
        dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        if dataset.num_channels == 2 * teacher.img_channels:        # VAE latents: decode with --vae, else the encoding VAE
            vae = config.get('vae') or dataset.info.get('vae')
            encoder = StabilityVAEEncoder(**({'vae_name': vae} if vae else {})) if vae or encoder is None else encoder
        elif encoder is None:
            encoder = StandardRGBEncoder()
        return dataset, encoder, dataset_kwargs
    if hasattr(teacher, 'make_dataset'):
        dataset, encoder = teacher.make_dataset(seed=config.get('seed', 0))
        return dataset, encoder, dnnlib.EasyDict(class_name='exact teacher samples')
    raise UserError('--data is required (a dataset zip made by dataset_tool.py) unless the teacher is an exact mixture')

def make_init_net(config, teacher):
    """The EDM2 network the students start from: the teacher, or (exact teachers) a network fitted to it,
    cached in the run folder so that a resumed run starts from the same weights."""
    if hasattr(teacher, 'unet'):
        return None
    if 'student_init' not in config:
        raise UserError(f'the teacher of preset "{config.preset}" is not an EDM2 network; the preset needs "student_init" (see presets/toy.json)')
    path = os.path.join(config.outdir, 'student-init.pkl')
    if os.path.isfile(path):
        return loading.load_network_data(path, verbose=dist.get_rank() == 0)['ema']
    init_kwargs = dict(config.student_init)
    net = fit_denoiser_network(teacher, config.network_arch, seed=config.get('seed', 0), verbose=dist.get_rank() == 0, **init_kwargs)
    if dist.get_rank() == 0:
        os.makedirs(config.outdir, exist_ok=True)
        with open(path + '.tmp', 'wb') as f:
            pickle.dump(dnnlib.EasyDict(ema=net), f)
        os.replace(path + '.tmp', path)
    return net

def check_device_options(config, opts, device):
    """float16 bodies exist on CUDA only: an explicit --fp16=True elsewhere is an error, a preset's is noted."""
    if device.type == 'cuda' or not config.get('fp16', False):
        return
    if opts.get('fp16'):
        raise UserError(f'--fp16=True needs CUDA but this run is on {device.type}; drop --fp16 (on {device.type} the networks compute in float32)')
    dist.print0(f'Note: preset "{config.preset}" asks for float16, which runs on CUDA only; computing in float32 on {device.type}')

def launch(opts):
    config = resolve_options(opts)
    device = dist.init(config.get('device'))
    check_device_options(config, opts, device)
    teacher, encoder = load_teacher(config)
    dataset, encoder, dataset_kwargs = make_data(config, teacher, encoder)
    check_data_matches(dataset, encoder, teacher, bool(config.get('cond', True)))
    run_options = {k: v for k, v in config.items() if k not in ('outdir', 'workers', 'device')}
    if check_run_options(config.outdir, run_options):
        dist.shutdown()
        return
    logger = dnnlib.util.Logger(os.path.join(config.outdir, 'log.txt')) if dist.get_rank() == 0 else None
    try:
        run_training(config, teacher, dataset, encoder, dataset_kwargs, run_options)
    finally:
        if logger is not None:
            logger.close()
    dist.shutdown()

def run_training(config, teacher, dataset, encoder, dataset_kwargs, run_options):
    dist.print0(json.dumps(run_options, indent=2))
    network_kwargs = dict(config.get('network', {}), use_fp16=bool(config.get('fp16', False)))
    init_net = make_init_net(config, teacher)
    training_loop(
        run_dir=config.outdir, teacher=teacher, dataset=dataset, encoder=encoder, dataset_kwargs=dataset_kwargs,
        network_kwargs=network_kwargs, init_net=init_net,
        loss_kwargs=dict(P_mean=config.P_mean, P_std=config.P_std, gan_loss_scaling=config.gan_loss_scaling),
        lr_kwargs=dict(ref_lr=config.lr, ref_batches=config.ref_batches, rampup_Mimg=config.rampup_Mimg),
        g_lr_scaling=config.g_lr_scaling, d_lr_scaling=config.d_lr_scaling, gamma=config.gamma,
        gan_warmup_nimg=int(config.gan_warmup_Kimg * 1000), ema_stds=config.ema_stds,
        copy_teacher_logvar=bool(config.get('copy_teacher_logvar', False)),
        seed=config.get('seed', 0), batch_size=config.batch, batch_gpu=config.get('batch_gpu'),
        total_nimg=config.duration, status_nimg=config.status, snapshot_nimg=config.snapshot,
        checkpoint_nimg=config.checkpoint, loss_scaling=config.get('ls', 1.0), ts=config.ts,
        num_workers=config.get('workers', 2 if dist.get_device().type == 'cuda' else 0),
        grid_size=config.get('grid_size', 64), final_samples=config.get('final_samples', 2000), device=dist.get_device(),
    )
