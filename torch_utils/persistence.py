"""Pickles that carry the source code of their classes (EDM2's persistence format, version 6).

A class decorated with @persistent_class pickles each instance as `_reconstruct_persistent_obj(meta)`,
meta = dict(type='class', version=6, module_src=<text of the defining module>, class_name, state).
Unpickling runs that text in a fresh module (one per distinct text), so a snapshot keeps working after
the code in the repository changes, and EDM2's own pickles load here.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

FORMAT_VERSION = 6
_persistent_classes = set()     # Every class made by persistent_class().
_hooks = []                     # hook(meta) -> meta, applied before reconstruction.
_source_of_module = {}          # module -> its text
_module_of_source = {}          # text -> the module made from it

def persistent_class(cls):
    """Class decorator: instances keep their constructor arguments (init_args, init_kwargs) and pickle
    together with the source of their module."""
    assert isinstance(cls, type)
    if cls in _persistent_classes:
        return cls
    module = sys.modules[cls.__module__]
    source = _source(module)

    class Persistent(cls):
        _persistent_source = source                 # Read through the instance: the most derived class wins.
        _persistent_name = cls.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # EDM2's attribute names: its pickles restore them, and the outermost class writes them last.
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)
            _assert_pickleable(self.__reduce__())

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            if fields[0] is _reconstruct_persistent_obj:         # A persistent base class has done it.
                return tuple(fields)
            fields += [None] * (3 - len(fields))
            meta = dict(type='class', version=FORMAT_VERSION, module_src=self._persistent_source,
                class_name=self._persistent_name, state=fields[2])
            return (_reconstruct_persistent_obj, (meta,), None, *fields[3:])

    for attr in ('__name__', '__qualname__', '__module__'):
        setattr(Persistent, attr, getattr(cls, attr))
    _persistent_classes.add(Persistent)
    return Persistent

def is_persistent(obj):
    """True for a persistent class or an instance of one."""
    return type(obj) in _persistent_classes or (isinstance(obj, type) and obj in _persistent_classes)

def import_hook(hook):
    """Register hook(meta) -> meta, applied to every persistent object being unpickled (e.g. to patch old source)."""
    assert callable(hook)
    _hooks.append(hook)

def _reconstruct_persistent_obj(meta):
    """The function every persistent pickle calls on loading."""
    meta = dnnlib.EasyDict(meta, state=dnnlib.EasyDict(meta['state']))
    for hook in _hooks:
        meta = hook(meta)
        assert meta is not None, 'an import hook must return the meta it was given'
    if meta.version != FORMAT_VERSION:
        raise pickle.UnpicklingError(f'persistent object of format version {meta.version}; this code reads version {FORMAT_VERSION}')
    if meta.type != 'class':
        raise pickle.UnpicklingError(f'unknown persistent object type "{meta.type}"')
    cls = persistent_class(_module_from_source(meta.module_src).__dict__[meta.class_name])
    instance = cls.__new__(cls)
    if callable(getattr(instance, '__setstate__', None)):
        instance.__setstate__(meta.state)
    else:
        instance.__dict__.update(meta.state)
    return instance

def _source(module):
    if module not in _source_of_module:
        text = inspect.getsource(module)
        _source_of_module[module] = text
        _module_of_source[text] = module
    return _source_of_module[module]

def _module_from_source(text):
    """The module built from `text`, executed once per distinct text under a unique name."""
    if text not in _module_of_source:
        module = types.ModuleType(f'_imported_module_{uuid.uuid4().hex}')
        sys.modules[module.__name__] = module
        _source_of_module[module] = text
        _module_of_source[text] = module
        exec(text, module.__dict__)
    return _module_of_source[text]

_PLAIN = (str, int, float, bool, bytes, bytearray, type(None))

def _assert_pickleable(reduced):
    """Fail at construction, not at the first snapshot, when an instance could not be pickled.
    Tensors, arrays, plain values and other persistent objects are known to pickle and are left out."""
    def leftovers(value):
        if isinstance(value, (list, tuple, set)):
            return [leftovers(item) for item in value]
        if isinstance(value, dict):
            return [[leftovers(key), leftovers(item)] for key, item in value.items()]
        if isinstance(value, _PLAIN) or is_persistent(value):
            return None
        if type(value).__module__ in ('numpy', 'torch', 'torch.nn.parameter') and type(value).__name__ in ('ndarray', 'Tensor', 'Parameter'):
            return None
        return value
    pickle.dump(leftovers(reduced), io.BytesIO())
