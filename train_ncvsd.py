"""Distill an EDM2 diffusion model into an NCVSD generative denoiser.

\b
Examples:
  python train_ncvsd.py --preset=toy --outdir=training-runs/toy               # CPU, no download
  torchrun --standalone --nproc_per_node=8 train_ncvsd.py --preset=img64-s \\
      --net=../model_zoo/edm2/edm2-img64-s-1073741-0.075.pkl --data=../data/edm2/img64.zip --outdir=runs/img64-s
"""

import click

from dnnlib.util import run_cli
from training import train_setup

@click.command(help=__doc__)
@click.option('--preset', help='Training preset: a name in presets/ or a .json path', metavar='STR', required=True)
@click.option('--outdir', help='Where to save the results (resumed if it holds checkpoints)', metavar='DIR', required=True)
@click.option('--net', help='Teacher network pickle (path or URL)', metavar='PKL')
@click.option('--data', help='Training data (zip or folder)', metavar='ZIP|DIR')
@click.option('--cond', help='Use the dataset labels', metavar='BOOL', type=bool)
@click.option('--batch', help='Total batch size', metavar='NIMG', type=click.IntRange(min=1))
@click.option('--batch-gpu', help='Per-rank batch per accumulation round', metavar='NIMG', type=click.IntRange(min=1))
@click.option('--duration', help='Training duration (e.g. 64Mi)', metavar='NIMG')
@click.option('--status', help='Status line interval', metavar='NIMG')
@click.option('--snapshot', help='Snapshot interval', metavar='NIMG')
@click.option('--checkpoint', help='Checkpoint interval', metavar='NIMG')
@click.option('--ts', help='Grid indices for snapshot samples, e.g. 10,22,39', metavar='LIST')
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--lr', help='Reference learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--fp16', help='Run the UNet bodies in float16 on CUDA (= --precision=fp16)', metavar='BOOL', type=bool)
@click.option('--precision', help='UNet bodies of students and teacher [default: fp16 if the preset sets fp16, else fp32]', type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--seed', help='Random seed', metavar='INT', type=int)
@click.option('--workers', help='Data loader worker processes', metavar='INT', type=click.IntRange(min=0))
@click.option('--vae', help='VAE for latent datasets (hub name or folder) [default: the one dataset_tool.py encode used]', metavar='NAME|DIR')
@click.option('--device', help='Device (default: CUDA if available, else CPU)', metavar='STR')
@click.option('--compile', help='torch.compile the networks of the iteration [default: False]', metavar='BOOL', type=bool)
@click.option('--cuda-graphs', help='Replay the networks of the iteration as CUDA graphs (small per-GPU batches) [default: False]', metavar='BOOL', type=bool)
@click.option('--dry-run', help='Print the resolved configuration and exit', is_flag=True)
def main(dry_run, **opts):
    run_cli(train_setup.launch, {k: v for k, v in opts.items() if v is not None}, dry_run=dry_run)

if __name__ == '__main__':
    main()
