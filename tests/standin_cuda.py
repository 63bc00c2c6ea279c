"""A stand-in CUDA device on a CPU-only machine: a script's real code runs with every tensor it puts on `cuda:0` a fake
tensor (torch's FakeTensorMode: shapes, dtypes, devices and autocast go through the real operators, no data); the
host's own work (a model's initialisation, a file read, a batch made by a loader) runs for real, pinned memory as the
host's own. What CUDA would refuse is refused here too: an operator mixing `cpu` and `cuda:0` tensors raises as it
does on a GPU. Inside `strict()` (a training or evaluation step) a host sync of a device tensor (`.item()`, a bool, a
blocking copy either way) and a host tensor read by a device operator fail the test; outside it a number asked of a
device tensor (an accuracy, a loss printed) is a stand-in, 1 (True for a bool): the test checks devices, dtypes and
syncs, not numbers. Stood in as well: backward (zero gradients on each leaf's device: torch's autograd engine needs a
real CUDA context), torch.save (the host's zeros in the device tensors' shapes), a fake tensor's address (its
storage's, where torch gives 0), the CUDA generator (a host one), streams and events (one stream, the host's order)
and CUDA graphs (a capture runs its code once and records each device operator in it, (operator, args, kwargs,
output), in the graph's `ops`; a replay runs nothing).

    with standin_cuda() as cuda:
        ...                       # torch.randn(2, device='cuda') is fake; CUDA's autocast rules apply
        cuda.patch(torch.cuda, 'is_available', lambda: True)   # put back with the stand-in's own
        with cuda.strict():
            step(...)             # a sync or a host tensor read here fails

Every replacement is undone when the context ends, whatever happened inside, by putting back the object that was there
(never by deleting a name: a module that serves names through __getattr__, torch's configs, would lose them), and
CUDA's TF32 flags (which a script's set-up turns on for a GPU) are put back as they were.
"""
import contextlib
import os
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from conftest import tf32

aten = torch.ops.aten

# the oldest torch the stand-in runs on: torch 2.9.1, 2.8.0 and 2.6.0 ask the CUDA runtime for its current stream, in
# C++, when an operator on a fake `cuda:0` tensor needs a gradient, which aborts a process on a machine without a GPU
FLOOR = '2.10'


def address(t):
    """A fake tensor's address as the stand-in gives it (its data_ptr inside standin_cuda): its storage's own, plus its
    offset."""
    return t.untyped_storage()._cdata + t.storage_offset() * t.element_size()

# the operators that hand the host a number of a tensor's data
SYNCS = (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default)
COPIES = (aten._to_copy.default, aten.copy_.default)
# in place on their inputs, and without a fake kernel in torch: nothing to compute on fake tensors
UNFAKED = (aten._fused_adamw_.tensor_lr, aten._fused_adam_.tensor_lr)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_line():
    """Where the project's own code (not torch's, not the tests') asked for what runs now: 'file:line'."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.relpath(frame.filename, ROOT)
        if not path.startswith(('..', 'tests')):
            return f'{path}:{frame.lineno}'
    return 'outside the project'


class StandInCuda(FakeTensorMode):
    """FakeTensorMode on a fake `cuda:0`, which stands in numbers for syncs outside strict() and refuses them
    inside."""

    def __init__(self, patches):
        super().__init__(allow_non_fake_inputs=True)
        self.in_step = False
        self.recording = None     # a CUDA graph's capture in progress: its list of operators
        self.syncs = []           # what a strict step asked of the host (each fails the test)
        self.patches = patches    # an ExitStack: every replacement, undone when the stand-in ends

    def __deepcopy__(self, memo):
        """A fake tensor deep-copied (an EMA's copy of the model) stays in this mode: one device, not two."""
        return self

    def patch(self, owner, name, value):
        """owner.name is value until the stand-in ends (undone with its own replacements)."""
        self.patches.enter_context(replaced(owner, name, value))

    @contextlib.contextmanager
    def strict(self, allowed=0):
        """Inside: at most `allowed` syncs (a count that does not grow with the batches: results copied out once)."""
        self.in_step, was = True, self.in_step
        self.syncs = []
        try:
            yield
        finally:
            self.in_step = was
        assert len(self.syncs) <= allowed, f'{len(self.syncs)} host syncs inside the step: {self.syncs[:4]}'

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.on_device(args, kwargs):    # the host's own work runs for real (a model's init, a file read)
            if kwargs.get('pin_memory'):        # pinned host memory, which only a GPU's driver makes: the host's
                kwargs = {**kwargs, 'pin_memory': False}
            return func(*args, **kwargs)
        if self.in_step:
            self.check(func, args, kwargs)
        if func in SYNCS:
            if func is aten.equal.default:
                return True
            # a stand-in of the tensor's kind
            if args[0].dtype == torch.bool:
                return True
            if args[0].is_floating_point():
                return 1.0
            return 1
        # the host's tensors a device operator takes, as fake ones (torch would run a small one for real)
        args, kwargs = pytree.tree_map_only(torch.Tensor, self.fake, (args, kwargs))
        out = None if func in UNFAKED else super().__torch_dispatch__(func, types, args, kwargs)
        if self.recording is not None:
            self.recording.append((func, args, kwargs, out))
        return out

    def fake(self, t):
        return t if isinstance(t, FakeTensor) else self.from_tensor(t)

    @staticmethod
    def on_device(args, kwargs):
        """Whether an operator is not the host's alone: a fake tensor among its inputs, a tensor or a device not the
        host's (`cuda`). torch's `meta` device is the host's: a model built there (a resolve step's) is made real on
        it."""
        for a in pytree.tree_leaves((args, kwargs)):
            device = a.device if isinstance(a, torch.Tensor) else a
            if isinstance(a, FakeTensor) or isinstance(device, torch.device) and device.type not in ('cpu', 'meta'):
                return True
        return False

    def check(self, func, args, kwargs):
        """Inside a step: a sync, a blocking copy to the host, or a host tensor (not a scalar) handed to an operator
        on the device."""
        if func in SYNCS:
            self.syncs.append(f'{func} (a number read on the host) at {project_line()}')
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if func in COPIES:
            to = kwargs.get('device') or (args[0].device if func is aten.copy_.default else None)
            source = args[1] if func is aten.copy_.default else args[0]
            across = to is not None and torch.device(to).type != source.device.type
            # copy_'s non_blocking may come as its third argument (Tensor.copy_(source, True))
            non_blocking = kwargs.get('non_blocking', func is aten.copy_.default and len(args) > 2 and args[2])
            if across and not non_blocking:
                self.syncs.append(f'{func} (a blocking copy between host and device) at '
                                  f'{project_line()}')
            return
        if 'cuda' in devices and any(t.device.type == 'cpu' and t.dim() > 0 for t in tensors):
            self.syncs.append(f'{func} (reads a host tensor) at {project_line()}')


def swapped(swap, t1, t2):
    try:
        swap(t1, t2)
    except RuntimeError:
        t1.data = t2


def zeros(t):
    return torch.zeros(t.shape, dtype=t.dtype)


def select_on_host(select):
    """torch._C._select_conv_backend asked of host tensors of the same shapes and dtypes (the kernel only sets the
    strides of a fake convolution's output, which the stand-in does not check)."""
    def on_host(*args, **kwargs):
        with fake_tensor.unset_fake_temporarily():
            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype),
                                                (args, kwargs))
            return select(*args, **kwargs)
    return on_host


def view_on_meta(index_op, on_view=lambda view: view):
    """Tensor.__getitem__ (or __setitem__, with on_view) on a fake device tensor, through the dispatcher: indexed by
    integers, slices, None and Ellipsis, on the view it makes, whose layout is taken from a `meta` tensor of the same
    one; indexed by tensors and whole slices, aten.index (other indices as they are)."""
    def op(t, index, *value):
        parts = index if isinstance(index, tuple) else (index,)
        if not (isinstance(t, FakeTensor) and t.device.type == 'cuda'):
            return index_op(t, index, *value)
        if all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in parts):
            with fake_tensor.unset_fake_temporarily():
                view = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device='meta').__getitem__(index)
            return on_view(t.as_strided(view.shape, view.stride(), t.storage_offset() + view.storage_offset()), *value)
        if not value and all(isinstance(i, torch.Tensor) or i == slice(None) for i in parts):
            return torch.ops.aten.index.Tensor(t, [i if isinstance(i, torch.Tensor) else None for i in parts])
        return index_op(t, index, *value)
    return op


def copy(t, source, non_blocking=False):
    """t[...] = source, through the dispatcher (torch 2.6's Tensor.copy_ sets the device first, a real CUDA call)."""
    if isinstance(source, torch.Tensor):
        return torch.ops.aten.copy_.default(t, source, non_blocking)
    return torch.ops.aten.fill_.Scalar(t, source)


def leaves(tensors):
    """The tensors requiring a gradient that `tensors` were made from (autograd's AccumulateGrad nodes)."""
    found, seen = [], set()
    nodes = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, 'variable'):
            found.append(node.variable)
        nodes += [n for n, _ in node.next_functions]
    return found


def standin_backward(tensors, *args, inputs=None, **kwargs):
    """loss.backward(): a zero gradient added to each leaf's, on its device, in its dtype."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for leaf in inputs or leaves(tensors):
        zero = torch.zeros_like(leaf)
        leaf.grad = zero if leaf.grad is None else leaf.grad + zero


def standin_grad(outputs, inputs, *args, **kwargs):
    """torch.autograd.grad: zeros like each input."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    return tuple(torch.zeros_like(t) for t in inputs)


class Generator(torch.Generator):
    """torch.Generator, a host one where a `cuda` one is asked for (none can be made without a GPU)."""

    def __new__(cls, device='cpu'):
        return super().__new__(cls, 'cpu')


class Stream:
    """torch.cuda.Stream: the stand-in runs everything in the host's order, on one stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


class Event:
    """torch.cuda.Event: in the host's order, the work before it is done once it is recorded."""

    def __init__(self, *args, **kwargs):
        self.recorded = False
        self.waited = False

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        assert self.recorded, 'an event waited for before it was recorded'
        self.waited = True

    def query(self):
        return self.recorded


class CUDAGraph:
    """torch.cuda.CUDAGraph: `ops` what its capture recorded (graph, below); a replay runs nothing."""

    def __init__(self, *args, **kwargs):
        self.ops = []
        self.replays = 0

    def replay(self):
        self.replays += 1


@contextlib.contextmanager
def replaced(owner, name, value):
    """owner.name is value inside; after, whatever happens, the object that was there is set back (a class's
    inherited one uncovered again: torch.Tensor's methods are torch._C.TensorBase's)."""
    old = getattr(owner, name)
    inherited = isinstance(owner, type) and name not in vars(owner)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if inherited:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


@contextlib.contextmanager
def standin_cuda():
    """Inside: torch.cuda's questions (a device's properties, bf16, memory) answered as an H100 would, CUDA's autocast
    on, and every tensor a fake one on `cuda:0` or on the host. torch.cuda.is_available() stays False (where it is
    True, torch makes a real CUDA context for a fake tensor's move): a test hands the device to the code it runs.
    Below FLOOR (a torch outside requirements.txt's range) the test is skipped, saying why."""
    if torch.__version__ < FLOOR:   # torch's TorchVersion compares as a version
        pytest.skip(f'the stand-in CUDA device needs torch {FLOOR} or later (here '
                    f'{torch.__version__}: its C++ asks the CUDA runtime for a stream where a fake tensor needs a '
                    'gradient, which aborts the process without a GPU)')
    with contextlib.ExitStack() as patches:
        mode = StandInCuda(patches)
        patches.enter_context(tf32())    # a script's set-up turns TF32 on for a GPU (launch.processes)
        for name, value in {'device_count': 1, 'current_device': 0,
                            'is_bf16_supported': True, 'get_device_capability': (9, 0)}.items():
            mode.patch(torch.cuda, name, lambda *a, value=value, **k: value)
        mode.patch(torch.cuda, 'set_device', lambda device: None)
        properties = SimpleNamespace(name='stand-in', total_memory=80 * 2 ** 30, major=9, minor=0)
        mode.patch(torch.cuda, 'get_device_properties', lambda *a: properties)
        mode.patch(torch.cuda, 'synchronize', lambda *a: None)
        # no CUDA graph is being captured: torch 2.10's Adam step asks this wherever torch.cuda says a GPU is there,
        # and dynamo asks too (a real CUDA call otherwise)
        mode.patch(torch.cuda, 'is_current_stream_capturing', lambda: False)
        mode.patch(torch.cuda, 'mem_get_info', lambda *a: (2 ** 34, 2 ** 35))
        # streams, and a CUDA graph's capture: its code run once, its device operators recorded (the optimizer asks
        # whether a capture is under way, and refuses one its parameter groups do not allow)
        mode.patch(torch.cuda, 'Stream', Stream)
        mode.patch(torch.cuda, 'current_stream', lambda *a: Stream())
        mode.patch(torch.cuda, 'stream', lambda *a: contextlib.nullcontext())
        mode.patch(torch.cuda, 'CUDAGraph', CUDAGraph)
        mode.patch(torch.cuda, 'Event', Event)

        @contextlib.contextmanager
        def capture(graph, *args, **kwargs):
            assert mode.recording is None, 'a capture inside a capture'
            mode.recording = graph.ops
            try:
                yield
            finally:
                mode.recording = None
        mode.patch(torch.cuda, 'graph', capture)
        mode.patch(torch.cuda, 'is_current_stream_capturing', lambda: mode.recording is not None)
        # torch's autograd engine needs a real CUDA context for a device tensor's backward (pytorch issue 92627): the
        # gradients are stand-ins, zeros on each leaf's device
        mode.patch(torch.autograd, 'backward', standin_backward)
        mode.patch(torch.autograd, 'grad', standin_grad)
        # a fake tensor's address: its storage's own (torch's is 0 for every fake tensor), plus its offset; a tensor
        # moved to new memory gets another, as on a GPU (what util/engine.GraphedStep watches)
        mode.patch(FakeTensor, 'data_ptr', address)
        # a checkpoint of the device's tensors: the host's zeros in their shapes and dtypes (a fake tensor has no bytes)
        save = torch.save
        mode.patch(torch, 'save',
                   lambda obj, *a, **k: save(pytree.tree_map_only(FakeTensor, zeros, obj), *a, **k))
        # a module cast (Module.to) swaps a fake parameter for its cast, which a weak reference the mode keeps refuses
        swap = torch.utils.swap_tensors
        mode.patch(torch.utils, 'swap_tensors', lambda t1, t2: swapped(swap, t1, t2))
        # torch 2.6's Module.to set a fake cast into the parameter's .data, which left it on `meta`; newer torch makes a
        # new parameter of it, as this has it do on every version
        compatible = torch._has_compatible_shallow_copy_type
        mode.patch(torch, '_has_compatible_shallow_copy_type',
                   lambda t, applied: not isinstance(applied, FakeTensor) and compatible(t, applied))
        load = torch.load    # a file read is the host's own work (torch.load would make its tensors fake)

        def host_load(*args, **kwargs):
            with fake_tensor.unset_fake_temporarily():
                return load(*args, **kwargs)
        mode.patch(torch, 'load', host_load)
        # the device's generator and its state: the host's stand in (the numbers are not checked)
        mode.patch(torch, 'Generator', Generator)
        mode.patch(torch.cuda, 'get_rng_state', lambda *a: torch.get_rng_state())
        mode.patch(torch.cuda, 'set_rng_state', lambda *a: None)
        mode.patch(torch.Tensor, 'pin_memory', lambda t, *a: t)
        mode.patch(torch.Tensor, 'is_pinned', lambda t, *a: True)
        # a real CUDA context is made for a fake tensor's first move where torch sees a GPU: none is here
        mode.patch(fake_tensor, 'init_gpu_context', lambda device: None)
        # torch 2.6's fake convolution asks CUDA which kernel it would take, a real CUDA call: the host answers
        mode.patch(torch._C, '_select_conv_backend', select_on_host(torch._C._select_conv_backend))
        # torch 2.6's indexing sets the tensor's device first, a real CUDA call: a view's layout found on `meta`
        mode.patch(torch.Tensor, '__getitem__', view_on_meta(torch.Tensor.__getitem__))
        mode.patch(torch.Tensor, '__setitem__', view_on_meta(torch.Tensor.__setitem__, copy))
        copy_ = torch.Tensor.copy_
        mode.patch(torch.Tensor, 'copy_', lambda t, source, non_blocking=False: copy(t, source, non_blocking)
                   if isinstance(t, FakeTensor) else copy_(t, source, non_blocking))
        # CUDA's autocast rules on the fake tensors (torch.autocast('cuda') asks whether a GPU is there)
        mode.patch(torch.cuda.amp.common, 'amp_definitely_not_available', lambda: False)
        with mode:
            yield mode


def on_device(t):
    """Whether t is one of the stand-in's tensors on `cuda`."""
    return isinstance(t, FakeTensor) and t.device.type == 'cuda'
