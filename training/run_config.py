"""The run configuration of train_ncvsd.py: every key a preset or option may set, stated once with its default,
whether it is part of the run's identity, and what it means. Presets are data (presets/<name>.json)."""

import collections
import json
import math
import os

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from training.networks_edm2 import PRECISIONS
from training.networks_ncvsd import DEFAULT_GAMMA
from training.noise_levels import DEFAULT_TS, parse_ts
from training.phema import check_std

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'presets')
REQUIRED = object()             # Default of the keys a preset must give.

# resumable: may change when a run is resumed without touching what it already wrote (intervals, grids,
# where and how it computes); every other key is part of the run's identity.
Key = collections.namedtuple('Key', 'default resumable doc')

KEYS = dict(
    # What the run distills, and from what.
    description         = Key('', True, 'What the preset is for (text only).'),
    net                 = Key(None, False, 'Teacher: EDM2 pickle (path or URL).'),
    teacher_url         = Key(None, True, 'Where the published teacher of the preset is (named in the error when --net is missing).'),
    teacher             = Key(None, False, 'Built-in exact teacher, {"class_name": ..., kwargs} (used when --net is not given).'),
    network_arch        = Key(None, False, 'EDM2 architecture of the network fitted to an exact teacher (and of the benches\' random '
                                           'teachers); students of an EDM2 teacher take the teacher\'s.'),
    student_init        = Key(None, False, 'Exact teachers: fit_denoiser_network() arguments (iterations, batch, lr).'),
    data                = Key(None, False, 'Training data: zip or folder made by dataset_tool.py.'),
    cond                = Key(True, False, 'Use the dataset labels (class-conditional students).'),
    vae                 = Key(None, True, 'VAE that decodes latent datasets for the sample grids (default: the one encode used).'),
    # The method (the paper's hyperparameters).
    gamma               = Key(DEFAULT_GAMMA, False, 'Noise inflation σ̂ = σ(1 + γ) of the generative denoiser.'),
    P_mean              = Key(REQUIRED, False, 'Mean of ln t, t ~ LogNormal(P_mean, P_std): noise levels of the VSD and DSM losses.'),
    P_std               = Key(REQUIRED, False, 'Standard deviation of ln t.'),
    gan_loss_scaling    = Key(REQUIRED, False, 'Weight of the generator\'s GAN term.'),
    gan_warmup_Kimg     = Key(REQUIRED, False, 'Thousands of images before the GAN term switches on.'),
    copy_teacher_logvar = Key(False, False, 'Students\' logvar heads start as the teacher\'s (published: their own random init).'),
    # Optimisation.
    batch               = Key(REQUIRED, False, 'Images per iteration and phase, over all ranks.'),
    batch_gpu           = Key(None, True, 'Images per rank and accumulation round (default: batch / ranks); the update stays the same, the noise is dealt differently.'),
    lr                  = Key(REQUIRED, False, 'Reference learning rate of the fake score.'),
    ref_batches         = Key(REQUIRED, False, 'Inverse-square-root decay after this many batches (0: constant).'),
    rampup_Mimg         = Key(REQUIRED, False, 'Linear learning-rate warm-up over this many million images (0: none).'),
    g_lr_scaling        = Key(REQUIRED, False, 'Generator learning rate relative to lr.'),
    d_lr_scaling        = Key(REQUIRED, False, 'Discriminator learning rate relative to lr.'),
    ema_stds            = Key(REQUIRED, False, 'Relative standard deviations of the power-function EMAs (one snapshot each).'),
    ls                  = Key(1.0, False, 'Loss scaling.'),
    fp16                = Key(False, False, 'UNet bodies in float16 (CUDA only); the same as precision fp16.'),
    precision           = Key(None, False, 'UNet bodies of students and teacher in fp32, fp16 (CUDA only) or bf16 (default: fp16 if fp16, else fp32).'),
    seed                = Key(0, False, 'Random seed.'),
    # Length and outputs.
    duration            = Key(REQUIRED, True, 'Training length in images (e.g. 64Mi).'),
    status              = Key('128Ki', True, 'Status line interval in images.'),
    snapshot            = Key('1Mi', True, 'Snapshot interval in images.'),
    checkpoint          = Key('4Mi', True, 'Training-state interval in images.'),
    ts                  = Key(','.join(map(str, DEFAULT_TS)), True, 'Grid indices of the snapshots\' sample grids.'),
    grid_size           = Key(64, True, 'Samples per snapshot grid.'),
    final_samples       = Key(2000, True, 'Exact teachers: samples per end-of-run exact metric.'),
    # Where and how (never part of the results).
    compile             = Key(False, True, 'torch.compile the networks of the training iteration (inductor).'),
    cuda_graphs         = Key(False, True, 'Replay the networks of the iteration as CUDA graphs (CUDA only; with compile: of inductor\'s kernels).'),
    preset              = Key(None, True, 'The preset the values came from (its values are the identity, not its name).'),
    outdir              = Key(None, True, 'Run folder.'),
    workers             = Key(None, True, 'DataLoader workers per rank (default: 2 on CUDA, 0 on the CPU).'),
    device              = Key(None, True, 'Device (default: CUDA if available, else CPU).'),
)

def load_preset(name):
    """A preset by name (presets/<name>.json) or path, its keys checked."""
    path = name if name.endswith('.json') else os.path.join(PRESET_DIR, f'{name}.json')
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith('.json'))
        raise UserError(f'unknown preset "{name}"; choose one of {", ".join(known)} or give a .json path')
    try:
        with open(path) as f:
            preset = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f'preset {path} is not valid JSON ({err})') from None
    unknown = sorted(set(preset) - set(KEYS))
    if unknown:
        raise UserError(f'preset {path} has unknown key(s) {", ".join(unknown)}; the keys are listed in training/run_config.py')
    return dnnlib.EasyDict(preset)

def default_config(**values):
    """Every key at its default (REQUIRED where a preset must give it), then `values`."""
    return dnnlib.EasyDict({name: key.default for name, key in KEYS.items()}, **values)

def resolve_options(opts):
    """Defaults, overridden by the preset, overridden by the options the user gave; checked and parsed."""
    config = default_config(**load_preset(opts['preset']))
    config.update(opts)
    missing = sorted(name for name, value in config.items() if value is REQUIRED)
    if missing:
        raise UserError(f'preset "{opts["preset"]}" lacks {", ".join(missing)}; add them to it (see presets/img64-s.json)'
            + (' or pass --duration' if missing == ['duration'] else ''))
    not_finite = [f'{name}={value}' for name, value in config.items() if isinstance(value, float) and not math.isfinite(value)]
    if not_finite:
        raise UserError(f'{", ".join(not_finite)}: not a finite number; give the option or preset key a number')
    for name in ('duration', 'status', 'snapshot', 'checkpoint'):
        config[name] = dnnlib.util.parse_nimg(config[name])
    if config.duration <= 0:
        raise UserError(f'--duration={config.duration} trains on no images; give a length, e.g. --duration=64Mi')
    for std in config.ema_stds:
        check_std(std, f'preset "{opts["preset"]}": ema_stds')
    config.ts = parse_ts(config.ts)
    config.precision = check_precision(config.precision, config.fp16, 'fp16' in opts)
    return config

def check_precision(precision, fp16, fp16_given):
    """--precision, or the --fp16 switch it generalises; a contradiction between the two is an error."""
    if precision is None:
        return 'fp16' if fp16 else 'fp32'
    if precision not in PRECISIONS:
        raise UserError(f'--precision={precision} is not one of {", ".join(PRECISIONS)}')
    if fp16_given and fp16 != (precision == 'fp16'):
        raise UserError(f'--fp16={fp16} contradicts --precision={precision}; give --precision only')
    return precision

def run_identity(options):
    """The values that make a run what it is (non-resumable keys)."""
    return {name: value for name, value in options.items() if name in KEYS and not KEYS[name].resumable}

def check_run_options(run_dir, options, finished_nimg=None):
    """An outdir belongs to one run: refuse to resume it, or to write over its files, with a different identity. Returns
    True when the run has already reached options['duration']. finished_nimg: images of the latest checkpoint, None
    when there is none."""
    path = os.path.join(run_dir, 'training_options.json')
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        ours = run_identity(options)
        changed = sorted(name for name in ours if ours[name] != previous.get(name, KEYS[name].default))
        if changed and finished_nimg is not None:
            raise UserError(f'--outdir={run_dir} holds checkpoints of a different run (differs in {", ".join(changed)}); '
                'use a new --outdir, or the original settings to resume')
        if changed:
            raise UserError(f'--outdir={run_dir} holds the files of a different run that wrote no checkpoint (differs in '
                f'{", ".join(changed)}); use a new --outdir, or delete that one')
    if finished_nimg is not None and finished_nimg >= options['duration']:
        dist.print0(f'--outdir={run_dir} holds a finished run ({finished_nimg / 1000:g} kimg); nothing to do, nothing changed. '
            'Pass a longer --duration to continue it.')
        return True
    return False

def write_run_options(run_dir, options):
    """training_options.json of the run (rank 0)."""
    if dist.get_rank() == 0:
        with dnnlib.util.atomic_file(os.path.join(run_dir, 'training_options.json'), 'w') as f:
            json.dump(options, f, indent=2)
