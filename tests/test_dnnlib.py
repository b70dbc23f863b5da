import http.server
import os
import threading

import pytest

import dnnlib
from dnnlib import util

def test_easydict_and_construct_by_name():
    cfg = dnnlib.EasyDict(class_name='collections.OrderedDict', a=1)
    cfg.b = 2
    obj = util.construct_class_by_name(**cfg)
    assert dict(obj) == dict(a=1, b=2)
    with pytest.raises(AttributeError):
        cfg.missing

def test_parsers():
    assert util.parse_int_list('0-3,7,10-12') == [0, 1, 2, 3, 7, 10, 11, 12]
    assert util.parse_nimg('64Mi') == 64 << 20 and util.parse_nimg('4Ki') == 4096 and util.parse_nimg('1000') == 1000
    with pytest.raises(util.UserError):
        util.parse_nimg('lots')
    with pytest.raises(util.UserError):
        util.parse_int_list('1-')
    with pytest.raises(util.UserError, match='"3-1" in "0,3-1" is an empty range'):
        util.parse_int_list('0,3-1')                # Was [0]: --seeds=63-0 generated nothing and said "Done."

def test_output_folders_are_made_or_refused_by_option(tmp_path):
    util.make_output_folder(str(tmp_path / 'a' / 'b'), '--outdir=a/b')
    assert (tmp_path / 'a' / 'b').is_dir()
    util.make_output_folder('', '--grid=grid.png')                 # The current folder: nothing to make.
    (tmp_path / 'file').write_text('x')
    with pytest.raises(util.UserError, match='^--outdir=file: .*file is a file, not a folder'):
        util.make_output_folder(str(tmp_path / 'file'), '--outdir=file')
    with pytest.raises(util.UserError, match=r'^--dest=file/x/r.pkl: .*file is a file, not a folder'):
        util.check_output_folder(str(tmp_path / 'file' / 'x'), '--dest=file/x/r.pkl')
    util.check_output_folder(str(tmp_path / 'new' / 'deeper'), '--outdir=new/deeper')
    assert not (tmp_path / 'new').exists()                          # Checked, not made: a refused run leaves nothing.

def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv('NCVSD_CACHE_DIR', str(tmp_path))
    assert dnnlib.make_cache_dir_path('downloads') == os.path.join(str(tmp_path), 'downloads')

def test_open_url_local_and_file_url(tmp_path):
    path = tmp_path / 'a.bin'
    path.write_bytes(b'hello')
    with util.open_url(str(path)) as f:
        assert f.read() == b'hello'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'hello'
    with pytest.raises(util.UserError, match='not found'):
        util.open_url(str(tmp_path / 'missing.pkl'))
    for folder in (str(tmp_path), tmp_path.as_uri()):      # Was "file not found" for a folder that is there.
        with pytest.raises(util.UserError, match='is a folder; give the file inside it$'):
            util.open_url(folder)
    run = tmp_path / 'run'                                  # A run folder: its last snapshot is the example.
    run.mkdir()
    names = ('student-init.pkl', 'log.txt', 'network-snapshot-0000008-0.050.pkl', 'network-snapshot-0000016-0.100.pkl', 'training-state-0000016.pt')
    for age, name in enumerate(names):                      # In the order a run writes them.
        (run / name).write_bytes(b'')
        os.utime(run / name, (1e9 + age, 1e9 + age))
    with pytest.raises(util.UserError, match=f'is a folder; give the file inside it, e.g. {run}/network-snapshot-0000016-0.100.pkl'):
        util.open_url(str(run))

def test_open_url_http_is_cached(tmp_path):
    served = tmp_path / 'served'
    served.mkdir()
    (served / 'model.pkl').write_bytes(b'weights')
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(served))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/model.pkl'
    try:
        with util.open_url(url, cache_dir=str(tmp_path / 'cache'), verbose=False) as f:
            assert f.read() == b'weights'
    finally:
        server.shutdown()
        server.server_close()
    # The server is gone: the second read must come from the cache.
    with util.open_url(url, cache_dir=str(tmp_path / 'cache'), verbose=False) as f:
        assert f.read() == b'weights'
    with pytest.raises(util.UserError, match='offline'):
        util.open_url(url.replace('model.pkl', 'other.pkl'), cache_dir=str(tmp_path / 'cache'), verbose=False, num_attempts=1)

def test_a_failed_atomic_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """A full disk was torch.save's or pickle's traceback, and a snapshot's .pkl.tmp stayed behind."""
    import errno
    import torch
    from torch_utils.distributed import atomic_save
    path = tmp_path / 'training-state-0000004.pt'
    atomic_save(dict(state=dict(cur_nimg=4096)), str(path))
    def disk_full(obj, f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(util.UserError, match=r'cannot write .*0000004.pt \(OSError: \[Errno 28\] No space left on device\); make room'):
        atomic_save(dict(state=dict(cur_nimg=8192)), str(path))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]             # No temporary file left.
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)['state']['cur_nimg'] == 4096
