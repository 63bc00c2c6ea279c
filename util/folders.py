"""
A split of ImageNet's layout, <split>/<class>/<image>, read as torchvision's ImageFolder reads it, but with the
class numbers of the whole data set (util/datafiles.image_folder): a split that lacks a class keeps every other's
number; each image read as what it is (read_image). Its own module, imported when a run reads folders: torchvision's
import brings torch's compiler with it.
"""
import os
import stat
import warnings

import numpy as np
import torchvision
from PIL import Image, ImageOps

from util.errors import DataError, first_few


class ClassFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose class folders take the indices `index` gives (name -> class), where ImageFolder
    numbers the folders it finds by their sorted position. A folder not in `index` is a DataError saying
    `unknown` (what they are not, and the fix); so is a class folder without a single image."""

    def __init__(self, root, index, transform, unknown):
        self.index = index
        self.unknown = unknown
        super().__init__(root, transform=transform, loader=read_image)
        self.classes = sorted(index, key=index.get)   # every class of the numbering, index = label
        self.source = os.path.abspath(root)

    def make_dataset(self, directory, class_to_idx, **torchvision_arguments):
        """torchvision's samples, in its order (its walk, sorted, links followed: linked folders and images read as
        copies would), image files by their extension, hidden ones left out (._photo.jpg, .ipynb_checkpoints), each
        taken once by where it really is: a link loop (a/loop -> .) or a file reached twice: a DataError naming it."""
        seen = {os.path.realpath(directory): directory}   # real path -> the path it was reached by
        samples = []
        empty = []
        for name in sorted(class_to_idx):
            found = []   # (folder, image file, the folder's real path)
            for root, dirs, files in os.walk(os.path.join(directory, name), followlinks=True):
                real = os.path.realpath(root)
                # top-down: checked before the walk goes into it, so a loop ends here
                once(root, real, seen)
                dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
                found += [(root, f, real) for f in files
                          if not f.startswith('.') and torchvision.datasets.folder.is_image_file(f)]
            if not found:
                empty.append(name)
            for root, f, real in sorted(found):   # torchvision's order: by folder, then by name
                path = os.path.join(root, f)
                # one lstat a file: its kind, and its real path from its folder's (not one lstat a part of its path)
                mode = os.lstat(path).st_mode
                target = os.path.join(real, f)
                if stat.S_ISLNK(mode):
                    target = os.path.realpath(path)
                    # what it leads to (a broken link is named by read_image)
                    mode = os.stat(target).st_mode if os.path.exists(target) else stat.S_IFREG
                if not stat.S_ISREG(mode):
                    # refused, not skipped, as a damaged image is: opened, a pipe waits for a writer for ever
                    raise DataError(f'{path} is not a regular file (a pipe, a socket or a device named '
                                    f'like an image): remove it from the data folder')
                once(path, target, seen)
                samples.append((path, class_to_idx[name]))
        if empty:
            raise DataError(f"{directory}: no image file (.jpg, .png, ...) in the class folder(s) "
                            f"{', '.join(empty)}: add their images, or remove those folders")
        return samples

    def find_classes(self, directory):
        names = class_folders(directory, self.unknown)
        strangers = [n for n in names if n not in self.index]
        if strangers:
            raise DataError(f'{directory} has folders {first_few(strangers)}: {self.unknown}')
        return names, {n: self.index[n] for n in names}


def once(path, real, seen):
    """Note that `path` leads to `real` in `seen`; a DataError if another path led there before."""
    if real in seen:
        raise DataError(f'{path} is {seen[real]} again ({real}, reached through a symbolic '
                        f'link): its images would be read twice, or without end in a loop: remove the '
                        f'link')
    seen[real] = path


def class_folders(directory, expects):
    """The sorted names of the folders in `directory`, hidden ones (no class) left out; a DataError if it
    has none."""
    names = sorted(e.name for e in os.scandir(directory)
                   if e.is_dir() and not e.name.startswith('.'))
    if not names:
        raise DataError(f'{directory} has no folders (one per class): {expects}')
    return names


def read_image(path):
    """An RGB PIL image read as what it is, following PIL's and torchvision's conventions where they are the image's
    own: the orientation of its EXIF tag applied (PIL's ImageOps.exif_transpose: a phone's photo stands upright);
    palette, CMYK, greyscale and bilevel images through PIL's conversion to RGB; transparency dropped, the colour
    kept (PIL's convert('RGB'), and torchvision's decode_image in RGB mode); 16-bit greyscale scaled to 8 bits by
    its high byte (torchvision's ToDtype(torch.uint8, scale=True)), where PIL's conversion would clip it to white.
    Pixels of 32-bit integers or floats have no agreed range: refused, as is a file that does not decode (a
    DataError naming the file)."""
    try:
        with open(path, 'rb') as f, warnings.catch_warnings():
            warnings.simplefilter('ignore')   # PIL's notes on palettes with transparency, on EXIF data
            image = ImageOps.exif_transpose(Image.open(f))
            image.load()
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, ... by format
        raise DataError(f'cannot read image {path} ({type(e).__name__}: {e}): remove or replace the '
                        f'file') from None
    if image.mode.startswith('I;16'):
        # the high byte of each pixel: (H, W) uint8, mode L
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    elif image.mode in ('I', 'F'):   # 32-bit integers or floats
        raise DataError(f'image {path} has 32-bit pixels (mode {image.mode}), whose range no '
                        f'convention fixes: save it with 8 or 16 bits a channel')
    return image.convert('RGB')
