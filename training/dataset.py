"""Image datasets stored as a folder or a zip of PNG/JPEG images (or .npy latents), EDM2 layout.

Labels come from `dataset.json` ({"labels": [[filename, label], ...]}); images are returned as
uint8 [C, H, W] numpy arrays, latents as float32 arrays.
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

class Dataset(torch.utils.data.Dataset):
    """Common indexing: `max_size` subset (deterministic), x-flip doubling, one-hot labels."""

    def __init__(self, name, raw_shape, use_labels=True, max_size=None, xflip=False, random_seed=0, cache=False):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict()
        self._raw_labels = None
        self._label_shape = None
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self):
        if self._raw_labels is None:
            self._raw_labels = self._load_raw_labels() if self._use_labels else None
            if self._raw_labels is None:
                self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert self._raw_labels.shape[0] == self._raw_shape[0]
        return self._raw_labels

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = self._raw_idx[idx]
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if list(image.shape) != self.image_shape:
            raise UserError(f'{self._name}: item {raw_idx} has shape {list(image.shape)}, expected {self.image_shape}; '
                'reconvert the dataset with dataset_tool.py convert --resolution=WxH')
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        assert self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1] if raw_labels.size else [0]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        return int(self.label_shape[0]) if self.label_shape else 0

    @property
    def has_labels(self):
        return self.label_dim != 0

class ImageFolderDataset(Dataset):
    """Images (or .npy latents) in a folder or a zip file, with optional dataset.json labels."""

    def __init__(self, path, resolution=None, **super_kwargs):
        self._path = path
        self._zipfile = None
        if os.path.isdir(path):
            self._type = 'dir'
            self._all_fnames = sorted(os.path.relpath(os.path.join(root, f), start=path).replace(os.sep, '/')
                for root, _dirs, files in os.walk(path) for f in files)
        elif file_ext(path) == '.zip':
            if not os.path.isfile(path):
                raise UserError(f'dataset not found: {path}')
            self._type = 'zip'
            try:
                self._all_fnames = sorted(self._get_zipfile().namelist())
            except zipfile.BadZipFile:
                raise UserError(f'{path} is not a valid zip file; recreate it with dataset_tool.py convert')
        else:
            raise UserError(f'dataset not found: {path} (expected a folder or a .zip made by dataset_tool.py convert)')
        self._image_fnames = [f for f in self._all_fnames if file_ext(f) in IMAGE_EXTENSIONS]
        if len(self._image_fnames) == 0:
            raise UserError(f'no images found in {path}')
        name = os.path.splitext(os.path.basename(path.rstrip('/')))[0]
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise UserError(f'{path} holds {raw_shape[3]}x{raw_shape[2]} images but {resolution}x{resolution} are needed; '
                f'reconvert with dataset_tool.py convert --resolution={resolution}x{resolution}')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _get_zipfile(self):
        assert self._type == 'zip'
        if self._zipfile is None:
            self._zipfile = zipfile.ZipFile(self._path)
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None)

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        with self._open_file(fname) as f:
            data = f.read()
        if file_ext(fname) == '.npy':
            image = np.load(io.BytesIO(data))
            return image.reshape(-1, *image.shape[-2:])
        try:
            image = np.array(PIL.Image.open(io.BytesIO(data)))
        except (OSError, PIL.UnidentifiedImageError, ValueError):
            raise UserError(f'{self._path}: cannot decode image {fname}; remove it or reconvert the dataset')
        image = image[:, :, np.newaxis] if image.ndim == 2 else image
        return image.transpose(2, 0, 1)

    def _load_raw_labels(self):
        if 'dataset.json' not in self._all_fnames:
            return None
        with self._open_file('dataset.json') as f:
            labels = json.load(f).get('labels', None)
        if labels is None:
            return None
        labels = dict(labels)
        try:
            labels = [labels[fname] for fname in self._image_fnames]
        except KeyError as err:
            raise UserError(f'{self._path}: dataset.json has no label for {err.args[0]}')
        labels = np.array(labels)
        return labels.astype({1: np.int64, 2: np.float32}[labels.ndim])
