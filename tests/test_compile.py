"""`--compile true`: each script's student forward is one graph, compiled once and never again over the following
steps, on either attention implementation. The frozen teacher runs before it, uncompiled (its q and k handed in).
The start-up check compiles the student's layers it checks on sdpa before that, each on its own (Attention.forward,
a frame apart from the student's: tests/test_gpu_faults.py): counted apart.

On the CPU with dynamo's aot_eager backend (traces forward and backward like inductor, generates no code:
seconds); on CUDA (`python -m pytest -m gpu tests`) with the default inductor backend.
What this guards against: a per-step closure over the teacher's generator, called inside the student's
loop over blocks, breaks the graph there; dynamo then runs that loop eagerly and compiles each block on
its own, recompiling for every block's drop-path rate until its limit of 8 (ViT-B: 19 frames, 13 graphs).
"""
import contextlib
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import attention_copy
import attention_distill
from conftest import TINY, finetune as run_finetune, read_metrics
import finetune
import mae_pretrain
from vit import Attention

SCRIPTS = {'finetune': finetune, 'mae': mae_pretrain, 'copy': attention_copy, 'distill': attention_distill}
# (script, backend): on the CPU the two transfer methods; on CUDA every script
CASES = [('distill', 'aot_eager'), ('copy', 'aot_eager'), ('distill-sdpa', 'aot_eager'), ('copy-sdpa', 'aot_eager')] + \
    [pytest.param(script, 'inductor', marks=pytest.mark.gpu) for script in SCRIPTS]


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher')
    run_finetune(d, '--max-steps', '2')
    return str(d / 'checkpoint.pt')


def compiled_run(monkeypatch, script, out_dir, backend, *args):
    """Run a script's main() in this process with --compile true; what dynamo compiled from the run's torch.compile
    of its student on (the start-up check compiles the layers it checks before), from its counters. Any
    recompilation from there raises (error_on_recompile)."""
    compile = torch.compile
    recompiles = contextlib.ExitStack()   # refused from the run's compile to the end of main()

    def counted(model, **kwargs):
        if not isinstance(model, Attention):   # the run's
            counters.clear()
            recompiles.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
        return compile(model, **kwargs, backend=backend)
    monkeypatch.setattr(torch, 'compile', counted)
    script, _, implementation = script.partition('-')
    monkeypatch.setattr(sys, 'argv', [f'{script}.py', *TINY, '--out-dir', str(out_dir), '--compile', 'true',
                                      '--max-steps', '4', '--log-every', '1', *args,
                                      *(['--attn-implementation', implementation] if implementation else [])])
    torch._dynamo.reset()
    with recompiles:
        SCRIPTS[script].main()
    return dict(counters['frames']), counters['stats']['unique_graphs'], dict(counters['graph_break'])


@pytest.mark.parametrize('script, backend', CASES)
def test_compiled_student_is_one_graph_compiled_once(monkeypatch, tmp_path, teacher_ckpt, exact_fp32, script,
                                                     backend):
    teacher = ['--teacher', teacher_ckpt] if script.startswith(('copy', 'distill')) else []
    drop_path = [] if script == 'mae' else ['--drop-path', '0.1']    # a rate per block: constants dynamo guards on
    frames, graphs, breaks = compiled_run(monkeypatch, script, tmp_path, backend, *teacher, *drop_path)
    assert frames == {'total': 1, 'ok': 1} and graphs == 1 and not breaks, (frames, graphs, breaks)
    assert read_metrics(tmp_path)[-1]['step'] == 4


@pytest.mark.parametrize('implementation', ['eager', 'sdpa'])
def test_compiled_distillation_computes_the_eager_step(tmp_path, implementation):
    """The compiled student gives the uncompiled one's loss and gradients, step after step."""
    from attention_distill import DistillConfig, distill_loss_fn
    from vit import VisionTransformer, set_attn_implementation
    arch = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=4, drop_path_rate=0.0)
    torch.manual_seed(0)
    teacher = VisionTransformer(**{**arch, 'num_classes': 0}).requires_grad_(False).eval()
    students = [VisionTransformer(**arch) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    loss_fn = distill_loss_fn(DistillConfig(), teacher, [0, 1], None, implementation)
    for m in (teacher, *students):
        set_attn_implementation(m, implementation)
    torch._dynamo.reset()
    nets = [students[0], torch.compile(students[1], backend='aot_eager')]
    for step in range(2):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        losses = []
        for student, net in zip(students, nets):
            student.zero_grad()
            loss, parts = loss_fn(net, x, y)
            loss.backward()
            losses.append((loss.detach(), parts['attn']))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (n, p0), p1 in zip(students[0].named_parameters(), students[1].parameters()):
            torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=n)
