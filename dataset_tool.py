"""Build datasets: `convert` images into an EDM2-style zip/folder, `encode` them into SD-VAE latents."""

import click

from dnnlib.util import run_cli
from training import dataset_io

#----------------------------------------------------------------------------

@click.group()
def cmdline():
    """Dataset processing tool (EDM2 layout: img00000000.png files + dataset.json labels)."""

@cmdline.command()
@click.option('--source', help='Input folder or zip of images', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output zip (*.zip) or folder', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Stop after this many images', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='Crop before resizing', type=click.Choice(dataset_io.TRANSFORMS))
@click.option('--resolution', help='Output size (default: keep; all images must then share one size)', metavar='WxH')
def convert(source, dest, max_images, transform, resolution):
    """Convert an image folder or zip into a dataset.

    \b
    python dataset_tool.py convert --source=path/to/ffhq --dest=../data/edm2/ffhq256.zip \\
        --resolution=256x256 --transform=center-crop-dhariwal
    """
    run_cli(dataset_io.convert_dataset, source=source, dest=dest, max_images=max_images, transform=transform, resolution=resolution)

@cmdline.command()
@click.option('--source', help='Input dataset (zip or folder of RGB images)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output zip (*.zip) or folder of latents', metavar='PATH', type=str, required=True)
@click.option('--model-url', help='VAE: diffusers hub name or local folder', metavar='NAME', type=str, default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--max-images', help='Stop after this many images', metavar='INT', type=click.IntRange(min=1))
@click.option('--batch', help='Images per VAE call', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
def encode(source, dest, model_url, max_images, batch):
    """Encode pixels into SD-VAE latent mean/std (as EDM2's img512-sd.zip).

    \b
    python dataset_tool.py encode --source=../data/edm2/img512.zip --dest=../data/edm2/img512-sd.zip
    """
    run_cli(dataset_io.encode_dataset, source=source, dest=dest, model_url=model_url, max_images=max_images, batch=batch)

if __name__ == '__main__':
    cmdline()
