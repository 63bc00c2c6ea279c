"""A stand-in CUDA device on a CPU-only machine: a script's real code runs with every tensor it makes on `cuda:0`
as a fake tensor (torch's FakeTensorMode: shapes, dtypes, devices and autocast go through the real operators,
no data). What CUDA would refuse is refused here too: an operator mixing `cpu` and `cuda:0` tensors raises as it
does on a GPU. Inside `strict()` (a training or evaluation step) a host sync (`.item()`, a bool of a tensor, a
blocking device-to-host copy) and a host tensor read by a device operator fail the test; outside it a number asked of
a tensor (an accuracy, a loss printed) is a stand-in, 1: the test checks devices, dtypes and syncs, not numbers.

    with standin_cuda(monkeypatch) as cuda:
        ...                       # torch.randn(2, device='cuda') is fake; CUDA's autocast rules apply
        with cuda.strict():
            step(...)             # a sync or a host tensor read here fails
"""
import contextlib
from types import SimpleNamespace

import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

aten = torch.ops.aten
# the operators that hand the host a number of a tensor's data
SYNCS = (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default)
COPIES = (aten._to_copy.default, aten.copy_.default)


class StandInCuda(FakeTensorMode):
    """FakeTensorMode on a fake `cuda:0`, which stands in numbers for syncs outside strict() and refuses them
    inside."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.in_step = False
        self.syncs = []           # what a strict step asked of the host (each fails the test)

    @contextlib.contextmanager
    def strict(self, allowed=0):
        """Inside: at most `allowed` syncs (a count that does not grow with the batches: results copied out once)."""
        self.in_step, was = True, self.in_step
        self.syncs = []
        try:
            yield
        finally:
            self.in_step = was
        assert len(self.syncs) <= allowed, f'host syncs inside the step: {self.syncs}'

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
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
        return super().__torch_dispatch__(func, types, args, kwargs)

    def check(self, func, args, kwargs):
        """Inside a step: a sync, a blocking copy to the host, or a host tensor (not a scalar) handed to an operator
        on the device."""
        if func in SYNCS:
            self.syncs.append(f'{func} (a number read on the host)')
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if func in COPIES:
            to = kwargs.get('device') or (args[0].device if func is aten.copy_.default else None)
            source = args[1] if func is aten.copy_.default else args[0]
            across = to is not None and torch.device(to).type != source.device.type
            if across and not kwargs.get('non_blocking'):
                self.syncs.append(f'{func} (a blocking copy between host and device)')
            return
        if 'cuda' in devices and any(t.device.type == 'cpu' and t.dim() > 0 for t in tensors):
            self.syncs.append(f'{func} (reads a host tensor)')


@contextlib.contextmanager
def standin_cuda(monkeypatch):
    """Inside: torch.cuda's questions (a device's properties, bf16, memory) answered as an H100 would, CUDA's autocast
    on, and every tensor a fake one on `cuda:0` or on the host. torch.cuda.is_available() stays False (where it is
    True, torch makes a real CUDA context for a fake tensor's move): a test hands the device to the code it runs."""
    mode = StandInCuda()
    for name, value in {'device_count': 1, 'current_device': 0,
                        'is_bf16_supported': True, 'get_device_capability': (9, 0)}.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, value=value, **k: value)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    properties = SimpleNamespace(name='stand-in', total_memory=80 * 2 ** 30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda *a: properties)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a: None)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda *a: (2 ** 34, 2 ** 35))
    monkeypatch.setattr(torch.Tensor, 'pin_memory', lambda t, *a: t)
    monkeypatch.setattr(torch.Tensor, 'is_pinned', lambda t, *a: True)
    # a real CUDA context is made for a fake tensor's first move where torch sees a GPU: none is here
    monkeypatch.setattr(fake_tensor, 'init_gpu_context', lambda device: None)
    # CUDA's autocast rules on the fake tensors (torch.autocast('cuda') asks whether a GPU is there)
    monkeypatch.setattr(torch.cuda.amp.common, 'amp_definitely_not_available', lambda: False)
    with mode:
        yield mode


def on_device(t):
    """Whether t is one of the stand-in's tensors on `cuda`."""
    return isinstance(t, FakeTensor) and t.device.type == 'cuda'
