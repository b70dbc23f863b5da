"""Fréchet distances (FID, FD-DINOv2) of generated images, image folders, and reference statistics.

\b
Examples:
  torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen --net=ncvsd-img512-s.pkl --ts=10,22,39 \\
      --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl --seed=123456789
  python calculate_metrics.py calc --images=out --ref=img64.pkl --num=50000
  python calculate_metrics.py ref --data=../data/edm2/img64.zip --dest=img64.pkl
"""

import json
import os

import click
import numpy as np
import torch
import tqdm

from dnnlib.util import run_cli, check_output_folder, make_output_folder, atomic_file, UserError
from torch_utils import distributed as dist
from torch_utils.misc import memory_advice
from evaluation import frechet
from training.dataset import ImageFolderDataset
from training.network_io import load_network
from training.noise_levels import parse_ts
from training.sampling import DEFAULT_HEUN_STEPS, check_sampling_options, generate_images

def feature_stats(image_batches, detectors, resolution, device, batch, progress=None):
    """frechet.compute_stats, where running out of device memory (detectors or sampling) names --batch."""
    with memory_advice(device, f'--batch={batch}', 'use a smaller --batch'):
        return frechet.compute_stats(image_batches, detectors, resolution, progress)

def parse_metrics(text):
    return [m.strip() for m in text.split(',') if m.strip()]

def parse_custom(items):
    """--detector fid=module.Class -> {'fid': 'module.Class'}."""
    custom = {}
    for item in items or ():
        if '=' not in item:
            raise UserError(f'--detector={item}: write METRIC=module.ClassName')
        metric, class_name = item.split('=', 1)
        custom[metric] = class_name
    return custom

def open_images(path, option):
    """The images at `path` for the detectors; VAE latents (dataset_tool.py encode) are refused."""
    dataset = ImageFolderDataset(path, use_labels=False)
    if dataset[0][0].dtype != np.uint8:
        raise UserError(f'{option}={path} holds {dataset.num_channels}-channel latents, not images; measure the images they '
            'were encoded from (EDM2\'s img512 references come from img512.zip)')
    return dataset

def dataset_stats(dataset, num, workers, detectors, device, batch):
    """feature_stats of a dataset's first `num` images (default: all), each rank's share decoded by `workers`
    DataLoader processes."""
    num = len(dataset) if num is None else num
    if len(dataset) < num:
        raise UserError(f'{dataset.path} holds {len(dataset)} images, fewer than --num={num}; lower --num or add images')
    if num < 2:                                 # --num is at least 2; a folder of one image was a LinAlgError.
        raise UserError(f'{dataset.path} holds 1 image; the covariance of a Fréchet distance needs at least 2 (and '
            'thousands for a meaningful one)')
    share = torch.utils.data.Subset(dataset, range(dist.get_rank(), num, dist.get_world_size()))
    loader = torch.utils.data.DataLoader(share, batch_size=batch, num_workers=workers, pin_memory=(device.type == 'cuda'),
        prefetch_factor=(2 if workers > 0 else None))
    with progress_bar(num) as progress:
        return feature_stats((images.to(device) for images, _labels in loader), detectors, dataset.resolution, device, batch, progress)

def progress_bar(num):
    """Images scored so far over all ranks, shown by rank 0."""
    return tqdm.tqdm(total=num, unit='img', disable=dist.get_rank() != 0)

def check_file_folder(path, option):
    """Refuse an output file (--out, --dest) whose folder could not be made before the statistics, not after them."""
    if path:
        check_output_folder(os.path.dirname(path), f'{option}={path}')

def check_reference_first(ref, ref_path, metrics, resolution=None, detectors=None):
    """Refuse before the work what report() would refuse after it: a metric the reference lacks, and, once they are
    known, another image resolution or detector."""
    planned = {metric: {} for metric in parse_metrics(metrics)}          # The fields of the statistics to come.
    for metric, fields in planned.items():
        fields.update({} if resolution is None else dict(resolution=resolution))
        fields.update({} if detectors is None else dict(detector=detectors[metric].name))
    frechet.check_reference(ref, planned, ref_path)

def report(stats, ref, ref_path, out):
    frechet.check_reference(ref, stats, ref_path)
    scores = frechet.fd_scores(stats, ref)
    if dist.get_rank() == 0:
        for metric, value in scores.items():
            print(f'{metric} {value:.5g}  ({stats[metric]["num_images"]} images, detector {stats[metric]["detector"]})')
        if out:
            make_output_folder(os.path.dirname(out), f'--out={out}')
            with atomic_file(out, 'w') as f:
                json.dump(dict(scores, num_images={m: s['num_images'] for m, s in stats.items()}, reference=ref_path), f, indent=2)
    return scores

def common_options(fn):
    for decorator in reversed([
        click.option('--metrics', help='Comma-separated metrics', metavar='LIST', default='fid,fd_dinov2', show_default=True),
        click.option('--batch', help='Images per batch and rank', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True),
        click.option('--inception', help='Inception-v3 pickle (path or URL) [env NCVSD_INCEPTION]', metavar='PKL'),
        click.option('--dinov2', help='DINOv2 ViT-L/14 weights (path or URL) [env NCVSD_DINOV2]', metavar='PTH'),
        click.option('--detector', 'custom', help='Custom detector METRIC=module.Class (repeatable)', metavar='SPEC', multiple=True),
        click.option('--device', help='Device (default: CUDA if available, else CPU)', metavar='STR'),
    ]):
        fn = decorator(fn)
    return fn

workers_option = click.option('--workers', help='DataLoader processes decoding images, per rank', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)

def make_detectors(metrics, inception, dinov2, custom):
    """The detectors (their weights are fetched here: called once the user's own paths have been checked)."""
    return frechet.make_detectors(parse_metrics(metrics), dict(fid=inception, fd_dinov2=dinov2), parse_custom(custom))

@click.group()
def cmdline():
    """Fréchet distances with EDM2's reference format."""

@cmdline.command()
@click.option('--net', help='Network pickle or export (path or URL)', metavar='PKL', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.pkl or .npz, path or URL)', metavar='PKL', required=True)
@click.option('--ts', help='NCVSD grid indices, e.g. 10,22,39', metavar='LIST')
@click.option('--steps', help=f'Heun steps for diffusion teachers [default: {DEFAULT_HEUN_STEPS}]', metavar='INT', type=click.IntRange(min=1))
@click.option('--num', '--num-images', 'num', help='Number of images (under torchrun write --num-images: torchrun takes --num for --numa-binding)', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='First seed', metavar='INT', type=int, default=123456789, show_default=True)
@click.option('--class', 'class_idx', help='Class label (default: random per seed)', metavar='INT', type=int)
@click.option('--out', help='Also write the scores as JSON here', metavar='JSON')
@click.option('--precision', help='UNet bodies in fp32, fp16 (CUDA only) or bf16 [default: as stored]', type=click.Choice(['fp32', 'fp16', 'bf16']))
@common_options
def gen(net, ref_path, ts, steps, num, seed, class_idx, out, precision, metrics, batch, inception, dinov2, custom, device):
    """Generate images on the fly (no files) and compare them with a reference."""
    def run():
        dev = dist.init(device)
        check_file_folder(out, '--out')
        parsed_ts = parse_ts(ts)                        # Before the loads, which may be long downloads.
        ref = frechet.load_reference(ref_path)
        check_reference_first(ref, ref_path, metrics)
        network, encoder = load_network(net, dev, verbose=dist.get_rank() == 0, precision=precision)
        checked_ts, checked_steps = check_sampling_options(network, parsed_ts, steps, class_idx)
        resolution = network.img_resolution * (8 if hasattr(encoder, '_vae') else 1)
        check_reference_first(ref, ref_path, metrics, resolution)
        detectors = make_detectors(metrics, inception, dinov2, custom)
        check_reference_first(ref, ref_path, metrics, resolution, detectors)        # Before 50,000 images are generated.
        images = (r['images'] for r in generate_images(network, encoder, list(range(seed, seed + num)), ts=checked_ts, steps=checked_steps,
            class_idx=class_idx, batch_size=batch, device=dev, rank=dist.get_rank(), world_size=dist.get_world_size()))
        with progress_bar(num) as progress:
            stats = feature_stats(images, detectors, resolution, dev, batch, progress)
        report(stats, ref, ref_path, out)
        dist.shutdown()
    run_cli(run)

@cmdline.command()
@click.option('--images', help='Folder or zip of images', metavar='PATH', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.pkl or .npz, path or URL)', metavar='PKL', required=True)
@click.option('--num', '--num-images', 'num', help='Number of images (default: all)', metavar='INT', type=click.IntRange(min=2))
@workers_option
@click.option('--out', help='Also write the scores as JSON here', metavar='JSON')
@common_options
def calc(images, ref_path, num, workers, out, metrics, batch, inception, dinov2, custom, device):
    """Compare a folder or zip of images with a reference."""
    def run():
        dev = dist.init(device)
        check_file_folder(out, '--out')
        ref = frechet.load_reference(ref_path)
        dataset = open_images(images, '--images')
        check_reference_first(ref, ref_path, metrics, dataset.resolution)
        detectors = make_detectors(metrics, inception, dinov2, custom)
        check_reference_first(ref, ref_path, metrics, dataset.resolution, detectors)
        stats = dataset_stats(dataset, num, workers, detectors, dev, batch)
        report(stats, ref, ref_path, out)
        dist.shutdown()
    run_cli(run)

@cmdline.command()
@click.option('--data', help='Dataset folder or zip', metavar='PATH', required=True)
@click.option('--dest', help='Output .pkl (EDM2 format) or .npz', metavar='PATH', required=True)
@click.option('--num', '--num-images', 'num', help='Number of images (default: all)', metavar='INT', type=click.IntRange(min=2))
@workers_option
@common_options
def ref(data, dest, num, workers, metrics, batch, inception, dinov2, custom, device):
    """Compute reference statistics of a dataset."""
    def run():
        dev = dist.init(device)
        check_file_folder(dest, '--dest')
        dataset = open_images(data, '--data')
        detectors = make_detectors(metrics, inception, dinov2, custom)
        stats = dataset_stats(dataset, num, workers, detectors, dev, batch)
        if dist.get_rank() == 0:
            make_output_folder(os.path.dirname(dest), f'--dest={dest}')
            frechet.save_reference(stats, dest)
            print(f'Saved {", ".join(stats)} statistics of {next(iter(stats.values()))["num_images"]} images to {dest}')
        dist.shutdown()
    run_cli(run)

if __name__ == '__main__':
    cmdline()
