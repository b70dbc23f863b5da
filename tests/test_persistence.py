import os
import pickle
import textwrap

import pytest
import torch

import dnnlib
from conftest import run_python, load_fixture
from torch_utils import persistence
from training.networks_edm2 import Precond

# A module in the style of EDM2's embedded sources: it imports every helper module they use.
EDM2_STYLE_MODULE = textwrap.dedent('''
    import numpy as np
    import psutil
    import torch
    import dnnlib
    from torch_utils import persistence, misc, distributed as dist, training_stats

    @persistence.persistent_class
    class Scaler(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale
            self.config = dnnlib.EasyDict(scale=scale)
            self.cache_dir = dnnlib.make_cache_dir_path('x')

        def forward(self, x):
            return x * misc.const_like(x, np.float32(self.scale)) + dist.get_rank()
''')

def test_edm2_style_pickle_loads_without_its_module(tmp_path):
    module_dir = tmp_path / 'mods'
    module_dir.mkdir()
    (module_dir / 'edm2_style_mod.py').write_text(EDM2_STYLE_MODULE)
    make = textwrap.dedent(f'''
        import pickle, sys
        sys.path.insert(0, {str(module_dir)!r})
        import dnnlib, edm2_style_mod
        net = edm2_style_mod.Scaler(3.0)
        with open({str(tmp_path / 'net.pkl')!r}, 'wb') as f:
            pickle.dump(dnnlib.EasyDict(ema=net, loss_fn=None), f)
    ''')
    assert run_python(['-c', make]).returncode == 0
    (module_dir / 'edm2_style_mod.py').unlink()
    with open(tmp_path / 'net.pkl', 'rb') as f:
        data = pickle.load(f)
    assert isinstance(data, dnnlib.EasyDict)
    assert persistence.is_persistent(data.ema)
    assert data.ema.init_kwargs == {} and data.ema.init_args == (3.0,)
    assert torch.equal(data.ema(torch.ones(2)), torch.full([2], 3.0))

def test_pickle_meta_has_edm2_layout():
    net = Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1],
        num_blocks=1, attn_resolutions=[], logvar_channels=8)
    func, (meta,) = net.__reduce__()[:2]
    assert func is persistence._reconstruct_persistent_obj
    assert func.__module__ == 'torch_utils.persistence' and func.__name__ == '_reconstruct_persistent_obj'
    assert meta['type'] == 'class' and meta['version'] == 6 and meta['class_name'] == 'Precond'
    assert 'class UNet' in meta['module_src'] and isinstance(meta['state'], dict)

def test_our_pickle_round_trips_in_a_fresh_process(tmp_path):
    data = load_fixture('edm2_precond_small.pt')
    net = Precond(**data['config']).eval()
    net.load_state_dict(data['state_dict'])
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=net), f)
    check = textwrap.dedent(f'''
        import pickle, torch
        with open({str(tmp_path / 'net.pkl')!r}, 'rb') as f:
            net = pickle.load(f)['ema']
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        data = torch.load({os.path.join('tests', 'fixtures', 'edm2_precond_small.pt')!r}, weights_only=True)
        D = net(data['x'], data['sigma'], data['class_labels'])
        assert float((D - data['D_x']).norm() / data['D_x'].norm()) < 1e-5
        assert net.init_kwargs['model_channels'] == 16
        print('ok')
    ''')
    result = run_python(['-c', check])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'

def test_unknown_version_is_refused():
    meta = dict(type='class', version=5, module_src='', class_name='X', state={})
    with pytest.raises(pickle.UnpicklingError, match='version 5'):
        persistence._reconstruct_persistent_obj(meta)

def test_snapshot_written_before_the_redesign_loads_and_samples_the_same():
    """A student pickle from an earlier checkout embeds that checkout's networks_ncvsd source, which imports
    today's training.networks_edm2 and noise_levels: the names it uses must keep meaning the same thing."""
    check = textwrap.dedent(f'''
        import torch
        from training.network_io import load_network_data
        data = load_network_data({os.path.join('tests', 'fixtures', 'snapshot-pre-redesign.pkl')!r}, verbose=False)
        net = data['ema'].float().eval()
        expected = torch.load({os.path.join('tests', 'fixtures', 'snapshot-pre-redesign-samples.pt')!r}, weights_only=True)
        for key, ts in (('sample_1', (10, 39)), ('sample_2', (10, 22, 39))):
            gen = torch.Generator().manual_seed(1)
            sample = net.sample(expected['noise'], expected['labels'], ts=ts, randn_like=lambda x: torch.randn(x.shape, generator=gen))
            assert torch.allclose(sample, expected[key], atol=1e-5), (key, float((sample - expected[key]).abs().max()))
        print('ok')
    ''')
    result = run_python(['-c', check])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'

def test_an_edm2_teacher_pickle_runs_on_our_precond(tmp_path):
    """A teacher unpickled from its embedded source (in a fresh process, as every run loads it) is rebuilt as
    training.networks_edm2.Precond, so that the speed options reach it, with the published network's outputs."""
    data = load_fixture('edm2_precond_small.pt')
    net = Precond(**data['config']).eval()
    net.load_state_dict(data['state_dict'])
    with open(tmp_path / 'teacher.pkl', 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=net.half()), f)
    check = textwrap.dedent(f'''
        import pickle, torch
        from torch_utils import persistence
        from training.network_io import load_network
        from training.networks_edm2 import Precond
        def as_published(meta):                 # EDM2's embedded source is not ours: load it as another module
            meta.module_src += '\\n# the published source\\n'
            return meta
        persistence.import_hook(as_published)
        with open({str(tmp_path / 'teacher.pkl')!r}, 'rb') as f:
            assert type(pickle.load(f)['ema']).__module__.startswith('_imported_module_')
        teacher, encoder = load_network({str(tmp_path / 'teacher.pkl')!r}, torch.device('cpu'), role='teacher', verbose=False)
        assert type(teacher) is Precond and encoder is None and next(teacher.parameters()).dtype == torch.float16
        data = torch.load({os.path.join('tests', 'fixtures', 'edm2_precond_small.pt')!r}, weights_only=True)
        with torch.no_grad():
            D = teacher.float()(data['x'], data['sigma'], data['class_labels'])
        assert float((D - data['D_x']).norm() / data['D_x'].norm()) < 1e-3, 'stored in float16, as published'
        print('ok')
    ''')
    result = run_python(['-c', check])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'
