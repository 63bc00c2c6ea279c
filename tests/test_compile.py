"""`--compile true` (auto: on a GPU for the small data sets): the training step compiled whole. Each script's loss
function, the frozen teacher's forward, the student's and the loss (the map-free one's log-sum-exp a custom op), is one
graph compiled once and never again over the following steps (a new lr each), its backward AOTAutograd's, and
nothing else compiled (the optimizer's step eager, build_optimizer); on the stand-in CUDA device
(tests/standin_cuda.py) the compiled step asks the host for nothing and is captured as CUDA graphs; losses and
gradients are eager's. The start-up check compiles the layers it checks on sdpa before that, each on its own: counted
apart.

On the CPU with dynamo's aot_eager backend (traces forward and backward like inductor, generates no code: seconds);
on CUDA (`python -m pytest -m gpu tests`) with the default inductor backend.
What this guards against: a per-step closure over the teacher's generator, called inside the student's loop over
blocks, breaks the graph there; dynamo then runs that loop eagerly and compiles each block on its own, recompiling
for every block's drop-path rate until its limit of 8 (ViT-B: 19 frames, 13 graphs); a loss that takes gradients
inside its forward (MapFreeCrossEntropy) stops the graph.
"""
import contextlib
from types import SimpleNamespace
import re

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.testing import CompileCounterWithBackend
from torch._guards import TracingContext
from torch._subclasses.fake_tensor import FakeTensor

import attention_copy
import attention_distill
from conftest import TINY, finetune as run_finetune, read_metrics, run_in_process
import finetune
import mae_pretrain
from test_standin_scripts import on_standin
from tools.benchmark import BenchConfig, configure
from tools.benchmark_cases import Parts
from util import launch
from vit import Attention, VisionTransformer, scores, set_attn_implementation

SCRIPTS = {'finetune': finetune, 'mae': mae_pretrain, 'copy': attention_copy, 'distill': attention_distill}
TRANSFER = ('copy', 'distill', 'copy-sdpa', 'distill-sdpa')
COMPILE = torch.compile   # torch's own, which a test replaces with a Compiled


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher')
    run_finetune(d, '--max-steps', '2')
    return str(d / 'checkpoint.pt')


class Compiled:
    """torch.compile as the code calls it, recorded: each call's function, the mode it asked for, and a counter of the
    graphs dynamo handed its backend (aot_eager, or `backend`; None: torch.compile as asked, mode and all, uncounted).
    From the step's first compilation on, a recompilation raises (error_on_recompile, until the test ends); the
    start-up check's compilations of single layers and of its loss come before it."""

    def __init__(self, stack, backend='aot_eager'):
        self.stack = stack
        self.backend = backend
        self.calls = []

    def __call__(self, fn, mode=None, **kwargs):
        counter = CompileCounterWithBackend(self.backend)
        self.calls.append((fn, mode, counter))
        if not self.checks(fn):
            self.stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
        if self.backend is None:
            return COMPILE(fn, mode=mode, **kwargs)
        return COMPILE(fn, backend=counter, **kwargs)

    @staticmethod
    def checks(fn):
        """Whether a compiled function is the start-up check's (a layer, its loss), not the step's."""
        return isinstance(fn, Attention) or getattr(fn, '__name__', '') == 'loss'

    def of_step(self):
        """The names of the functions compiled for the step, in order."""
        return [getattr(fn, '__name__', fn) for fn, _, _ in self.calls if not self.checks(fn)]

    def of(self, name):
        """(mode, counter) of the one compilation of the function named `name` (loss_fn, step)."""
        found = [(mode, c) for fn, mode, c in self.calls if getattr(fn, '__name__', '') == name]
        assert len(found) == 1, [getattr(fn, '__name__', fn) for fn, _, _ in self.calls]
        return found[0]


def refakified(backend='aot_eager'):
    """A compiler backend handed the graph's inputs in dynamo's own fake mode: torch 2.10 hands a backend the
    stand-in's fake tensors as they are, which AOTAutograd refuses as a second fake mode; newer torch fakes them
    again itself."""
    compile = lookup_backend(backend)

    def compiler(graph, inputs, **kwargs):
        mode = TracingContext.get().fake_mode
        inputs = [mode.from_tensor(t) if isinstance(t, FakeTensor) and t.fake_mode is not mode else t for t in inputs]
        return compile(graph, inputs, **kwargs)
    return compiler


def script_args(script, teacher):
    script, _, implementation = script.partition('-')
    args = ['--teacher', teacher] if script in ('copy', 'distill') else []
    if implementation:
        args += ['--attn-implementation', implementation]
    return SCRIPTS[script], args


def lrs(out_dir):
    return re.findall(r'\| lr (\S+) \|', (out_dir / 'log.txt').read_text())


def same_weights(ours, theirs):
    """Two state dicts equal to float rounding, but for the key biases: a key bias shifts all the logits of a row
    alike, so its gradient is 0 but for rounding, which AdamW scales up to steps of the lr's size."""
    for name, weight in theirs.items():
        mine = ours[name]
        if name.endswith('attn.qkv.bias'):
            mine, weight = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (mine, weight))   # q, v
        torch.testing.assert_close(mine, weight, rtol=1e-4, atol=1e-6, msg=name)


def compiled_run(monkeypatch, out_dir, module, *args):
    """A script's main() in this process with --compile true, recorded (Compiled); four steps, whose lr rises (the
    warm-up), logged each."""
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        compiled = Compiled(stack)
        monkeypatch.setattr(torch, 'compile', compiled)
        msg = run_in_process(monkeypatch, module, *TINY, '--out-dir', out_dir, '--max-steps', '4', '--log-every', '1',
                             *args)
    assert msg is None, msg
    return compiled


def one_graph(compiled, out_dir, script):
    """The run's loss function (the teacher's forward and the loss included) one graph, compiled once and never again
    over steps of four lrs; nothing else of the step compiled (the optimizer's step eager)."""
    mode, step = compiled.of('loss_fn')
    assert step.frame_count == 1, f'{step.frame_count} graphs: a graph break or a recompilation'
    inputs = [n.name for n in step.graphs[0].graph.nodes if n.op == 'placeholder']
    if script in TRANSFER:   # the teacher's forward is in the step's graph: its weights are the graph's inputs
        assert any('teacher' in name for name in inputs), inputs
    ops = {n.target for n in step.graphs[0].graph.nodes}
    assert (torch.ops.attention_transfer.log_sum_exp.default in ops) == (script == 'distill-sdpa')
    assert mode == 'default' and compiled.of_step() == ['loss_fn']      # CUDA graphs on a GPU only
    assert len(set(lrs(out_dir))) == 4 and read_metrics(out_dir)[-1]['step'] == 4


@pytest.mark.parametrize('script', ['finetune', 'mae', *TRANSFER])
def test_the_compiled_step_is_one_graph_and_trains_as_eager_does(monkeypatch, tmp_path, teacher_ckpt, script):
    """Four steps in fp32, eager and compiled: the compiled step one graph (one_graph), fine-tuning's with drop-path
    (a rate per block: constants dynamo guards on) and MAE's with its masks drawn in the step; the same losses at
    every step, the same weights after (float rounding apart), the same evaluation."""
    module, args = script_args(script, teacher_ckpt)
    if script == 'finetune':
        args += ['--drop-path', '0.1']
    for choice in ('false', 'true'):
        compiled = compiled_run(monkeypatch, tmp_path / choice, module, '--compile', choice, '--amp', 'off', *args)
    one_graph(compiled, tmp_path / 'true', script)
    logs = [(tmp_path / c / 'log.txt').read_text() for c in ('false', 'true')]
    losses = [re.findall(r'step \d/4 \| ([^|]+) \|', log) for log in logs]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    models = [torch.load(tmp_path / c / 'checkpoint.pt', weights_only=True)['model'] for c in ('false', 'true')]
    same_weights(models[1], models[0])
    metrics = [read_metrics(tmp_path / c)[-1] for c in ('false', 'true')]
    assert [m.get('top1') for m in metrics] == [metrics[0].get('top1')] * 2     # MAE's: none
    loss = 'mse' if script == 'mae' else 'loss'                                  # MAE's evaluation
    assert metrics[1][loss] == pytest.approx(metrics[0][loss], rel=1e-4)
    assert 'step: eager (' in logs[0] and '; --compile false)' in logs[0] and 'step: compiled (' in logs[1]


@pytest.mark.gpu
@pytest.mark.parametrize('script', ['finetune', 'mae', *TRANSFER])
def test_on_a_gpu_the_step_is_captured_and_trains_as_eager_does(monkeypatch, tmp_path, teacher_ckpt, exact_fp32,
                                                                script):
    """On CUDA, inductor and CUDA graphs ('reduce-overhead'), as a run compiles: four steps in fp32 (TF32 as a run
    sets it, both ways), compiled never again, their losses eager's (float rounding apart: inductor fuses). On CUDA
    inductor draws its own random numbers, so MAE's masks would be other masks than eager's: here it draws eager's."""
    module, args = script_args(script, teacher_ckpt)
    monkeypatch.setattr(torch._inductor.config, 'fallback_random', True)
    for choice in ('false', 'true'):
        torch._dynamo.reset()
        with contextlib.ExitStack() as stack:
            compiled = Compiled(stack, backend=None)
            monkeypatch.setattr(torch, 'compile', compiled)
            msg = run_in_process(monkeypatch, module, *TINY, '--out-dir', tmp_path / choice, '--max-steps', '4',
                                 '--log-every', '1', '--compile', choice, '--cuda-graph', 'false', '--amp', 'off',
                                 *args)
        assert msg is None, msg
    assert compiled.of('loss_fn')[0] == 'reduce-overhead' and compiled.of_step() == ['loss_fn']
    losses = [[float(v) for v in re.findall(r'step \d/4 \| \w+ ([\d.]+)', (tmp_path / c / 'log.txt').read_text())]
              for c in ('false', 'true')]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_the_compiled_map_free_distillation_is_one_graph_computing_eager_s():
    """The whole loss function of map-free distillation, teacher and loss included, compiled as one graph (fullgraph:
    a graph break raises), gives the uncompiled one's loss and gradients (MapFreeCrossEntropy's), step after step."""
    implementation = 'sdpa'
    from attention_distill import DistillConfig, distill_loss_fn
    arch = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=4, drop_path_rate=0.0)
    torch.manual_seed(0)
    teacher = VisionTransformer(**{**arch, 'num_classes': 0}).requires_grad_(False).eval()
    students = [VisionTransformer(**arch) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    for m in (teacher, *students):
        set_attn_implementation(m, implementation)
    loss_fn = distill_loss_fn(DistillConfig(), teacher, [0, 1], None, implementation)
    torch._dynamo.reset()
    steps = [loss_fn, torch.compile(loss_fn, backend='aot_eager', fullgraph=True)]
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        losses = []
        for student, step in zip(students, steps):
            student.zero_grad()
            loss, parts = step(student, x, y)
            loss.backward()
            losses.append((loss.detach(), parts['attn']))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (n, p0), p1 in zip(students[0].named_parameters(), students[1].parameters()):
            torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_the_log_sum_exp_op_s_fake_and_autograd_are_the_real_ones():
    """attention_transfer::log_sum_exp, the fused kernel's private entry point as a custom op: torch's opcheck (its
    schema, its fake implementation's shapes, dtypes and strides against the real one's, its autograd registration,
    AOTAutograd tracing it), and its value and formula against the definition in float64 (gradcheck)."""
    from attention_distill import log_sum_exp
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 3, 17, 8).bfloat16().unbind(0)             # (B, H, N, d) each, as under autocast
    torch.library.opcheck(log_sum_exp, (q.requires_grad_(), k.requires_grad_()))
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    torch.testing.assert_close(log_sum_exp(q64, k64), torch.logsumexp(scores(q64, k64), -1))
    assert torch.autograd.gradcheck(log_sum_exp, (q64, k64))


@pytest.mark.parametrize('method', ['train', 'distill'])
def test_the_benchmark_s_compiled_case_is_the_step_a_compiled_run_trains(monkeypatch, method):
    """tools/benchmark.py's `compile` path times the step `--compile true` trains: the method's loss function compiled
    whole, once over its steps (distillation's graph takes the teacher's weights as inputs: its forward is in it), and
    nothing else (the optimizer's step eager, as a run's). It compiled the student alone; the teacher's forward and the
    loss ran eagerly, so its ratios were not the ones a compiled run trains at."""
    cfg, _ = configure(BenchConfig(device='cpu', quick=True))
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        compiled = Compiled(stack)
        monkeypatch.setattr(torch, 'compile', compiled)
        step = Parts(cfg, 'vit_tiny', torch.device('cpu')).step(method, 'compile', batch=2)
        for _ in range(3):
            step()
    mode, counter = compiled.of('loss_fn')
    assert mode == 'default' and counter.frame_count == 1 and compiled.of_step() == ['loss_fn']
    inputs = [n.name for n in counter.graphs[0].graph.nodes if n.op == 'placeholder']
    assert any('teacher' in name for name in inputs) == (method == 'distill'), inputs


@pytest.mark.parametrize('script', ['finetune', 'distill-sdpa'])
def test_the_compiled_step_asks_the_host_for_nothing_on_the_device(monkeypatch, tmp_path, teacher_ckpt, script):
    """On the stand-in CUDA device (its strict epochs: a host sync or a host tensor read in a step fails), a compiled
    run's steps, its loss function compiled as CUDA graphs ('reduce-overhead'), its optimizer's step eager."""
    module, args = script_args(script, teacher_ckpt)
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack, on_standin('held', module) as cuda:
        # dynamo asks a GPU it sees for its stream (the stand-in's torch.cuda answers whether it is capturing)
        cuda.patch(torch.accelerator, 'is_available', lambda: False)
        compiled = Compiled(stack, backend=refakified())
        cuda.patch(torch, 'compile', compiled)
        msg = run_in_process(monkeypatch, module, *TINY, '--fake-size', '128', '--out-dir', tmp_path,
                             '--compile', 'true', '--cuda-graph', 'false', '--max-steps', '2', '--log-every', '1',
                             *args)
    assert msg is None, msg
    assert compiled.of('loss_fn')[0] == 'reduce-overhead' and compiled.of_step() == ['loss_fn']
    assert compiled.of('loss_fn')[1].frame_count == 1


def test_compile_auto_compiles_on_a_gpu_where_the_run_repays_the_compilation():
    """--compile auto: on CUDA for the small sets held in memory, in a run of enough steps to repay the compilation
    (launch.COMPILE_REPAID, per process: the global batch divides the set); never on a CPU, nor for ImageNet (a step
    long enough to keep a GPU busy) or the fake set; true and false as said."""
    cuda, cpu = torch.device('cuda', 0), torch.device('cpu')

    def compiled(data='fashion-mnist', device=cuda, world=1, compile='auto', **run):
        cfg = SimpleNamespace(**{'data': data, 'compile': compile, 'batch_size': 128, 'accum_steps': 1, 'epochs': 9,
                                 'max_steps': 0, **run})
        return launch.compiled_step(cfg, device, world)[0]
    assert compiled()                                   # the preset: 9 epochs of 469 steps
    assert not compiled(epochs=3)                       # the reproduction's stages
    assert not compiled(epochs=100, max_steps=3999) and compiled(epochs=100, max_steps=4000)
    assert not compiled(world=2) and not compiled(accum_steps=2)
    assert compiled(data='cifar10', epochs=100, batch_size=256) and compiled(data='cifar100', epochs=21)
    assert not compiled(data='cifar10', epochs=20, batch_size=256)
    for data in ('fashion-mnist', 'cifar10', 'cifar100'):
        assert not compiled(data, cpu, epochs=100)
    for data in ('imagenet', 'folder', 'fake'):
        assert not compiled(data, epochs=100)
    assert compiled('imagenet', cpu, compile='true') and not compiled(compile='false')
