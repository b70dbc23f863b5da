import json

import numpy as np
import PIL.Image
import pytest

from conftest import run_python
from training.dataset import ImageFolderDataset
from training.dataset_io import convert_dataset
from dnnlib.util import UserError

def make_images(folder, sizes, labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f'im{i}.png')
    if labels is not None:
        (folder / 'dataset.json').write_text(json.dumps({'labels': [[f'im{i}.png', l] for i, l in enumerate(labels)]}))
    return folder

@pytest.mark.parametrize('transform', [None, 'center-crop', 'center-crop-wide', 'center-crop-dhariwal'])
def test_convert_round_trip(tmp_path, transform):
    src = make_images(tmp_path / 'src', [(48, 32)] * 3 + [(40, 40)] * 2, labels=[0, 2, 1, 2, 0])
    dest = tmp_path / 'out.zip'
    convert_dataset(str(src), str(dest), transform=transform, resolution='16x16')
    dataset = ImageFolderDataset(str(dest), xflip=True)
    assert len(dataset) == 10 and dataset.image_shape == [3, 16, 16] and dataset.label_dim == 3
    image, label = dataset[1]
    assert image.dtype == np.uint8 and image.shape == (3, 16, 16)
    assert label.tolist() == [0, 0, 1]
    assert np.array_equal(dataset[6][0], image[:, :, ::-1])

def test_convert_keeps_pixels_and_max_images(tmp_path):
    src = make_images(tmp_path / 'src', [(8, 8)] * 4)
    convert_dataset(str(src), str(tmp_path / 'folder') + '/', max_images=3)       # The slash put the temporary folder inside.
    dataset = ImageFolderDataset(str(tmp_path / 'folder'), max_size=2)
    assert len(dataset) == 2 and not dataset.has_labels
    original = np.array(PIL.Image.open(src / 'im0.png')).transpose(2, 0, 1)
    assert np.array_equal(ImageFolderDataset(str(tmp_path / 'folder'))[0][0], original)

def test_partly_labelled_source_is_written_without_labels_and_says_so(tmp_path, capsys):
    """EDM2's behaviour, kept: labels for some images only are dropped; that was silent."""
    src = make_images(tmp_path / 'src', [(8, 8)] * 3, labels=[0, 1, 1])
    labels = json.loads((src / 'dataset.json').read_text())
    (src / 'dataset.json').write_text(json.dumps({'labels': labels['labels'][:2]}))
    convert_dataset(str(src), str(tmp_path / 'out.zip'))
    assert 'Note: 1 of 3 images have no label' in capsys.readouterr().out
    assert not ImageFolderDataset(str(tmp_path / 'out.zip')).has_labels

@pytest.mark.parametrize('mode, expected', [
    ('P', [200, 30, 30]),               # np.array of a palette image holds its indices: it was written as index 0, grey.
    ('CMYK', [200, 30, 30]),            # Its inks: the C, M and Y of the red were written as its R, G and B.
    ('RGBA', [200, 30, 30]),
    ('LA', [77]),                       # Two channels were written.
    ('I;16', [77]),                     # 16 bits were written as a float array (.npy), as if latents.
])
@pytest.mark.parametrize('transform', [None, 'center-crop', 'center-crop-dhariwal'])   # Greyscale ones were a TypeError.
def test_every_image_mode_is_converted_to_its_colours(tmp_path, mode, expected, transform):
    src = tmp_path / 'src'
    src.mkdir()
    red = PIL.Image.new('RGB', (24, 24), (200, 30, 30))
    image = {'P': lambda: red.convert('P', palette=PIL.Image.ADAPTIVE, colors=4), 'CMYK': lambda: red.convert('CMYK'),
        'RGBA': lambda: red.convert('RGBA'), 'LA': lambda: PIL.Image.new('LA', (24, 24), (77, 128)),
        'I;16': lambda: PIL.Image.new('I;16', (24, 24), 77 * 257)}[mode]()
    if mode == 'CMYK':
        image.save(src / 'im.jpg', quality=100)                         # PNG holds no CMYK.
    else:
        image.save(src / 'im.png')
    convert_dataset(str(src), str(tmp_path / 'out.zip'), transform=transform, resolution='8x8' if transform else None)
    pixels, _label = ImageFolderDataset(str(tmp_path / 'out.zip'))[0]
    assert pixels.dtype == np.uint8 and pixels.shape == (len(expected), 8 if transform else 24, 8 if transform else 24)
    error = np.abs(pixels.reshape(len(expected), -1).T.astype(int) - expected).max()
    assert error <= (3 if mode == 'CMYK' else 0), (pixels.reshape(len(expected), -1).T[0], expected)    # JPEG rounds.
    unconverted, _label = ImageFolderDataset(str(src))[0]               # Training reads a folder of images alike.
    assert np.abs(unconverted.reshape(len(expected), -1).T.astype(int) - expected).max() <= (3 if mode == 'CMYK' else 0)

def test_dataset_resolution_check(tmp_path):
    src = make_images(tmp_path / 'src', [(8, 8)] * 2)
    with pytest.raises(UserError, match='8x8 images but 16x16'):
        ImageFolderDataset(str(src), resolution=16)

@pytest.mark.parametrize('case, message', [
    ('empty', 'holds no images'),
    ('corrupt', 'cannot decode'),
    ('corrupt_into_a_folder', 'not an image format PIL reads'),    # Left a half-written folder that blocked a rerun.
    ('mixed', 'pass --resolution'),
    ('dest', 'not empty'),
    ('transform', 'is not one of'),
    ('missing', 'does not exist'),
    ('dest_under_a_file', 'file is a file, not a folder'),
    ('resolution', '--resolution="abc" is not of the form WxH'),       # Was a traceback: parsed as click's type.
    ('zero_resolution', '--resolution="0x8" is not of the form WxH'),
])
def test_bad_inputs_give_one_line_errors(tmp_path, case, message):
    src = make_images(tmp_path / 'src', [(8, 8), (8, 8)])
    args = ['dataset_tool.py', 'convert', f'--source={src}', f'--dest={tmp_path / "out.zip"}']
    if case == 'empty':
        (tmp_path / 'empty').mkdir()
        args[2] = f'--source={tmp_path / "empty"}'
    elif case in ('corrupt', 'corrupt_into_a_folder'):
        (src / 'im1.png').write_bytes(b'not a png')
        if case == 'corrupt_into_a_folder':
            args[3] = f'--dest={tmp_path / "out"}'
    elif case == 'mixed':
        make_images(tmp_path / 'src2', [(8, 8), (9, 8)])
        args[2] = f'--source={tmp_path / "src2"}'
    elif case == 'dest':
        (tmp_path / 'full').mkdir()
        (tmp_path / 'full' / 'x').write_text('x')
        args[3] = f'--dest={tmp_path / "full"}'
    elif case == 'transform':
        args.append('--transform=stretch')
    elif case == 'missing':
        args[2] = f'--source={tmp_path / "nowhere"}'
    elif case in ('resolution', 'zero_resolution'):
        args.append('--resolution=abc' if case == 'resolution' else '--resolution=0x8')
    elif case == 'dest_under_a_file':
        (tmp_path / 'file').write_text('x')
        args[3] = f'--dest={tmp_path / "file" / "out.zip"}'
    result = run_python(args)
    assert result.returncode != 0
    assert message in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'out.zip').exists()
    assert not list(tmp_path.glob('out*'))          # Nor a folder, nor a temporary file or folder.

def test_images_of_a_networks_first_classes_take_its_label_dim(tmp_path):
    """Images of classes 0 and 1 only (a subset, or `python -m training.toy images --num=2`) had 2-class labels, refused by
    a 4-class teacher in training and by posterior_sample.py; the network's classes now set the one-hot width."""
    import dnnlib
    from helpers import make_dataset, make_teacher
    from training.network_io import load_network_data
    from training.train_setup import make_data, check_data_matches
    data = make_dataset(tmp_path / 'src', tmp_path / 'data.zip', num=2)                # Labels 0 and 1.
    assert ImageFolderDataset(str(data)).label_dim == 2
    teacher = load_network_data(str(make_teacher(tmp_path / 'teacher.pkl', label_dim=4)), verbose=False)['ema']
    dataset, encoder, _kwargs = make_data(dnnlib.EasyDict(data=str(data), cond=True, vae=None, seed=0), teacher, None)
    check_data_matches(dataset, encoder, teacher, cond=True)
    assert dataset.label_dim == 4 and dataset[1][1].tolist() == [0, 1, 0, 0]
    with pytest.raises(UserError, match='has labels up to 1 but the network has 1 classes'):
        ImageFolderDataset(str(data), label_dim=1)
