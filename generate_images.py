"""Generate images with an NCVSD student (--ts) or an EDM2 teacher (--steps, Heun).

\b
Examples:
  python generate_images.py --net=path/to/ncvsd-img512-s.pkl --ts=10,22,39 --outdir=out --seeds=0-3
  python generate_images.py --net=edm2-img64-s-1073741-0.075.pkl --steps=32 --outdir=out --seeds=0-63 --grid=grid.png
  torchrun --standalone --nproc_per_node=8 generate_images.py --net=... --outdir=out --seeds=0-49999 --subdirs
"""

import os

import click
import torch
import tqdm

from dnnlib.util import run_cli, parse_int_list, check_output_folder, make_output_folder
from torch_utils import distributed as dist, misc
from training.network_io import load_network
from training.noise_levels import DEFAULT_TS, parse_ts
from training.sampling import DEFAULT_HEUN_STEPS, check_sampling_options, generate_images, save_image_grid

def run(net, outdir, seeds, ts=None, steps=None, class_idx=None, subdirs=False, batch=32, device=None, grid=None, vae=None, precision=None, compile=False):
    device = dist.init(device)
    seeds = parse_int_list(seeds)
    ts = parse_ts(ts)                                   # Before the load, which may be a long download.
    check_output_folder(outdir, f'--outdir={outdir}')
    if grid:
        check_output_folder(os.path.dirname(grid), f'--grid={grid}')
    net, encoder = load_network(net, device, verbose=dist.get_rank() == 0, vae=vae, precision=precision,
        compile_backend='inductor' if compile else None)
    ts, steps = check_sampling_options(net, ts, steps, class_idx)
    sampler = f'--ts={",".join(map(str, ts))}' if ts else f'Heun, {2 * steps - 1} NFE'
    dist.print0(f'Generating {len(seeds)} images ({sampler}) to "{outdir}" on {dist.get_world_size()} rank(s) ...')
    progress = tqdm.tqdm(total=len(seeds), unit='img', disable=dist.get_rank() != 0)
    collected = []
    for result in generate_images(net, encoder, seeds, ts=ts, steps=steps, class_idx=class_idx, batch_size=batch,
            device=device, rank=dist.get_rank(), world_size=dist.get_world_size(), progress=progress):
        for seed, image in zip(result['seeds'], [] if result['images'] is None else result['images'].cpu()):
            folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
            os.makedirs(folder, exist_ok=True)
            misc.save_png(image, os.path.join(folder, f'{seed:06d}.png'))
            if grid:
                collected.append((seed, image))
    progress.close()
    if grid:
        everything = [item for part in dist.all_gather_object(collected) for item in part]
        if dist.get_rank() == 0:
            make_output_folder(os.path.dirname(grid), f'--grid={grid}')
            save_image_grid(torch.stack([image for _seed, image in sorted(everything, key=lambda item: item[0])]), grid)
    dist.barrier()
    dist.print0('Done.')
    dist.shutdown()

@click.command(help=__doc__)
@click.option('--net', help='Network pickle or export (path or URL)', metavar='PKL|PT', required=True)
@click.option('--outdir', help='Where to save the images', metavar='DIR', required=True)
@click.option('--seeds', help='Random seeds, e.g. 0-3,7', metavar='LIST', default='0-63', show_default=True)
@click.option('--ts', help=f'NCVSD grid indices ending at 39 [default: {",".join(map(str, DEFAULT_TS))}]', metavar='LIST')
@click.option('--steps', help=f'Heun steps for diffusion teachers [default: {DEFAULT_HEUN_STEPS}]', metavar='INT', type=click.IntRange(min=1))
@click.option('--class', 'class_idx', help='Class label (default: random per seed)', metavar='INT', type=int)
@click.option('--subdirs', help='One subfolder per 1000 seeds', is_flag=True)
@click.option('--batch', help='Images per batch and rank', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--device', help='Device (default: CUDA if available, else CPU)', metavar='STR')
@click.option('--vae', help='VAE for latent-space networks (hub name or folder) [default: the pickle\'s]', metavar='NAME|DIR')
@click.option('--grid', help='Also save all images as one PNG grid here', metavar='PNG')
@click.option('--precision', help='UNet bodies in fp32, fp16 (CUDA only) or bf16 [default: as stored]', type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--compile', help='torch.compile the network (worth it for many images)', is_flag=True)
def main(**opts):
    run_cli(run, **opts)

if __name__ == '__main__':
    main()
