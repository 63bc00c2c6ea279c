"""Shared fixtures: the repository root on sys.path, the `gpu` marker (such tests skip without CUDA), and a
helper that runs a script of the repo in a process of its own (tiny, single-threaded: the machine is small and
shared), forked from one that has imported torch already (tests/forkserver.py)."""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys

import pytest
import torch
import torch._dynamo
import torch.cuda.amp.common
import torch.nn.functional as F
from torch._subclasses import fake_tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA device; `python -m pytest -m gpu tests` runs only these')
    # one thread for the whole session, set before any test (a test file that set it when imported changed it
    # under whichever test imported that file first): the machine is small and shared
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The notebook's file first: its fresh run, two minutes in one process, then does not start when the rest is
    done (under `-n 2`, pytest-xdist). Without CUDA every `gpu` test is reported as skipped (never deselected: the
    run still counts them)."""
    items.sort(key=lambda item: item.path.name != 'test_tutorial.py')    # a stable sort: the rest in their order
    if not torch.cuda.is_available():
        for item in items:
            if 'gpu' in item.keywords:
                item.add_marker(pytest.mark.skip(reason='needs a CUDA device'))


# -----------------------------------------------------------------------------
# Tests leave torch as they found it

# the functions and classes a test may replace for its own time only (the stand-in device's, tests/standin_cuda.py,
# and the ones tests patch): the same objects after every test
REPLACEABLE = {
    'torch': (torch, ['save', 'load', 'Generator', 'default_generator', 'manual_seed',
                      'get_rng_state', 'set_rng_state', 'compile', '_fused_sdp_choice',
                      '_has_compatible_shallow_copy_type']),
    'torch.cuda': (torch.cuda, ['is_available', 'device_count', 'current_device', 'set_device',
                                'is_bf16_supported', 'get_device_capability', 'get_device_properties',
                                'synchronize', 'mem_get_info', 'get_rng_state', 'set_rng_state',
                                'manual_seed', 'Stream', 'stream', 'current_stream', 'CUDAGraph', 'graph',
                                'is_current_stream_capturing']),
    'torch.autograd': (torch.autograd, ['backward', 'grad']),
    'torch.Tensor': (torch.Tensor, ['backward', 'pin_memory', 'is_pinned', 'to', 'item', '__getitem__',
                                      '__setitem__', 'copy_']),
    'torch.utils': (torch.utils, ['swap_tensors']),
    'torch._C': (torch._C, ['_select_conv_backend']),
    'torch.nn.functional': (F, ['scaled_dot_product_attention']),
    'torch.hub': (torch.hub, ['get_dir', 'download_url_to_file']),
    'fake_tensor': (fake_tensor, ['init_gpu_context']),
    'torch.cuda.amp.common': (torch.cuda.amp.common, ['amp_definitely_not_available']),
}


def torch_settings():
    """{name: value} of torch's process-wide settings a test may change inside a scoped tool only."""
    backends = torch.backends
    settings = {
        'torch.backends.cuda.matmul.allow_tf32': backends.cuda.matmul.allow_tf32,
        'torch.backends.cudnn.allow_tf32': backends.cudnn.allow_tf32,
        'torch.backends.cudnn.enabled': backends.cudnn.enabled,
        'torch.backends.cudnn.benchmark': backends.cudnn.benchmark,
        'torch.backends.cudnn.deterministic': backends.cudnn.deterministic,
        'torch.get_float32_matmul_precision()': torch.get_float32_matmul_precision(),
        'torch.are_deterministic_algorithms_enabled()':
            torch.are_deterministic_algorithms_enabled(),
        'torch.is_deterministic_algorithms_warn_only_enabled()':
            torch.is_deterministic_algorithms_warn_only_enabled(),
        'torch.get_default_dtype()': torch.get_default_dtype(),
        'torch.get_default_device()': torch.get_default_device(),
        'torch.is_grad_enabled()': torch.is_grad_enabled(),
        'torch.is_inference_mode_enabled()': torch.is_inference_mode_enabled(),
        "torch.is_autocast_enabled('cpu')": torch.is_autocast_enabled('cpu'),
        "torch.is_autocast_enabled('cuda')": torch.is_autocast_enabled('cuda'),
        'torch.get_num_threads()': torch.get_num_threads(),
        'torch.cuda.is_available()': torch.cuda.is_available(),
        'dispatch modes entered (FakeTensorMode)': len(_get_current_dispatch_mode_stack()),
    }
    if hasattr(torch, 'accelerator'):   # from torch 2.6 on
        settings['torch.accelerator.is_available()'] = torch.accelerator.is_available()
    for kernel in ('flash', 'mem_efficient', 'math', 'cudnn'):
        name = f'torch.backends.cuda.{kernel}_sdp_enabled'
        settings[f'{name}()'] = getattr(backends.cuda, f'{kernel}_sdp_enabled')()
    # the precision every backend inherits, from torch 2.9 on (CUDA's own TF32 flags: allow_tf32 above; set back by
    # value, they may say 'ieee' where 'none' was, which is the same)
    for name, owner in {'': backends, '.mkldnn': backends.mkldnn}.items():
        precision = getattr(owner, 'fp32_precision', None)
        if precision is not None:
            settings[f'torch.backends{name}.fp32_precision'] = precision
    config = torch._dynamo.config
    for k, v in config.get_config_copy().items():
        settings[f'torch._dynamo.config.{k}'] = v
    # a name deleted from it (pytest's monkeypatch.setattr from 9.2 on, undone) is hidden, its value kept
    settings['torch._dynamo.config names deleted'] = [k for k, entry in config._config.items()
                                                      if getattr(entry, 'hide', False)]
    return settings


@pytest.fixture(autouse=True)
def leaves_the_signals_as_found():
    """A script's main run in this process (run_main) installs its handlers of SIGINT, SIGTERM, SIGUSR1 and SIGHUP,
    and ignores them once it stops: this process gets its own back after each test, and so do the processes it
    forks later (a loader's workers)."""
    names = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    handlers = {s: signal.getsignal(s) for s in names}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.fixture(autouse=True)
def leaves_torch_as_found():
    """Fails a test that leaves torch changed (a function replaced, a flag or a config set), naming what; the
    functions are put back, so that no later test runs on a stand-in.
    The random generators' states are not compared: tests and scripts seed them on purpose (util.engine.seed_all);
    the generators themselves (torch.Generator, torch.default_generator, the functions that seed and read them)
    are."""
    functions = {(owner, name): (label, getattr(owner, name), name in vars(owner))
                 for label, (owner, names) in REPLACEABLE.items() for name in names}
    settings = torch_settings()
    yield
    replaced = []
    for (owner, name), (label, f, own) in functions.items():
        if getattr(owner, name) is not f:
            replaced.append(f'{label}.{name} replaced')
            if own:
                setattr(owner, name, f)
            else:             # a class's, inherited (torch.Tensor's from torch._C.TensorBase)
                delattr(owner, name)
    now = torch_settings()
    changed = [f'{k} {settings.get(k)!r} -> {now.get(k)!r}' for k in {**settings, **now}
               if settings.get(k) != now.get(k)]
    if replaced or changed:
        pytest.fail('the test left torch changed: ' + '; '.join(replaced + changed), pytrace=False)


# a tiny run: the `fake` preset (depth 2, patch 8, 32x32) on 256 images, no worker processes
TINY = ['--data', 'fake', '--fake-size', '256', '--num-workers', '0']


@pytest.fixture
def repo_root():
    return ROOT


# the environment the tests were started in: what a script sets in os.environ when a test runs its main() in
# this process (PYTORCH_ALLOC_CONF), and the name of the test pytest puts there, never reach another process
SHELL_ENV = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}


def sub_env():
    return dict(SHELL_ENV, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')


_server = None


def run_script(*args, timeout=240, limits=()):
    """Run `python <args...>` from the repository root; returns the CompletedProcess (text). The process is
    forked from one that has imported torch already (tests/forkserver.py); TESTS_FORK=0 starts each afresh.
    limits: [(resource.RLIMIT_..., soft limit)], the process's own (a smaller machine, a full disk)."""
    global _server
    argv, env = [sys.executable, *map(str, args)], sub_env()
    if os.environ.get('TESTS_FORK') == '0':
        return forkserver.fresh(argv, ROOT, env, timeout, limits)
    if _server is None:
        _server = forkserver.Server(env, cwd=ROOT)
    return _server.run(argv, cwd=ROOT, env=env, timeout=timeout, limits=limits)


def pytest_unconfigure(config):
    if _server is not None:
        _server.close()


def finetune(out_dir, *args, check=True):
    """python finetune.py with the tiny preset into out_dir; check=True asserts success."""
    p = run_script('finetune.py', *TINY, '--out-dir', out_dir, *args)
    if check:
        assert p.returncode == 0, f'finetune.py failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}'
    return p


def made_once(tmp_path_factory, name, make):
    """The folder `name`, filled by make(folder) once for the whole test run: under `-n 2` (pytest-xdist) the first
    process to ask makes it while the other waits, then both read it (so no test may change it: a test that would
    works on a copy). A make that failed is made again by the next to ask, and fails there the same way."""
    worker = os.environ.get('PYTEST_XDIST_WORKER')
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if worker else shared    # the workers' folders share this run's parent
    folder = shared / name
    with open(shared / f'{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # let go when the file is closed
        if not (shared / f'{name}.made').exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (shared / f'{name}.made').touch()
    return folder


def read_metrics(out_dir):
    with open(os.path.join(str(out_dir), 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def blocks_run(model):
    """A list that records the index of every block of `model` as it runs."""
    ran = []
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(lambda mod, inp, out, i=i: ran.append(i))
    return ran


@contextlib.contextmanager
def tf32(matmul=None, cudnn=None):
    """TF32 for CUDA's matrix products (cuBLAS) and convolutions (cuDNN) set inside where given (None: as they are),
    and put back after, by value, whatever happens. By hand: torch has no scoped tool for cuBLAS's flag, and
    torch.backends.cudnn.flags' arguments differ between the torch versions in range. From torch 2.9 on the flag is a
    precision too, which cuBLAS's flag set back by value leaves at 'ieee' where it said 'none': it is put back too."""
    blas = torch.backends.cuda.matmul
    kept = blas.allow_tf32, torch.backends.cudnn.allow_tf32, getattr(blas, 'fp32_precision', None)
    try:
        if matmul is not None:
            blas.allow_tf32 = matmul
        if cudnn is not None:
            torch.backends.cudnn.allow_tf32 = cudnn
        yield
    finally:
        blas.allow_tf32, torch.backends.cudnn.allow_tf32 = kept[:2]
        if kept[2] is not None:
            blas.fp32_precision = kept[2]


@pytest.fixture
def exact_fp32():
    """fp32 on CUDA in true fp32: TF32 off (launch.setup turns it on for training), restored after."""
    with tf32(False, False):
        yield


def relative_distance(a, b):
    """|a - b| / |b| over whole tensors (L2): how far a result is from its reference."""
    return ((a - b).norm() / b.norm()).item()


def run_in_process(monkeypatch, module, *args):
    """Run a script's main() in this process, as `python <module>.py args` would (no interpreter start-up,
    no torch import): returns None if it succeeds, else the one-line message it exits with. What a script sets for
    its whole process (TF32 on a GPU, fp32 in tools/features.py) is put back after."""
    from util.launch import run_main
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py', *map(str, args)])
    try:
        with tf32():
            run_main(module.main)
    except SystemExit as e:
        assert isinstance(e.code, str) and '\n' not in e.code.strip(), f'exit {e.code!r}: expected one line'
        return e.code
    return None


def student_of(cfg, teacher, num_classes, layers, no_qk=False):
    """The student teacher.build_student makes for a teacher model in memory: the shape TransferConfig.resolve
    settles from the teacher's keywords (teacher.student_arch), with the layers ({student: teacher} or a list) and,
    no_qk, no query / key projections in them (a copy student's)."""
    from teacher import build_student, layer_pairs, student_arch
    cfg.NO_QK = no_qk
    pairs = layer_pairs(layers)
    arch = student_arch(cfg, {**teacher.arch, 'img_size': cfg.img_size}, pairs, None)
    return build_student(arch, cfg, num_classes)


# the fake preset's images (32 px, patches of 8); a teacher as people save one: 8 heads of 8
SHAPE = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=8)


def random_vit(**arch):
    """A ViT of SHAPE (10 classes) with the weights seed 0 draws; arch: keywords changed."""
    from vit import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(**{**SHAPE, 'num_classes': 10, **arch})


def digest(d):
    """{file name: SHA-256} of the files of folder d (None where there is no folder): what a refusal must leave."""
    return {p: hashlib.sha256(open(os.path.join(d, p), 'rb').read()).hexdigest()
            for p in sorted(os.listdir(d))} if os.path.isdir(d) else None


def assert_one_line_error(p, *words):
    """A finished process `p` that failed in one line on stderr naming each of `words`, with no traceback."""
    assert p.returncode != 0, f'expected a failure, got exit 0:\n{p.stdout[-2000:]}'
    err = p.stderr
    assert 'Traceback' not in err, err[-4000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and len(lines) <= 2, f'expected one error line, got {len(lines)}:\n{err[-4000:]}'
    assert 'error:' in lines[-1], lines[-1]
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


@pytest.fixture(scope='session')
def depth2_run(tmp_path_factory):
    """A finished tiny fine-tuning run (depth 2), made once for the whole test run, and its model as a plain
    state-dict file. Shared: a test that would change it works on a copy."""
    def make(folder):
        finetune(folder / 'depth2', '--max-steps', '2', '--amp', 'off')
        ck = torch.load(folder / 'depth2' / 'checkpoint.pt', map_location='cpu', weights_only=True)
        torch.save(ck['model'], folder / 'depth2_state_dict.pt')
    folder = made_once(tmp_path_factory, 'depth2', make)
    return folder / 'depth2', folder / 'depth2_state_dict.pt'

# -----------------------------------------------------------------------------
# Two processes under torchrun == one process with the same global batch (test_transfer_scripts.py, on
# distillation; test_resume.py)

SAME_MATHS = ['--amp', 'off', '--hflip', '0', '--crop-pad', '0', '--drop-path', '0', '--max-steps', '4',
              '--log-every', '1', '--blr', '0.01', '--warmup-epochs', '0']


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ce_by_step(out_dir):
    """{step: the cross-entropy its log line gives} of a run's log.txt."""
    with open(os.path.join(str(out_dir), 'log.txt')) as f:
        return {int(m.group(1)): float(m.group(2))
                for m in re.finditer(r'step (\d+)/\d+ \| ce ([0-9.]+)', f.read())}
