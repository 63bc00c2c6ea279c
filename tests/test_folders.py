"""Image folders (util/folders.py) and the class names a run records from them: hidden entries are no class and no
image, images are read as what they are (16-bit, EXIF-turned, RGBA, a palette, CMYK; float pixels refused), and a
resume, an ensemble or an evaluation on other class names is refused in one line, while a name that differs only in
its Unicode form is the same class. The layout: a split's classes are the training split's numbers, a folder that is no
class, an image that does not decode, a link (read as a copy; a loop refused) and a pipe are each one line."""
import io
import os
import re
import shutil
import unicodedata

import numpy as np
from PIL import Image
import pytest
import torch

from conftest import digest, random_vit, run_in_process
from data import build_dataset, build_splits
import ensemble
import evaluate
import finetune
from finetune import PRESETS, FinetuneConfig
from util.datafiles import DataError
from util.folders import read_image


def save_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


def image_folder(root, classes=('cat', 'dog', 'fox'), per_class=4, splits=('train', 'val')):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            for i in range(per_class):
                save_png(root / split / c / f'{i}.png', rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


def folder_cfg(root, **kw):
    """The fake preset's fine-tuning config, reading the folder `root` at 32 px in this process."""
    return FinetuneConfig(**{**PRESETS['fake'], 'num_workers': 0, 'data': 'folder', 'data_dir': str(root),
                             'img_size': 32, **kw})


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    root = image_folder(tmp_path)
    save_png(root / 'train' / '.ipynb_checkpoints' / 'x.png', np.zeros((32, 32, 3), np.uint8))   # Jupyter's
    save_png(root / 'train' / 'cat' / '.ipynb_checkpoints' / '0-checkpoint.png', np.zeros((32, 32, 3), np.uint8))
    (root / 'train' / 'dog' / '._0.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')             # macOS's
    (root / 'train' / 'notes.txt').write_text('not a class')
    train, n = build_dataset(folder_cfg(root), train=True)
    assert n == 3 and train.classes == ['cat', 'dog', 'fox'] and len(train) == 12   # it was 4 classes
    assert all(os.sep + '.' not in path for path, _ in train.samples)


def encoded(image, fmt, **save):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def test_images_are_read_as_what_they_are(tmp_path):
    rng = np.random.default_rng(0)
    # 16-bit greyscale: PIL's conversion clipped every value above 255 to white; its high byte is the image
    grey16 = (rng.integers(0, 65536, (8, 8))).astype(np.uint16)
    (tmp_path / 'g16.png').write_bytes(encoded(Image.fromarray(grey16), 'PNG'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'g16.png')))[..., 0], grey16 >> 8)
    # EXIF orientation 6 (the camera turned a quarter clockwise): shown upright, as PIL's exif_transpose shows it
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / 'turned.png').write_bytes(encoded(Image.fromarray(rgb), 'PNG', exif=exif))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'turned.png'))), np.rot90(rgb, -1))
    # RGBA: the colour kept, the transparency dropped (PIL's convert('RGB') and torchvision's decode_image)
    rgba = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    (tmp_path / 'a.png').write_bytes(encoded(Image.fromarray(rgba, 'RGBA'), 'PNG'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'a.png'))), rgba[..., :3])
    # a palette: its colours; CMYK: PIL's conversion
    palette = Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE, colors=8)
    (tmp_path / 'p.png').write_bytes(encoded(palette, 'PNG'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'p.png'))), np.asarray(palette.convert('RGB')))
    cmyk = Image.fromarray(rgb).convert('CMYK')
    (tmp_path / 'c.tif').write_bytes(encoded(cmyk, 'TIFF'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'c.tif'))), np.asarray(cmyk.convert('RGB')))
    # float pixels have no agreed range: refused, naming the file
    (tmp_path / 'f.tif').write_bytes(encoded(Image.fromarray(rng.random((4, 4)).astype(np.float32), 'F'), 'TIFF'))
    with pytest.raises(DataError, match=r'f\.tif has 32-bit pixels \(mode F\).*8 or 16 bits'):
        read_image(str(tmp_path / 'f.tif'))


FOLDER_RUN = ['--data', 'folder', '--img-size', '32', '--patch-size', '8', '--depth', '1', '--batch-size', '4',
              '--num-workers', '0', '--amp', 'off']


def test_a_resume_on_other_class_names_is_refused(tmp_path, monkeypatch):
    a, b = image_folder(tmp_path / 'a'), image_folder(tmp_path / 'b', classes=('cat', 'dog', 'owl'))
    out = tmp_path / 'run'
    assert run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', a, '--out-dir', out,
                          '--max-steps', '1') is None
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['classes'] == ['cat', 'dog', 'fox']
    before = digest(out)
    msg = run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', b, '--out-dir', out, '--resume', 'true')
    assert msg and ("other classes than the data here has (other class names (its class 2 is 'fox', the data's 'owl'; "
                    '3 classes, the data has 3))') in msg, msg
    assert digest(out) == before
    msg = run_in_process(monkeypatch, ensemble, *FOLDER_RUN[:4], '--data-dir', b, '--models', out / 'checkpoint.pt',
                         '--num-workers', '0')
    assert msg and "predicts other class names (its class 2 is 'fox', the data's 'owl';" in msg, msg
    assert run_in_process(monkeypatch, ensemble, '--models', out / 'checkpoint.pt', '--num-workers', '0') is None


def test_class_names_that_differ_only_in_their_unicode_form_are_the_same_classes(tmp_path, monkeypatch):
    """A class folder named café by a Mac (decomposed, NFD) is the café of a run trained on Linux (composed, NFC): a
    resume and an ensemble on it were refused as "other class names (3; the data has 3)"."""
    nfc, nfd = (unicodedata.normalize(form, 'café') for form in ('NFC', 'NFD'))
    a = image_folder(tmp_path / 'a', classes=('cat', nfc, 'dog'))
    b = shutil.copytree(a, tmp_path / 'b')   # the same images, their times kept: the same data
    for split in ('train', 'val'):
        os.rename(b / split / nfc, b / split / nfd)
    out = tmp_path / 'run'
    assert run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', a, '--out-dir', out,
                          '--max-steps', '1') is None
    assert run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', b, '--out-dir', out, '--resume', 'true',
                          '--max-steps', '2') is None
    assert run_in_process(monkeypatch, ensemble, *FOLDER_RUN[:4], '--data-dir', b, '--models', out / 'checkpoint.pt',
                          '--num-workers', '0') is None


def test_evaluate_refuses_models_of_other_classes(tmp_path, monkeypatch):
    model = random_vit(num_classes=1000)
    torch.save({'model': model.state_dict(), 'arch': model.arch, 'classes': [f'c{i}' for i in range(1000)]},
               tmp_path / 'other.pt')
    msg = run_in_process(monkeypatch, evaluate, '--models', tmp_path / 'other.pt', '--imagenet', tmp_path,
                         '--out', tmp_path / 'res')
    assert msg and "predicts other class names (its class 0 is 'c0', the data's 'n01440764'; 1000 classes, the " \
        'data has 1000)' in msg, msg


def test_splits_name_their_classes(tmp_path):
    from util.config import TrainConfig
    splits = build_splits(TrainConfig(data='fake', fake_size=64, img_size=32))
    assert splits.classes == [str(i) for i in range(10)] and splits.num_classes == 10


def test_image_folder_and_missing_split(tmp_path):
    for split in ('train', 'val'):
        for c in ('cat', 'dog', 'grey'):
            os.makedirs(tmp_path / split / c)
            mode = 'L' if c == 'grey' else 'RGB'
            for i in range(2):
                Image.new(mode, (40 + 7 * i, 30), color=60 * i).save(tmp_path / split / c / f'{i}.png')
    cfg = folder_cfg(tmp_path)
    train, n = build_dataset(cfg, train=True)
    val, _ = build_dataset(cfg, train=False)
    assert n == 3 and len(train) == 6
    assert all(train[i][0].shape == (3, 32, 32) and val[i][0].shape == (3, 32, 32) for i in range(6))
    with pytest.raises(DataError, match='expects --data-dir with train/<class>'):
        build_dataset(folder_cfg(tmp_path / 'nowhere', data='imagenet'), train=True)


COLOURS = {'a': (255, 0, 0), 'b': (0, 255, 0), 'c': (0, 0, 255), 'd': (255, 255, 0)}


def colour_folders(root, splits):
    """root/<split>/<class>/<k>.png: 3 images a class, each of the class's colour (separable by their mean)."""
    for split, classes in splits.items():
        for c in classes:
            os.makedirs(root / split / c)
            for k in range(3):
                Image.new('RGB', (36 + k, 36), color=COLOURS[c]).save(root / split / c / f'{k}.png')


def nearest_mean_top1(train, val):
    """Top-1 (%) on val of the classifier that picks the training class whose mean image is nearest: every
    image is its class's colour, so it is 100 when val's labels are the training split's numbers."""
    xs, ys = zip(*(train[i] for i in range(len(train))))
    x, y = torch.stack(xs).mean((2, 3)), torch.tensor(ys)                        # (N, 3), (N,)
    means = torch.stack([x[y == k].mean(0) for k in range(int(y.max()) + 1)])    # (C, 3)
    vx, vy = zip(*(val[i] for i in range(len(val))))
    pred = torch.cdist(torch.stack(vx).mean((2, 3)), means).argmin(1)            # (M,)
    return 100 * (pred == torch.tensor(vy)).float().mean().item()


def test_val_classes_take_the_training_splits_numbers(tmp_path):
    """val/ without class b: c is still class 2, not 1 (read on its own, val/ numbered c as b: 50%)."""
    colour_folders(tmp_path, {'train': 'abc', 'val': 'ac'})
    cfg = folder_cfg(tmp_path)
    (train, n), (val, n_val) = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    assert nearest_mean_top1(train, val) == 100.0                                 # not 50: c scored as b
    assert n == n_val == 3 and sorted(set(val.targets)) == [0, 2]
    complete = tmp_path / 'complete'
    colour_folders(complete, {'train': 'abc', 'val': 'abc'})
    cfg = folder_cfg(complete)
    assert nearest_mean_top1(build_dataset(cfg, train=True)[0], build_dataset(cfg, train=False)[0]) == 100.0


@pytest.mark.parametrize('splits, empty, match', [
    ({'train': 'abc', 'val': 'abcd'}, None, r'val has folders d: not classes of .*train.*add them there'),
    ({'train': 'ab', 'val': 'ab'}, 'train/c', r'train: no image file .* class folder\(s\) c: add their images'),
    ({'train': 'abc', 'val': 'ab'}, 'val/c', r'val: no image file .* folder\(s\) c'),
    ({'train': '', 'val': 'ab'}, None, r'train has no folders \(one per class\)'),
])
def test_folder_that_is_no_class_is_refused_before_training(tmp_path, monkeypatch, splits, empty, match):
    """An extra val class, an empty class folder, no classes: one line, before the first step (an extra val
    class used to fail after a whole epoch, at the first evaluation)."""
    colour_folders(tmp_path, splits)
    os.makedirs(tmp_path / 'train', exist_ok=True)
    if empty:
        os.makedirs(tmp_path / empty)
        (tmp_path / empty / 'notes.txt').write_text('no image')
    cfg = folder_cfg(tmp_path)
    with pytest.raises(DataError, match=match):
        build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    msg = run_in_process(monkeypatch, finetune, '--data', 'folder', '--data-dir', tmp_path, '--img-size', '32',
                         '--patch-size', '8', '--embed-dim', '32', '--depth', '1', '--num-heads', '2',
                         '--batch-size', '2', '--num-workers', '0', '--out-dir', tmp_path / 'run')
    assert msg and re.search(match, msg), msg
    assert not (tmp_path / 'run' / 'metrics.jsonl').exists() and not (tmp_path / 'run' / 'checkpoint.pt').exists()


@pytest.mark.parametrize('workers', [0, 1])
def test_corrupt_image_is_named_in_one_line(tmp_path, monkeypatch, workers):
    """A file that does not decode stops training with its name, also when a loader worker read it."""
    for split in ('train', 'val'):
        for c in ('cat', 'dog'):
            os.makedirs(tmp_path / split / c)
            for i in range(4):
                Image.new('RGB', (32, 32), color=(60 * i, 0, 0)).save(tmp_path / split / c / f'{i}.jpg')
    broken = tmp_path / 'train' / 'dog' / '3.jpg'
    broken.write_bytes(broken.read_bytes()[:200])            # a truncated JPEG: its header reads, its data not
    msg = run_in_process(monkeypatch, finetune, '--data', 'folder', '--data-dir', tmp_path, '--img-size', '32',
                         '--patch-size', '8', '--embed-dim', '32', '--depth', '1', '--num-heads', '2',
                         '--batch-size', '4', '--num-workers', workers, '--out-dir', tmp_path / 'run')
    assert msg and msg.startswith('error: cannot read image') and str(broken) in msg, msg


def test_linked_folders_read_as_copies_and_loops_are_refused(tmp_path):
    """A data root, class folders and images that are links read exactly as copies; a link loop (a/loop -> .)
    read class a's images 41 times, a link to the split (zloop -> ../train) made a class of every image, a
    file linked twice was read twice: each refused in one line naming the link."""
    colour_folders(tmp_path / 'store', {'train': 'abc', 'val': 'abc'})
    copy, linked = tmp_path / 'copy', tmp_path / 'linked'
    shutil.copytree(tmp_path / 'store', copy)
    os.makedirs(linked / 'real' / 'train' / 'c')
    os.symlink(tmp_path / 'store' / 'train' / 'a', linked / 'real' / 'train' / 'a')   # a class folder
    shutil.copytree(tmp_path / 'store' / 'train' / 'b', linked / 'real' / 'train' / 'b')
    for k in range(3):                                                                  # image files
        os.symlink(tmp_path / 'store' / 'train' / 'c' / f'{k}.png', linked / 'real' / 'train' / 'c' / f'{k}.png')
    os.symlink(tmp_path / 'store' / 'val', linked / 'real' / 'val')
    os.symlink(linked / 'real', linked / 'root')                                        # the data root

    def samples(root, train=True):
        ds, _ = build_dataset(folder_cfg(root), train=train)
        return [(os.path.relpath(p, ds.root), y) for p, y in ds.samples]
    assert samples(linked / 'root') == samples(copy) and len(samples(copy)) == 9
    assert samples(linked / 'root', False) == samples(copy, False)
    for link, target, match in [('train/a/loop', '.', r'train/a/loop is .*train/a again \('),
                                ('train/zloop', '../train', r'train/zloop is .*train again \('),
                                ('train/b/3.png', '0.png', r'train/b/3.png is .*train/b/0.png again \(')]:
        os.symlink(target, copy / link)
        with pytest.raises(DataError, match=match + r'.*remove the link$'):
            samples(copy)
        os.remove(copy / link)


@pytest.mark.parametrize('kind', ['a pipe', 'a link to a device'])
def test_a_file_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path, kind):
    """A FIFO named like an image in a class folder: the run opened it to read it, and waited for a writer for ever,
    printing nothing. Refused where the folder is listed, before any image is opened, naming it."""
    colour_folders(tmp_path, {'train': 'ab', 'val': 'ab'})
    stray = tmp_path / 'train' / 'b' / '3.png'
    if kind == 'a pipe':
        os.mkfifo(stray)
    else:
        os.symlink('/dev/zero', stray)
    cfg = folder_cfg(tmp_path)
    with pytest.raises(DataError, match=rf'^{stray} is not a regular file .*: remove it from the data folder$'):
        build_dataset(cfg, train=True)
    assert len(build_dataset(cfg, train=False)[0]) == 6
