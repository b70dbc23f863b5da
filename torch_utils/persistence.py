"""Pickles that carry the source code of their classes (EDM2's persistence format, version 6).

A class decorated with @persistent_class pickles each instance as
`_reconstruct_persistent_obj(meta)`, where `meta` holds the text of the whole module that defined
the class, the class name and the instance state. Loading such a pickle runs that module text in a
fresh module, so a snapshot keeps working after the code in the repository changes.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

_version = 6                # The format version written by EDM2; kept so EDM2 tools read our pickles.
_decorators = set()         # Every class produced by persistent_class().
_import_hooks = []          # Callables applied to `meta` before reconstruction.
_module_to_src_dict = {}    # Module -> its source text.
_src_to_module_dict = {}    # Source text -> the module made from it (one module per distinct text).

def persistent_class(orig_class):
    """Class decorator: instances remember their constructor arguments and pickle with their source."""
    assert isinstance(orig_class, type)
    if orig_class in _decorators:
        return orig_class
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The outermost decorated class sets these last, so they hold its own arguments.
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)
            assert orig_class.__name__ in orig_module.__dict__
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=fields[2])
                fields[:3] = [_reconstruct_persistent_obj, (meta,), None]
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    _decorators.add(Decorator)
    return Decorator

def is_persistent(obj):
    """True for a persistent class or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError:
        pass
    return type(obj) in _decorators

def import_hook(hook):
    """Register hook(meta) -> meta, run on every persistent object being unpickled (e.g. to patch old source)."""
    assert callable(hook)
    _import_hooks.append(hook)

def _reconstruct_persistent_obj(meta):
    """Unpickling entry point named inside every persistent pickle."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None
    if meta.version != _version:
        raise pickle.UnpicklingError(f'persistent object of format version {meta.version}; this code reads version {_version}')
    if meta.type != 'class':
        raise pickle.UnpicklingError(f'unknown persistent object type "{meta.type}"')
    module = _src_to_module(meta.module_src)
    decorator_class = persistent_class(module.__dict__[meta.class_name])
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

def _module_to_src(module):
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src

def _src_to_module(src):
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)
    return module

def _check_pickleable(obj):
    """Fail early, at construction, if the object could not be saved in a snapshot."""
    def strip(value):
        if isinstance(value, (list, tuple, set)):
            return [strip(x) for x in value]
        if isinstance(value, dict):
            return [[strip(k), strip(v)] for k, v in value.items()]
        if isinstance(value, (str, int, float, bool, bytes, bytearray)) or value is None:
            return None
        if f'{type(value).__module__}.{type(value).__name__}' in ('numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter'):
            return None
        if is_persistent(value):
            return None
        return value
    with io.BytesIO() as f:
        pickle.dump(strip(obj), f)
