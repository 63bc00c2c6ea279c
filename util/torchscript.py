"""
The tensors of a TorchScript archive (OpenAI ships CLIP so), read without running it. torch.jit.load builds the
archive's objects with the archive's own compiled code: a class's __setstate__ runs as it is read, and it can write
files (torch.from_file) or never return. This reader executes nothing, as torch.load(weights_only=True) executes
nothing of a torch.save file:

    data.pkl        unpickled by an Unpickler that knows tensors and plain containers only: each storage is the
                    archive's record data/<key>, each TorchScript object an inert Record of the state pickled for
                    it (a dict of its attributes), never handed to its class's code
    code/*.py       read as text (parsed by ast, never run) for two lists each module class declares,
                    __parameters__ and __buffers__: which of its attributes ScriptModule.state_dict() returns

TorchScript builds an object of a class without __setstate__ from that dict alone, so the parameters and buffers
found so are exactly torch.jit.load(path).state_dict()'s (tests/test_torchscript.py compares them); an archive
with a class that has its own __setstate__ is refused (its objects are what that code makes of their state).
Every record is read through zipfile, which checks its CRC-32: a damaged archive is refused too.
"""
import ast
import pickle
import zipfile
from collections import OrderedDict

import torch


class ArchiveRefused(ValueError):
    """An archive this reader will not read: args (what it holds, the fix)."""


# the fixes: of a damaged archive, of one whose code would run
AGAIN = 'copy or download it again'
AS_WEIGHTS = 'ask for its weights saved with torch.save(model.state_dict(), path)'

STORAGES = {f'{name}Storage': getattr(torch, dtype) for name, dtype in (
    ('Float', 'float32'), ('Double', 'float64'), ('Half', 'float16'), ('BFloat16', 'bfloat16'),
    ('ComplexFloat', 'complex64'), ('ComplexDouble', 'complex128'), ('Byte', 'uint8'),
    ('Char', 'int8'), ('Short', 'int16'), ('Int', 'int32'), ('Long', 'int64'), ('Bool', 'bool'))}


class Record:
    """A TorchScript object, inert: `qualname` is its class's, `state` what was pickled for it."""
    qualname = ''
    state = None

    def __setstate__(self, state):   # pickle's BUILD: kept, given to no code
        self.state = state


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2's tensor: a view of its storage (a 1-D tensor of the storage's
    dtype)."""
    return storage.as_strided(size, stride, offset)


def same(value, *type_tag):
    """What torch.jit._pickle's helpers return for a list or a type tag: the value itself."""
    return value


# every global the unpickler may name: each one plain data or a function of this file
GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): same,
    ('collections', 'OrderedDict'): OrderedDict,
    **{('torch.jit._pickle', f'build_{kind}list'): same
       for kind in ('int', 'double', 'bool', 'tensor')},
    ('torch.jit._pickle', 'restore_type_tag'): same,
    **{('torch', name): dtype for name, dtype in STORAGES.items()},
}


class Classes:
    """The module classes of an archive, as its code/ records declare them (read as text): for each qualified name,
    whether it is a module, its parameters and its buffers."""

    def __init__(self, archive, root):
        self.archive = archive
        self.root = root           # the archive's folder
        self.files = {}            # a code record's path -> its parsed module
        self.found = {}            # a qualified name -> what declared() found

    def __call__(self, qualname):
        if qualname not in self.found:
            self.found[qualname] = self.declared(*qualname.rsplit('.', 1))
        return self.found[qualname]

    def declared(self, module, name):
        """(is a module, its __parameters__, its __buffers__) of the class `name` in the code record of
        `module`."""
        path = f"{self.root}/code/{module.replace('.', '/')}.py"
        if path not in self.files:
            try:
                self.files[path] = ast.parse(self.archive.read(path))
            except (KeyError, SyntaxError, ValueError, RecursionError, MemoryError):
                raise ArchiveRefused(f'it is a TorchScript archive whose code for {module}.{name} '
                                     f'cannot be read', AGAIN) from None
        cls = next((n for n in self.files[path].body
                    if isinstance(n, ast.ClassDef) and n.name == name), None)
        if cls is None:
            raise ArchiveRefused(f'it is a TorchScript archive whose code has no class '
                                 f'{module}.{name}', AGAIN)
        if any(isinstance(n, ast.FunctionDef) and n.name == '__setstate__' for n in cls.body):
            raise ArchiveRefused(f'it is a TorchScript archive whose class {module}.{name} has its '
                                 f'own __setstate__, code that torch.jit.load would run to read it: '
                                 f'refused unread', AS_WEIGHTS)
        lists = {t.id: n.value for n in cls.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name) and t.id in ('__parameters__', '__buffers__')}
        try:
            parameters, buffers = (ast.literal_eval(lists.get(k, ast.List([], ast.Load())))
                                   for k in ('__parameters__', '__buffers__'))
        except ValueError:
            parameters = buffers = None
        if not all(isinstance(names, list) and all(isinstance(n, str) for n in names)
                   for names in (parameters, buffers)):
            raise ArchiveRefused(f'it is a TorchScript archive whose class {module}.{name} lists its '
                                 f'parameters in a way TorchScript does not write', AGAIN)
        is_module = any(isinstance(b, ast.Name) and b.id == 'Module' for b in cls.bases)
        return is_module, parameters, buffers


class ArchiveUnpickler(pickle.Unpickler):
    """data.pkl's objects: tensors from the archive's storages, TorchScript objects as Records, nothing
    else."""

    def __init__(self, file, archive, root, classes):
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.classes = classes
        self.storages = {}        # a storage's key -> its tensor, read once
        self.records = {}         # a TorchScript class's qualified name -> its Record type

    def find_class(self, module, name):
        if module.startswith('__torch__'):   # a class compiled into the archive
            qualname = f'{module}.{name}'
            self.classes(qualname)   # refused here if it has its own __setstate__
            if qualname not in self.records:
                self.records[qualname] = type(name, (Record,), {'qualname': qualname})
            return self.records[qualname]
        if (module, name) not in GLOBALS:
            raise ArchiveRefused(f'it is a TorchScript archive that names {module}.{name}, not a '
                                 f'tensor or plain data: refused unread', AS_WEIGHTS)
        return GLOBALS[module, name]

    def persistent_load(self, pid):
        """A storage, ('storage', its dtype, key, device, number of elements): the record data/<key>,
        read once."""
        kind, dtype, key, _, numel = pid
        if kind != 'storage' or not isinstance(dtype, torch.dtype):
            raise ArchiveRefused(f'it is a TorchScript archive with a storage of a kind torch does not '
                                 f'write ({kind})', AGAIN)
        if key not in self.storages:
            name = f'{self.root}/data/{key}'
            # before any memory is taken
            if self.archive.getinfo(name).file_size != numel * dtype.itemsize:
                raise zipfile.BadZipFile(f'{name} has another size than its tensor')
            storage = torch.empty(numel, dtype=dtype)
            raw = storage.view(torch.uint8).numpy()
            with self.archive.open(name) as f:   # zipfile checks the record's CRC-32 at its end
                if f.readinto(raw) != raw.size or f.read(1):
                    raise zipfile.BadZipFile(f'{name} is cut short')
            self.storages[key] = storage
        return self.storages[key]


def read_archive(path):
    """A TorchScript archive's parameters and buffers by dotted name, as torch.jit.load(path).state_dict() gives
    them, read without running any of its code. ArchiveRefused where it holds code that would run."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = next((n for n in names if n.endswith('/data.pkl')), '/').rpartition('/')[0]
        if f'{root}/data.pkl' not in names:
            raise ArchiveRefused('it is a TorchScript archive without its data.pkl', AGAIN)
        if f'{root}/byteorder' in names and archive.read(f'{root}/byteorder').strip() != b'little':
            raise ArchiveRefused('it is a TorchScript archive written on a big-endian machine',
                                 'save it again on a little-endian one (x86, ARM)')
        classes = Classes(archive, root)
        with archive.open(f'{root}/data.pkl') as f:
            top = ArchiveUnpickler(f, archive, root, classes).load()
        state = {}
        collect(top, '', classes, state)
        return state


def is_module(value, classes):
    if not (isinstance(value, Record) and isinstance(value.state, dict)):
        return False
    return classes(value.qualname)[0]


def collect(module, prefix, classes, state):
    """Add a module's parameters, then its buffers, then its submodules' (each in its attributes' order), as
    nn.Module.state_dict does; an unset one (None: a Linear without bias) is left out there too."""
    if not is_module(module, classes):
        raise ArchiveRefused('it is a TorchScript archive that holds no module',
                             "give the model's archive")
    _, parameters, buffers = classes(module.qualname)
    for names in (parameters, buffers):
        for name, value in module.state.items():
            if name in names and value is not None:
                if not torch.is_tensor(value):
                    raise ArchiveRefused(f'it is a TorchScript archive whose {prefix}{name} is no '
                                         f'tensor', AGAIN)
                state[prefix + name] = value
    for name, value in module.state.items():
        if is_module(value, classes):
            collect(value, f'{prefix}{name}.', classes, state)
