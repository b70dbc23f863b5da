"""Solve an inverse-problem task over a set of images with PnP-GD (the library side of posterior_sample.py)."""

import json
import os

import numpy as np
import torch
import tqdm

from dnnlib.util import UserError, atomic_file
from evaluation import image_quality
from inverse.operators import get_operator
from inverse.pnp import pnp_gd
from training.dataset import ImageFolderDataset
from training.encoders import StandardRGBEncoder
from torch_utils import distributed as dist, misc
from torch_utils.misc import memory_advice, refuse_nonfinite
from training.networks_ncvsd import is_generative_denoiser
from training.noise_levels import parse_ts
from training.sampling import save_image_grid

TASK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'presets', 'tasks')
HIGHER_IS_BETTER = dict(psnr=True, ssim=True, lpips=False)
GRID_IMAGES = 8                 # Rows of grid.png.

def load_task(name_or_path, overrides=None):
    """A task preset by name (presets/tasks/<name>.json) or path, with non-None overrides applied."""
    path = name_or_path if name_or_path.endswith('.json') else os.path.join(TASK_DIR, f'{name_or_path}.json')
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(TASK_DIR) if f.endswith('.json'))
        raise UserError(f'unknown task "{name_or_path}"; choose one of {", ".join(known)} or give a .json path')
    with open(path) as f:
        task = json.load(f)
    task.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return check_task(task)

def check_task(task):
    """The task, its --ts parsed; values PnP-GD cannot run with (a division by zero or a root of a negative number
    deep in the loop, or a schedule that does not anneal) are a UserError naming the option and what it needs."""
    missing = [key for key in ('operator', 'sigma_y', 'steps', 'sigma_min', 'sigma_max', 'rho') if key not in task]
    if missing:
        raise UserError(f'the task lacks {", ".join(missing)}; see presets/tasks/box_inpainting.json for every key')
    def refuse(key, need):
        return UserError(f'--{key.replace("_", "-")}={task[key]} (task key "{key}") {need}')
    for key in ('sigma_min', 'rho', 'beta'):
        if task.get(key) is not None and not task[key] > 0:
            raise refuse(key, 'must be positive')
    if not task['sigma_max'] > task['sigma_min']:
        raise refuse('sigma_max', f'must exceed --sigma-min={task["sigma_min"]}: the noise level anneals from σ_max down to σ_min')
    if not task['sigma_y'] >= 0:
        raise refuse('sigma_y', 'must be zero or positive')
    if task.get('ema_decay') is not None and not 0 <= task['ema_decay'] <= 1:
        raise refuse('ema_decay', 'must lie in [0, 1]')
    task['ts'] = parse_ts(task.get('ts'))
    return task

def parse_metrics(text):
    """'psnr,ssim' -> ['psnr', 'ssim']; an unknown name is a UserError listing the choices."""
    metrics = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in metrics if name not in HIGHER_IS_BETTER]
    if unknown or not metrics:
        raise UserError(f'--metrics={text}: choose among {", ".join(HIGHER_IS_BETTER)} (comma-separated)')
    return metrics

def check_network(net, encoder, dataset):
    if type(encoder).__name__ == 'StabilityVAEEncoder' or not is_generative_denoiser(net):
        kind = 'a latent-space (VAE) network' if type(encoder).__name__ == 'StabilityVAEEncoder' else 'not an NCVSD generative denoiser'
        raise UserError(f'--net is {kind}; PnP-GD here works in pixel space with an NCVSD student such as edm2-ffhq256-xs.pkl')
    if dataset.resolution != net.img_resolution or dataset.num_channels != net.img_channels:
        raise UserError(f'the images are {dataset.num_channels}x{dataset.resolution}x{dataset.resolution} but the network expects '
            f'{net.img_channels}x{net.img_resolution}x{net.img_resolution}; resize the data with dataset_tool.py convert')
    if net.label_dim and dataset.label_dim != net.label_dim:
        raise UserError(f'the network is class-conditional ({net.label_dim} classes) but the images carry '
            f'{dataset.label_dim or "no"} labels; give a folder or zip whose dataset.json labels them (e.g. python -m training.toy images)')

def save_png(x, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    misc.save_png(StandardRGBEncoder().decode(x), path)

def make_lpips(wanted, vgg_path, heads_path, device):
    """(LPIPS module or None, status string): missing weights never stop a run."""
    if 'lpips' not in wanted:
        return None, 'not requested'
    try:
        lpips = image_quality.LPIPS()
        lpips.load_weights(vgg_path, heads_path)
        return lpips.to(device), image_quality.LPIPS.variant
    except UserError as err:
        return None, f'unavailable: {err}'

def image_metrics(recon, truth, lpips):
    a, b = image_quality.to_unit(recon), image_quality.to_unit(truth)
    values = dict(psnr=image_quality.psnr(a, b), ssim=image_quality.ssim(a, b))
    if lpips is not None:
        with torch.no_grad():
            values['lpips'] = lpips(a.float(), b.float()).to(torch.float64)
    return {k: v.cpu().tolist() for k, v in values.items()}

def summarize(per_image):
    """Mean/std over images of the per-image mean over runs, and of the best run per image."""
    summary = {}
    for metric in per_image[0]['runs'][0]:
        values = np.array([[run[metric] for run in item['runs']] for item in per_image])      # [images, runs]
        best = values.max(axis=1) if HIGHER_IS_BETTER[metric] else values.min(axis=1)
        summary[metric] = dict(mean=float(values.mean()), std=float(values.mean(axis=1).std()),
            best_of_runs_mean=float(best.mean()), best_of_runs_std=float(best.std()))
    return summary

def solve_dataset(net, encoder, data, task, outdir, batch=4, seed=0, runs=None, max_images=None, metrics=('psnr', 'ssim', 'lpips'),
    lpips_vgg=None, lpips_heads=None, device=torch.device('cpu')):
    """PnP-GD on every image of `data`, `runs` times; under torchrun each rank solves every world_size-th batch. Results
    depend on `seed` and `batch` only (not on the ranks); rank 0 writes metrics.json, eval.md and grid.png."""
    dataset = ImageFolderDataset(data, use_labels=bool(net.label_dim), max_size=max_images, label_dim=net.label_dim or None)
    check_network(net, encoder, dataset)
    operator_kwargs = dict(task['operator'])
    operator = get_operator(operator_kwargs.pop('name'), img_size=dataset.resolution, channels=dataset.num_channels, **operator_kwargs)
    runs = runs or task.get('runs', 1)
    lpips, lpips_status = make_lpips(metrics, lpips_vgg, lpips_heads, device)
    starts = list(range(0, len(dataset), batch))[dist.get_rank()::dist.get_world_size()]
    progress = tqdm.tqdm(total=len(starts) * runs * task['steps'], unit='step', desc=task['operator']['name'],
        disable=dist.get_rank() != 0)
    solved = [solve_batch(net, dataset, operator, task, start, batch, runs, outdir, batch_generator(seed, start, device),
        lpips, metrics, progress) for start in starts]
    progress.close()
    everything = sorted((item for part in dist.all_gather_object(solved) for items in part for item in items),
        key=lambda item: item['index'])
    per_image = [dict(index=item['index'], runs=item['runs']) for item in everything]
    grid_rows = [item['grid_row'] for item in everything if item['grid_row'] is not None]
    report = dict(task=task, runs=runs, num_images=len(per_image), grid_images=len(grid_rows),
        lpips_variant=lpips_status, summary=summarize(per_image), per_image=per_image)
    if dist.get_rank() == 0:
        with atomic_file(os.path.join(outdir, 'metrics.json'), 'w') as f:
            json.dump(report, f, indent=2)
        write_eval_md(report, os.path.join(outdir, 'eval.md'))
        save_result_grid(grid_rows, os.path.join(outdir, 'grid.png'))
    return report

def batch_generator(seed, start, device):
    """The generator of the batch whose first image is `start`: measurement noise and chains depend on `seed` and the
    batch, not on which rank solves it."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, start]).generate_state(1)[0]))

def solve_batch(net, dataset, operator, task, start, batch, runs, outdir, generator, lpips, metrics, progress):
    """Measure the batch of images from `start`, solve each `runs` times and write the results; returns one dict per
    image: index, per-run metrics and, for the first GRID_IMAGES images, the grid row (measurement, run 0, truth)."""
    device = generator.device
    indices = list(range(start, min(start + batch, len(dataset))))
    truth = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices]).to(device).to(torch.float32) / 127.5 - 1
    labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in indices]).to(device, torch.float32) if net.label_dim else None
    y = operator.measure(truth, task['sigma_y'], generator=generator)
    measurements = torch.cat([operator.to_image(y[j:j + 1]) for j in range(len(indices))])
    items = [dict(index=i, runs=[], grid_row=None) for i in indices]
    for run in range(runs):
        with memory_advice(device, f'--batch={batch}', 'use a smaller --batch'):
            recon = pnp_gd(net, y, operator, task['sigma_y'], beta=task.get('beta'), steps=task['steps'],
                sigma_min=task['sigma_min'], sigma_max=task['sigma_max'], rho=task['rho'], ts=task.get('ts'),
                ema_sigma=task.get('ema_sigma', 0.0), ema_decay=task.get('ema_decay'), generator=generator, labels=labels,
                progress=progress)
        refuse_nonfinite(recon, f'PnP-GD on images {indices[0]} to {indices[-1]}', "check the task's values (--beta, "
            '--sigma-min, --sigma-max, --rho), and try --precision=fp32 where the network computes in float16 or bfloat16')
        values = image_metrics(recon, truth, lpips)
        for j, item in enumerate(items):
            item['runs'].append({k: v[j] for k, v in values.items() if k in metrics})
            save_png(recon[j], os.path.join(outdir, f'run{run}', f'{item["index"]:05d}.png'))
            if run == 0 and item['index'] < GRID_IMAGES:
                item['grid_row'] = torch.stack([measurements[j], recon[j], truth[j]]).cpu()
    for j, item in enumerate(items):
        save_png(measurements[j].clamp(-1, 1), os.path.join(outdir, 'measurements', f'{item["index"]:05d}.png'))
    return items

def save_result_grid(rows, path):
    """measurement | reconstruction | truth, one row per image; the results are already on disk, so a
    picture that cannot be made is reported, not raised."""
    try:
        save_image_grid(StandardRGBEncoder().decode(torch.cat(rows).clamp(-1, 1)), path, grid_w=3)
    except (RuntimeError, ValueError, UserError) as err:      # UserError: a full disk (misc.save_png).
        print(f'grid.png not written ({type(err).__name__}: {err}); the results are in metrics.json and run*/')

def write_eval_md(report, path):
    name = report['task']['operator']['name']
    lines = [f'# {name}: {report["num_images"]} images, {report["runs"]} run(s)', '',
        '| metric | mean over runs | std over images | best of runs |', '| --- | --- | --- | --- |']
    for metric, s in report['summary'].items():
        lines.append(f'| {metric} | {s["mean"]:.4f} | {s["std"]:.4f} | {s["best_of_runs_mean"]:.4f} |')
    lines += ['', f'LPIPS: {report["lpips_variant"]}', '',
        f'grid.png: measurement | reconstruction (run 0) | truth, the first {report["grid_images"]} of {report["num_images"]} images.']
    with atomic_file(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
