"""Fréchet distances (FID, FD-DINOv2): detectors, float64 feature moments, reference statistics."""

import io
import os
import pickle
import warnings

import numpy as np
import scipy.linalg
import torch

import dnnlib
from dnnlib.util import UserError, atomic_file
from torch_utils import distributed as dist, misc

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'

#----------------------------------------------------------------------------
# Detectors: uint8 [N, 3, H, W] -> float features [N, feature_dim].

class Detector:
    name = 'detector'
    feature_dim = None

    def __call__(self, images):
        raise NotImplementedError

def load_weights(path_or_url, env, default_url, option, reader):
    """reader(file) on the weights at path_or_url, else $env, else the published URL (cached)."""
    url = path_or_url or os.environ.get(env, default_url)
    try:
        with dnnlib.util.open_url(url, verbose=dist.get_rank() == 0) as f:
            return reader(f)
    except UserError as err:
        raise UserError(f'cannot load the detector weights ({err}); offline, pass {option}=PATH (or set {env}) to a local copy, '
            'or plug in another detector with --detector=METRIC=module.Class') from None

def as_rgb(images):
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images

class InceptionV3Detector(Detector):
    """EDM2's Inception-v3 (inception-2015-12-05.pkl, 2048 pool features)."""
    name = 'inception-2015-12-05'
    feature_dim = 2048

    def __init__(self, path_or_url=None):
        self.model = load_weights(path_or_url, 'NCVSD_INCEPTION', INCEPTION_URL, '--inception', pickle.load)

    def __call__(self, images):
        images = as_rgb(images.to(torch.uint8))
        return self.model.to(images.device)(images, return_features=True).to(torch.float64)

class DINOv2Detector(Detector):
    """DINOv2 ViT-L/14 (the official pretrained weights), CLS features of 224×224 bicubic resizes."""
    name = 'dinov2-vitl14'
    feature_dim = 1024

    def __init__(self, path_or_url=None):
        from evaluation.dinov2 import VisionTransformer
        read = lambda f: torch.load(io.BytesIO(f.read()), map_location='cpu', weights_only=True)
        state = load_weights(path_or_url, 'NCVSD_DINOV2', DINOV2_URL, '--dinov2', read)
        self.model = VisionTransformer().eval().requires_grad_(False)
        self.model.load_state_dict(state)

    def __call__(self, images):
        x = torch.nn.functional.interpolate(as_rgb(images.to(torch.float32) / 255), size=(224, 224), mode='bicubic', antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).reshape(1, 3, 1, 1)
        return self.model.to(x.device)((x - mean) / std).to(torch.float64)

DETECTORS = dict(fid='evaluation.frechet.InceptionV3Detector', fd_dinov2='evaluation.frechet.DINOv2Detector')

def make_detectors(metrics, weights=None, custom=None):
    """{metric: detector}; `weights` maps metric -> path/URL, `custom` maps metric -> class name."""
    classes = dict(DETECTORS, **(custom or {}))
    unknown = [m for m in metrics if m not in classes]
    if unknown:
        raise UserError(f'unknown metric {", ".join(unknown)}; choose from {", ".join(sorted(classes))}')
    weights = weights or {}
    detectors = {}
    for metric in metrics:
        try:
            cls = dnnlib.util.get_obj_by_name(classes[metric])
        except (ImportError, AttributeError) as err:
            raise UserError(f'cannot import the detector {classes[metric]} for {metric} ({err}); check the class name and PYTHONPATH')
        detectors[metric] = cls(**({'path_or_url': weights[metric]} if weights.get(metric) else {}))
    return detectors

#----------------------------------------------------------------------------
# Moments and the Fréchet distance.

class FeatureStats:
    """Running float64 count, sum and sum of outer products; summed across ranks by finalize()."""

    def __init__(self, feature_dim):
        self.count = torch.zeros([], dtype=torch.float64)
        self.sum = torch.zeros([feature_dim], dtype=torch.float64)
        self.outer = torch.zeros([feature_dim, feature_dim], dtype=torch.float64)

    def append(self, features):
        features = features.detach().to(torch.float64).cpu()
        self.count += features.shape[0]
        self.sum += features.sum(dim=0)
        self.outer += features.T @ features

    def finalize(self):
        """(count, mu [D], sigma [D, D]) over all ranks."""
        packed = torch.cat([self.count.reshape(1), self.sum, self.outer.flatten()])
        dist.all_reduce_sum(packed)
        dim = self.sum.shape[0]
        count, total, outer = packed[0], packed[1:dim + 1], packed[dim + 1:].reshape(dim, dim)
        mu = total / count
        sigma = (outer - count * torch.outer(mu, mu)) / (count - 1)
        return int(count), mu.numpy(), sigma.numpy()

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64 on the CPU."""
    mu1, mu2 = np.float64(mu1), np.float64(mu2)
    sigma1, sigma2 = np.float64(sigma1), np.float64(sigma2)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if np.iscomplexobj(root):
        residue = np.max(np.abs(root.imag))
        if residue > 1e-3 * max(np.max(np.abs(root.real)), 1e-12):
            warnings.warn(f'sqrtm of the covariance product has an imaginary part of {residue:.3g}; the distance may be inaccurate')
        root = root.real
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * root))

#----------------------------------------------------------------------------
# Reference statistics: EDM2's pickled dict {metric: {'mu', 'sigma'}} (plus our metadata), or .npz.

class _ReferenceUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain builtin containers only; anything else is refused unexecuted."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'), ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('_codecs', 'encode')} | {('builtins', n) for n in ('dict', 'list', 'tuple', 'set', 'frozenset', 'int', 'float', 'complex', 'str', 'bytes', 'bytearray', 'bool')}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'reference statistics may hold only numpy arrays and builtins, not {module}.{name}')

def load_reference(path_or_url):
    """{metric: dict(mu, sigma, [detector, resolution, num_images])} from .pkl or .npz."""
    with dnnlib.util.open_url(path_or_url, verbose=dist.get_rank() == 0) as f:
        data = f.read()
    if data[:2] == b'PK':
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        ref = {}
        for key in npz.files:
            metric, field = key.rsplit('/', 1)
            value = npz[key]
            ref.setdefault(metric, {})[field] = value.item() if value.ndim == 0 else value
        return ref
    try:
        ref = _ReferenceUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise UserError(f'refusing {path_or_url}: {err}')
    if not isinstance(ref, dict) or not all(isinstance(v, dict) and {'mu', 'sigma'} <= set(v) for v in ref.values()):
        raise UserError(f'{path_or_url} is not a reference file (expected {{metric: {{"mu", "sigma"}}}})')
    return ref

def save_reference(ref, path):
    """Write the EDM2 pickle format (or .npz by extension), atomically."""
    with atomic_file(path) as f:
        if path.endswith('.npz'):
            np.savez(f, **{f'{metric}/{field}': np.asarray(value) for metric, stats in ref.items() for field, value in stats.items()})
        else:
            pickle.dump(ref, f)

def check_reference(ref, stats, source):
    """Refuse comparisons between statistics of different detectors or image resolutions."""
    for metric, ours in stats.items():
        if metric not in ref:
            raise UserError(f'the reference {source} has no "{metric}" statistics; choose --metrics from {", ".join(ref)}')
        theirs = ref[metric]
        for field in ('detector', 'resolution'):
            if field in theirs and field in ours and theirs[field] != ours[field]:
                raise UserError(f'{metric}: the reference was computed with {field}={theirs[field]} but these images have '
                    f'{field}={ours[field]}; use a matching reference (calculate_metrics.py ref)')

#----------------------------------------------------------------------------

def compute_stats(image_batches, detectors, resolution, progress=None):
    """Feed uint8 batches through every detector; {metric: dict(mu, sigma, detector, resolution, num_images)}."""
    accumulators = {metric: FeatureStats(det.feature_dim) for metric, det in detectors.items()}
    for images in image_batches:
        if images is not None and len(images):
            for metric, det in detectors.items():
                accumulators[metric].append(det(images))
        misc.advance_progress(progress, 0 if images is None else len(images), dist.get_world_size())
    stats = {}
    for metric, acc in accumulators.items():
        count, mu, sigma = acc.finalize()
        stats[metric] = dict(mu=mu, sigma=sigma, detector=detectors[metric].name, resolution=int(resolution), num_images=count)
    return stats

def fd_scores(stats, ref):
    return {metric: frechet_distance(s['mu'], s['sigma'], ref[metric]['mu'], ref[metric]['sigma']) for metric, s in stats.items()}
