"""Solve inverse problems with PnP-GD and an NCVSD generative denoiser.

\b
Examples:
  python posterior_sample.py --net=../model_zoo/ncvsd/edm2-ffhq256-xs.pkl --data=../data/test/ffhq \\
      --preset=super_resolution --outdir=results/super_resolution
  torchrun --standalone --nproc_per_node=8 posterior_sample.py ...      # the batches shared among 8 GPUs
"""

import click

from dnnlib.util import run_cli, check_output_folder
from torch_utils import distributed as dist
from inverse.solve import load_task, parse_metrics, solve_dataset
from training.network_io import load_network

def run(net, data, preset, outdir, batch, seed, runs, num, metrics, lpips_vgg, lpips_heads, device, **overrides):
    device = dist.init(device)
    task, metrics = load_task(preset, overrides), parse_metrics(metrics)
    check_output_folder(outdir, f'--outdir={outdir}')
    network, encoder = load_network(net, device, verbose=dist.get_rank() == 0)
    report = solve_dataset(network, encoder, data, task, outdir, batch=batch, seed=seed, runs=runs, max_images=num,
        metrics=metrics, lpips_vgg=lpips_vgg, lpips_heads=lpips_heads, device=device)
    for metric, s in report['summary'].items():
        dist.print0(f'{metric:6s} mean {s["mean"]:.4f} ± {s["std"]:.4f}   best of {report["runs"]} run(s) {s["best_of_runs_mean"]:.4f}')
    dist.print0(f'LPIPS: {report["lpips_variant"]}')
    dist.print0(f'Results in {outdir} (grid.png, metrics.json, eval.md)')
    dist.shutdown()

@click.command(help=__doc__)
@click.option('--net', help='NCVSD network (pickle or export, path or URL)', metavar='PKL', required=True)
@click.option('--data', help='Folder or zip of test images', metavar='PATH', required=True)
@click.option('--preset', help='Task: box_inpainting, gaussian_deblur_circ, motion_deblur_circ, super_resolution, phase_retrieval, or a .json', required=True)
@click.option('--outdir', help='Where to save the results', metavar='DIR', required=True)
@click.option('--batch', help='Images per batch (one chain each)', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--seed', help='Random seed (measurements and chains)', metavar='INT', type=int, default=0, show_default=True)
@click.option('--runs', help='Independent runs per image (default: the preset\'s)', metavar='INT', type=click.IntRange(min=1))
@click.option('--num', '--num-images', 'num', help='Use at most this many images (under torchrun write --num-images: torchrun takes --num for --numa-binding)', metavar='INT', type=click.IntRange(min=1))
@click.option('--metrics', help='psnr,ssim,lpips', metavar='LIST', default='psnr,ssim,lpips', show_default=True)
@click.option('--beta', help='Likelihood temperature β [default: the preset\'s; 2σ_y² where it sets none]', type=float)
@click.option('--ema-sigma', help='Average x over steps with σ below this', type=float)
@click.option('--ema-decay', help='EMA decay of x', type=float)
@click.option('--sigma-min', help='Smallest σ of the annealing', type=float)
@click.option('--sigma-max', help='Largest σ of the annealing', type=float)
@click.option('--rho', help='Karras ρ of the annealing', type=float)
@click.option('--steps', help='Annealing steps', type=click.IntRange(min=1))
@click.option('--ts', help='A short --ts chain as the prior step, e.g. 20,39', metavar='LIST')
@click.option('--lpips-vgg', help='VGG-16 weights for LPIPS [env NCVSD_VGG16]', metavar='PTH')
@click.option('--lpips-heads', help='LPIPS linear heads [env NCVSD_LPIPS]', metavar='PT')
@click.option('--device', help='Device (default: CUDA if available, else CPU)', metavar='STR')
def main(**opts):
    run_cli(run, **opts)

if __name__ == '__main__':
    main()
