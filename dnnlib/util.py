"""Generic helpers: attribute dicts, object construction by name, cached URL access."""

import contextlib
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import urllib.parse

class EasyDict(dict):
    """A dict whose items can also be read and written as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]

class UserError(Exception):
    """A problem with the user's input: the CLIs print its one-line message, not a traceback."""

class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def isatty(self):
        return False

class Logger:
    """Copies everything written to stdout and stderr into a file (EDM2's log.txt) until close()."""

    def __init__(self, file_name, file_mode='a'):
        self.file = open(file_name, file_mode)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(self.stdout, self.file), _Tee(self.stderr, self.file)

    def close(self):
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.file.close()

def error_summary(err):
    """'Type: first sentence' of an exception from a library, for a UserError's parenthesis."""
    lines = str(err).splitlines() or ['']
    return f'{type(err).__name__}: {lines[0].split(". ")[0]}'

def run_cli(fn, *args, **kwargs):
    """Run library code for a CLI: a UserError becomes a one-line message and exit status 1."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        print(f'Error: {user_message(err)}', file=sys.stderr, flush=True)
        sys.exit(1)

def user_message(err):
    """A UserError's one-line message. Raised in a DataLoader worker (a corrupt image), it comes back from torch with
    the worker's traceback as its text, which ends with the message."""
    text = str(err)
    if text.startswith('Caught UserError in DataLoader worker'):
        text = text.strip().splitlines()[-1].split('UserError: ', 1)[-1]
    return text

#----------------------------------------------------------------------------
# Output folders and files.

@contextlib.contextmanager
def atomic_file(path, mode='wb'):
    """A file opened under a temporary name beside `path`, renamed to `path` when the block ends: a crash never leaves
    a torn file. A failed write (a full disk) removes the temporary file, leaves what `path` held as it was, and is a
    UserError naming `path`."""
    temp = f'{path}.tmp{os.getpid()}'
    try:
        with open(temp, mode) as f:
            yield f
        os.replace(temp, path)
    except OSError as err:
        raise UserError(f'cannot write {path} ({error_summary(err)}); make room there or choose another folder, '
            'then run the command again (what was there is intact)') from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)

def check_output_folder(folder, option):
    """Refuse, as a UserError naming the command-line option ('--outdir=runs/x'), an output folder that could not be
    made or written: a file in the way, or no permission. Called before any work, so that nothing is lost to it; it
    makes nothing, so that a run refused for another reason leaves no empty folder."""
    existing = os.path.abspath(folder or '.')
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'{option}: {existing} is a file, not a folder; choose another path')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{option}: the folder {existing} is not writable; choose another path')

def make_output_folder(folder, option):
    """os.makedirs(folder, exist_ok=True), refused as check_output_folder() refuses."""
    check_output_folder(folder, option)
    try:
        os.makedirs(folder or '.', exist_ok=True)
    except OSError as err:
        raise UserError(f'{option}: cannot make the folder {folder} ({err.strerror}); choose another path')

#----------------------------------------------------------------------------
# Cache directory.

def make_cache_dir_path(*paths):
    """Path inside the download cache: $NCVSD_CACHE_DIR, else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    for var in ('NCVSD_CACHE_DIR', 'DNNLIB_CACHE_DIR'):
        if var in os.environ:
            return os.path.join(os.environ[var], *paths)
    home = os.environ.get('HOME') or os.environ.get('USERPROFILE') or tempfile.gettempdir()
    return os.path.join(home, '.cache', 'dnnlib', *paths)

#----------------------------------------------------------------------------
# Construction by name, so that configurations can be plain data.

def get_obj_by_name(name):
    """Find a module attribute from its full dotted name, e.g. 'training.loss.NCVSDLoss'."""
    parts = name.split('.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue
            raise
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    return globals()[name] if name in globals() else importlib.import_module(name)

def call_func_by_name(*args, func_name=None, **kwargs):
    assert func_name is not None
    return get_obj_by_name(func_name)(*args, **kwargs)

def construct_class_by_name(*args, class_name=None, **kwargs):
    """Build an object from a config dict: construct_class_by_name(**dict(class_name=..., ...))."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)

#----------------------------------------------------------------------------
# Formatting and parsing.

def format_time(seconds):
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {(s // 60) % 60:02d}m'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h'

def parse_int_list(text):
    """'0-3,7,10-12' -> [0, 1, 2, 3, 7, 10, 11, 12]."""
    if isinstance(text, list):
        return text
    result = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m and int(m.group(2)) < int(m.group(1)):
            raise UserError(f'"{part}" in "{text}" is an empty range: write the smaller number first, e.g. {m.group(2)}-{m.group(1)}')
        if m:
            result += list(range(int(m.group(1)), int(m.group(2)) + 1))
        elif re.fullmatch(r'\d+', part):
            result.append(int(part))
        else:
            raise UserError(f'cannot parse "{text}" as a list of integers: write e.g. 0-3,7,10-12')
    return result

def parse_nimg(text):
    """Image counts with EDM2's binary suffixes: '64Mi' -> 67108864, '4Ki' -> 4096, '1000' -> 1000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|K|M|G)?\s*', str(text))
    if not m:
        raise UserError(f'cannot parse "{text}" as an image count: write e.g. 4096, 64Ki, 8Mi or 1Gi')
    scale = {None: 1, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'Ki': 2**10, 'Mi': 2**20, 'Gi': 2**30}[m.group(2)]
    return int(round(float(m.group(1)) * scale))

def nimg_stamp(nimg, fine=False):
    """The <kimg> of file names: EDM2's whole kimg (7 digits), or with three decimals so that every image count differs."""
    return f'{nimg / 1000:011.3f}' if fine else f'{nimg // 1000:07d}'

STAMP_PATTERN = r'\d+(?:\.\d{3})?'       # A nimg_stamp() in a file name.

#----------------------------------------------------------------------------
# URL access with a download cache.

def is_url(path_or_url):
    return isinstance(path_or_url, str) and re.match(r'^[a-z][a-z0-9+.-]*://', path_or_url) is not None

def _url_to_local_path(url):
    parsed = urllib.parse.urlparse(url)
    path = urllib.parse.unquote(parsed.path)
    if os.name == 'nt' and re.match(r'^/[a-zA-Z]:', path):
        path = path[1:]
    return path

def check_is_file(path, given):
    """`path` (the user wrote `given`) must be a file: a folder gets its own message, not "not found"."""
    if os.path.isdir(path):
        networks = [name for name in os.listdir(path) if name.endswith(('.pkl', '.pt', '.npz'))]
        newest = lambda name: (name.endswith('.pkl'), os.path.getmtime(os.path.join(path, name)))     # A run's last snapshot.
        example = f', e.g. {os.path.join(given, max(networks, key=newest))}' if networks else ''
        raise UserError(f'{given} is a folder; give the file inside it{example}')
    if not os.path.isfile(path):
        raise UserError(f'file not found: {given}')

def open_url(url, cache_dir=None, num_attempts=3, verbose=True, return_filename=False, cache=True):
    """Open a local path, a file:// URL or an http(s) URL (downloaded once into the cache).

    Returns a binary file object (or its local filename with return_filename=True).
    """
    if not is_url(url):
        check_is_file(url, url)
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _url_to_local_path(url)
        check_is_file(path, url)
        return path if return_filename else open(path, 'rb')
    assert num_attempts >= 1
    assert not (return_filename and not cache)

    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        cached = [f for f in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else []) if f.startswith(url_md5 + '_')]
        if len(cached) == 1:
            path = os.path.join(cache_dir, cached[0])
            return path if return_filename else open(path, 'rb')

    data = _download(url, num_attempts=num_attempts, verbose=verbose)
    if cache:
        name = re.sub(r'[^0-9a-zA-Z-._]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'file'
        path = os.path.join(cache_dir, f'{url_md5}_{name}')
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_file(path) as f:
            f.write(data)
        if return_filename:
            return path
    return io.BytesIO(data)

def _download(url, num_attempts, verbose):
    import requests
    last_error = None
    if verbose:
        print(f'Downloading {url} ...', flush=True)
    for _attempt in range(num_attempts):
        try:
            with requests.Session() as session:
                res = session.get(url, timeout=60)
                res.raise_for_status()
                return res.content
        except requests.HTTPError as err:
            raise UserError(f'cannot download {url}: HTTP {err.response.status_code}; check the URL, or download it by hand and pass the local path')
        except (requests.ConnectionError, requests.Timeout, OSError) as err:
            last_error = err
    raise UserError(f'cannot reach {url} ({type(last_error).__name__}): are you offline? '
        f'Download it elsewhere and pass the local path, or copy it into {make_cache_dir_path("downloads")}')
