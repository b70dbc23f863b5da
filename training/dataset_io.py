"""Reading image sources and writing datasets (the library side of dataset_tool.py)."""

import io
import json
import os
import re
import shutil
import zipfile

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from dnnlib.util import UserError, make_output_folder
from torch_utils import distributed as dist, misc
from training.dataset import IMAGE_EXTENSIONS, file_ext, image_pixels

TRANSFORMS = ['center-crop', 'center-crop-wide', 'center-crop-dhariwal']

def parse_resolution(text):
    if text is None or isinstance(text, tuple):
        return text
    m = re.fullmatch(r'(\d+)x(\d+)', str(text))
    if not m or 0 in (int(m.group(1)), int(m.group(2))):
        raise UserError(f'--resolution="{text}" is not of the form WxH with positive sizes, e.g. 256x256')
    return int(m.group(1)), int(m.group(2))

#----------------------------------------------------------------------------
# Sources.

def open_source(source, max_images=None):
    """(number of images, iterator of dict(name, img uint8 HWC, label)) from a folder or zip."""
    if os.path.isdir(source):
        names = sorted(os.path.relpath(os.path.join(root, f), source).replace(os.sep, '/')
            for root, _dirs, files in os.walk(source) for f in files)
        read = lambda name: open(os.path.join(source, name), 'rb').read()
    elif os.path.isfile(source) and file_ext(source) == '.zip':
        try:
            archive = zipfile.ZipFile(source)
        except zipfile.BadZipFile:
            raise UserError(f'--source={source} is not a valid zip file')
        names = sorted(archive.namelist())
        read = archive.read
    else:
        raise UserError(f'--source={source} does not exist or is neither a folder nor a .zip')
    image_names = [n for n in names if file_ext(n) in IMAGE_EXTENSIONS - {'.npy'}]
    if not image_names:
        raise UserError(f'--source={source} holds no images (.png, .jpg, .jpeg, .bmp, .webp)')
    labels = {}
    if 'dataset.json' in names:
        labels = dict(json.loads(read('dataset.json')).get('labels') or [])
    if max_images is not None:
        image_names = image_names[:max_images]

    def iterate():
        for name in image_names:
            try:
                img = image_pixels(PIL.Image.open(io.BytesIO(read(name))))
            except (OSError, ValueError) as err:       # PIL's UnidentifiedImageError (an OSError) names a BytesIO.
                reason = 'not an image format PIL reads' if isinstance(err, PIL.UnidentifiedImageError) else err
                raise UserError(f'cannot decode {name} in {source} ({reason}); remove or replace it')
            yield dict(name=name, img=img, label=labels.get(name))
    return len(image_names), iterate()

#----------------------------------------------------------------------------
# Transforms.

def resized(img, width, height, resample=PIL.Image.LANCZOS):
    """uint8 [H, W, C] (C = 1 or 3) resized by PIL to [height, width, C]."""
    pil = PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).resize((width, height), resample=resample)
    return np.array(pil).reshape(height, width, img.shape[2])

def make_transform(transform, width, height):
    """Function HWC uint8 -> HWC uint8 (or the input when nothing is asked)."""
    if transform is None:
        def scale(img):
            if width is None or (img.shape[1] == width and img.shape[0] == height):
                return img
            return resized(img, width, height)
        return scale
    if width is None:
        raise UserError(f'--transform={transform} needs --resolution=WxH')

    def center_crop(img):
        side = min(img.shape[0], img.shape[1])
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        return resized(img[top:top + side, left:left + side], width, height)

    def center_crop_wide(img):
        ch = int(np.round(width * img.shape[0] / height))
        if img.shape[1] < width or ch < height:
            return None
        top = (img.shape[0] - ch) // 2
        img = resized(img[top:top + ch], width, height)
        canvas = np.zeros([width, width, img.shape[2]], dtype=np.uint8)
        canvas[(width - height) // 2:(width + height) // 2] = img
        return canvas

    def center_crop_dhariwal(img):
        # ADM's preprocessing: halve with a box filter while large, bicubic to the size, then crop.
        if width != height:
            raise UserError('--transform=center-crop-dhariwal needs a square --resolution')
        while min(img.shape[:2]) >= 2 * width:
            img = resized(img, img.shape[1] // 2, img.shape[0] // 2, PIL.Image.BOX)
        scale = width / min(img.shape[:2])
        img = resized(img, round(img.shape[1] * scale), round(img.shape[0] * scale), PIL.Image.BICUBIC)
        top, left = (img.shape[0] - width) // 2, (img.shape[1] - width) // 2
        return img[top:top + width, left:left + width]

    return {'center-crop': center_crop, 'center-crop-wide': center_crop_wide, 'center-crop-dhariwal': center_crop_dhariwal}[transform]

#----------------------------------------------------------------------------
# Destinations.

class DatasetWriter:
    """Writes files into a zip or a folder under a temporary name beside `dest`, renamed to `dest` on close: a failed
    conversion (a corrupt image) leaves nothing behind, so running it again needs no clean-up."""

    def __init__(self, dest):
        self.dest = os.path.normpath(dest)                              # 'out/' too: its temporary folder beside it.
        self._temp = f'{self.dest}.tmp{os.getpid()}'
        if file_ext(dest) == '.zip':
            if os.path.exists(dest):
                raise UserError(f'--dest={dest} already exists; remove it or choose another path')
            make_output_folder(os.path.dirname(dest), f'--dest={dest}')
            self._zip = zipfile.ZipFile(self._temp, mode='w', compression=zipfile.ZIP_STORED)
        else:
            if os.path.isdir(dest) and len(os.listdir(dest)) != 0:
                raise UserError(f'--dest folder {dest} is not empty; remove it or choose another path')
            make_output_folder(self._temp, f'--dest={dest}')
            self._zip = None

    def write(self, name, data):
        if self._zip is not None:
            self._zip.writestr(name, data)
        else:
            path = os.path.join(self._temp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)

    def close(self):
        if self._zip is not None:
            self._zip.close()
        os.replace(self._temp, self.dest)       # Onto an empty folder `dest` too (POSIX rename).

    def abort(self):
        if self._zip is not None:
            self._zip.close()
            os.remove(self._temp)
        else:
            shutil.rmtree(self._temp)

def item_name(idx, ext):
    return f'{idx // 1000:05d}/img{idx:08d}.{ext}'

def write_dataset(dest, items, total, info=None):
    """Write (array, label) items; PNG for uint8 HWC images, .npy for float arrays; `info` (a dict) is
    recorded in dataset.json beside the labels. Returns the count."""
    writer = DatasetWriter(dest)
    labels = []
    count = 0
    try:
        for idx, (array, label) in enumerate(tqdm(items, total=total, unit='img', desc=f'Writing {dest}')):
            if array.dtype == np.uint8:
                name = item_name(idx, 'png')
                writer.write(name, misc.encode_png(array, compress_level=0, optimize=False))
            else:
                name = item_name(idx, 'npy').replace('/img', '/img-mean-std-')
                buffer = io.BytesIO()
                np.save(buffer, array)
                writer.write(name, buffer.getvalue())
            labels.append([name, label] if label is not None else None)
            count += 1
        has_labels = all(x is not None for x in labels) and count > 0
        labelled = sum(x is not None for x in labels)
        if 0 < labelled < count:                # EDM2 drops the labels silently here; training would then need --cond=False.
            print(f'Note: {count - labelled} of {count} images have no label in the source\'s dataset.json, so {dest} is '
                'written without labels; label every image (or none) to keep them')
        writer.write('dataset.json', json.dumps(dict(info or {}, labels=labels if has_labels else None)).encode('utf-8'))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return count

#----------------------------------------------------------------------------

def convert_dataset(source, dest, max_images=None, transform=None, resolution=None):
    if transform is not None and transform not in TRANSFORMS:
        raise UserError(f'unknown --transform={transform}; choose one of {", ".join(TRANSFORMS)}')
    width, height = parse_resolution(resolution) or (None, None)
    total, source_items = open_source(source, max_images)
    apply = make_transform(transform, width, height)
    expected = dict()

    def items():
        for item in source_items:
            img = apply(item['img'])
            if img is None:
                continue
            if 'shape' not in expected:
                expected['shape'] = img.shape
            elif img.shape != expected['shape']:
                raise UserError(f'{item["name"]} is {img.shape[1]}x{img.shape[0]}x{img.shape[2]} but earlier images are '
                    f'{expected["shape"][1]}x{expected["shape"][0]}x{expected["shape"][2]}; pass --resolution=WxH (and --transform) to make them match')
            yield img, item['label']
    count = write_dataset(dest, items(), total)
    print(f'Wrote {count} images to {dest}')
    return count

def encode_dataset(source, dest, model_url='stabilityai/sd-vae-ft-mse', max_images=None, batch=8, device=None):
    """Pixels -> VAE latent mean and std per image (float32 [8, H/8, W/8] .npy files)."""
    from training.dataset import ImageFolderDataset
    from training.encoders import StabilityVAEEncoder
    device, _note = dist.choose_device(device)
    dataset = ImageFolderDataset(source, max_size=max_images)
    if dataset.num_channels != 3:
        raise UserError(f'{source} holds {dataset.num_channels}-channel images; the VAE needs RGB')
    encoder = StabilityVAEEncoder(vae_name=model_url, batch_size=batch)
    encoder.init(device)

    def items():
        for start in range(0, len(dataset), batch):
            stop = min(start + batch, len(dataset))
            pixels = torch.as_tensor(np.stack([dataset[i][0] for i in range(start, stop)])).to(device)
            latents = encoder.encode_pixels(pixels).cpu().numpy().astype(np.float32)
            for i, latent in zip(range(start, stop), latents):
                label = int(np.argmax(dataset.get_label(i))) if dataset.has_labels else None
                yield latent, label
    count = write_dataset(dest, items(), len(dataset), info=dict(vae=model_url))     # Training decodes with the same VAE.
    print(f'Wrote {count} latents to {dest}')
    return count
