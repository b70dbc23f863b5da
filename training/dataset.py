"""Training images stored as a folder or a zip of PNG/JPEG files (or .npy latents), in EDM2's layout.

Labels come from `dataset.json` ({"labels": [[filename, label], ...]}); an item is
(uint8 [C, H, W] image or float32 latent array, float32 one-hot or vector label).
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

from dnnlib.util import UserError

IMAGE_EXTENSIONS = {'.png', '.jpg', '.jpeg', '.bmp', '.webp', '.npy'}

def file_ext(name):
    return os.path.splitext(name)[1].lower()

class _Storage:
    """Read access to the files of a folder or a zip. A zip handle belongs to the process that opened it:
    forked DataLoader workers open their own (a shared handle's file position makes reads corrupt)."""

    def __init__(self, path):
        self.path = path
        self.is_zip = not os.path.isdir(path)
        self._zip, self._zip_pid = None, None
        if self.is_zip and file_ext(path) != '.zip':
            raise UserError(f'dataset not found: {path} (expected a folder or a .zip made by dataset_tool.py convert)')
        if self.is_zip and not os.path.isfile(path):
            raise UserError(f'dataset not found: {path}')
        try:
            self.names = sorted(self._list())
        except zipfile.BadZipFile:
            raise UserError(f'{path} is not a valid zip file; recreate it with dataset_tool.py convert')

    def _list(self):
        if self.is_zip:
            return self._archive().namelist()
        return [os.path.relpath(os.path.join(folder, name), self.path).replace(os.sep, '/')
            for folder, _subdirs, names in os.walk(self.path) for name in names]

    def _archive(self):
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def read(self, name):
        if self.is_zip:
            return self._archive().read(name)
        with open(os.path.join(self.path, name), 'rb') as f:
            return f.read()

    def close(self):
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _zip_pid=None)

GREYSCALE_MODES = {'1', 'L', 'LA', 'La'}
SIXTEEN_BIT_MODES = {'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'}     # PIL's modes of 16-bit greyscale PNGs.

def image_pixels(image):
    """A PIL image as uint8 [H, W, C] pixels: C = 1 for greyscale (alpha dropped, 16 bits scaled to 8), else C = 3 (palette,
    CMYK, YCbCr, RGBA, ... converted to RGB: np.array of a palette image holds its indices, of a CMYK one its inks)."""
    if image.mode in SIXTEEN_BIT_MODES:
        return np.round(np.array(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)[:, :, None]
    if image.mode == 'F':
        raise ValueError('32-bit float pixels have no range to map to 8 bits')
    if image.mode in GREYSCALE_MODES:
        return np.array(image.convert('L'))[:, :, None]
    return np.array(image.convert('RGB'))

def decode_item(data, name, where):
    """File bytes -> [C, H, W] array (uint8 image or float32 latents)."""
    if file_ext(name) == '.npy':
        array = np.load(io.BytesIO(data))
        return array.reshape(-1, *array.shape[-2:])
    try:
        pixels = image_pixels(PIL.Image.open(io.BytesIO(data)))
    except (OSError, ValueError):
        raise UserError(f'{where}: cannot decode image {name}; remove it or reconvert the dataset')
    return pixels.transpose(2, 0, 1)

def one_hot(label, num_classes):
    if np.ndim(label) == 0:
        vector = np.zeros([num_classes], dtype=np.float32)
        vector[int(label)] = 1
        return vector
    return np.array(label, dtype=np.float32)

class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (or .npy latents) in a folder or a zip, with optional dataset.json labels.

    max_size keeps a fixed random subset (chosen by random_seed); xflip appends mirrored copies;
    cache keeps decoded items in memory; use_labels=False drops the labels (label_dim 0); label_dim sets the classes of
    the one-hot labels (default: the largest label + 1), for images of a network's first classes only."""

    def __init__(self, path, resolution=None, use_labels=True, max_size=None, xflip=False, random_seed=0, cache=False,
        label_dim=None):
        self._path = path
        self._storage = _Storage(path)
        self._files = [name for name in self._storage.names if file_ext(name) in IMAGE_EXTENSIONS]
        if not self._files:
            raise UserError(f'no images found in {path}')
        self._name = os.path.splitext(os.path.basename(path.rstrip('/')))[0]
        self._image_shape = list(self._load(0).shape)
        if resolution is not None and self._image_shape[1:] != [resolution, resolution]:
            height, width = self._image_shape[1:]
            raise UserError(f'{path} holds {width}x{height} images but {resolution}x{resolution} are needed; '
                f'reconvert with dataset_tool.py convert --resolution={resolution}x{resolution}')
        self._labels = self._read_labels() if use_labels else None
        self._label_dim = label_dim
        if label_dim is not None and self._labels is not None and self._labels.ndim == 1 and self._labels.max() >= label_dim:
            raise UserError(f'{path} has labels up to {self._labels.max()} but the network has {label_dim} classes '
                f'(0 to {label_dim - 1}); use images of its classes')
        self._cache = {} if cache else None
        order = np.arange(len(self._files), dtype=np.int64)
        if max_size is not None and max_size < len(order):
            np.random.RandomState(random_seed % (1 << 31)).shuffle(order)
            order = np.sort(order[:max_size])
        self._items = [(int(i), False) for i in order] + ([(int(i), True) for i in order] if xflip else [])

    def _load(self, file_idx):
        name = self._files[file_idx]
        return decode_item(self._storage.read(name), name, self._path)

    @property
    def info(self):
        """dataset.json's entries other than the labels (e.g. "vae": where `encode` got its VAE)."""
        if 'dataset.json' not in self._storage.names:
            return {}
        return {k: v for k, v in json.loads(self._storage.read('dataset.json')).items() if k != 'labels'}

    def _read_labels(self):
        """[num files] class indices or [num files, L] vectors, or None without dataset.json labels."""
        if 'dataset.json' not in self._storage.names:
            return None
        table = json.loads(self._storage.read('dataset.json')).get('labels')
        if table is None:
            return None
        by_name = dict(table)
        missing = [name for name in self._files if name not in by_name]
        if missing:
            raise UserError(f'{self._path}: dataset.json has no label for {missing[0]}')
        labels = np.array([by_name[name] for name in self._files])
        return labels.astype(np.int64 if labels.ndim == 1 else np.float32)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, idx):
        file_idx, mirrored = self._items[idx]
        image = self._cache.get(file_idx) if self._cache is not None else None
        if image is None:
            image = self._load(file_idx)
            if self._cache is not None:
                self._cache[file_idx] = image
        if list(image.shape) != self._image_shape:
            raise UserError(f'{self._name}: item {file_idx} has shape {list(image.shape)}, expected {self._image_shape}; '
                'reconvert the dataset with dataset_tool.py convert --resolution=WxH')
        if mirrored:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        if self._labels is None:
            return np.zeros([0], dtype=np.float32)
        return one_hot(self._labels[self._items[idx][0]], self.label_dim)

    def close(self):
        self._storage.close()

    @property
    def name(self):
        return self._name

    @property
    def path(self):
        return self._path

    @property
    def image_shape(self):
        return list(self._image_shape)

    @property
    def num_channels(self):
        return self._image_shape[0]

    @property
    def resolution(self):
        height, width = self._image_shape[1:]
        if height != width:
            raise UserError(f'{self._path} holds {width}x{height} images but square ones are needed; reconvert with '
                f'dataset_tool.py convert --resolution={min(height, width)}x{min(height, width)} --transform=center-crop')
        return height

    @property
    def label_shape(self):
        if self._labels is None:
            return [0]
        if self._labels.ndim == 1:
            return [max(int(self._labels.max()) + 1, self._label_dim or 0)]
        return list(self._labels.shape[1:])

    @property
    def label_dim(self):
        return self.label_shape[0]

    @property
    def has_labels(self):
        return self.label_dim != 0
