"""Faults of the GPU path that a CPU can still see: the start-up check's definition without TF32, a kernel's error as
a verdict, the CUDA generator's state in a checkpoint, a compiled run's layers checked compiled."""
from types import SimpleNamespace

import pytest
import torch

from conftest import free_port, tf32
from standin_cuda import standin_cuda
from util import attention_check
from util.config import ConfigError


def plan(choice='auto', dtype=None):
    logged = []
    return SimpleNamespace(dtype=dtype, device=torch.device('cpu'), log=logged.append,
                           cfg=SimpleNamespace(attn_implementation=choice)), logged


def part(compute, device='cpu'):
    q = torch.randn(2, 4, 17, 16, device=device)
    return {'layer 0': (compute, (q, q, q), {})}


def tf32_seen(device):
    """(implementation, TF32 on for matrix products) of each computation of an fp32 check on device, with TF32 on as
    processes() turns it on for a run on CUDA (convolutions too: none is checked)."""
    seen = []

    def compute(implementation, dtype):
        seen.append((implementation, torch.backends.cuda.matmul.allow_tf32))
        return {'output': torch.ones(3, device=device)}
    p = plan()[0]
    p.device = torch.device(device)
    with tf32(True, True):
        attention_check.check_sdpa(p, 'fine-tuning', part(compute, device))
        assert torch.backends.cuda.matmul.allow_tf32
    return seen


def test_the_definition_is_computed_without_tf32():
    """An fp32 run on CUDA has TF32 on (processes()): the definition (eager, fp32) is computed without it, eager as the
    run runs and sdpa with it; TF32 is on again after the check."""
    with standin_cuda():
        seen = tf32_seen('cuda:0')
    assert seen == [('eager', False), ('eager', True), ('sdpa', True)]


def test_eager_is_computed_once_where_tf32_cannot_differ():
    """On a CPU an fp32 eager run is the definition itself (TF32 is CUDA's): computed once, not twice."""
    assert tf32_seen('cpu') == [('eager', False), ('sdpa', True)]


@pytest.mark.parametrize('error', [ValueError, RuntimeError, IndexError])
def test_any_error_a_kernel_raises_is_a_verdict(error):
    """auto goes on with eager, --attn-implementation sdpa stops in one line; neither ends in a traceback."""
    def compute(implementation, dtype):
        if implementation == 'sdpa':
            raise error('no kernel for these strides')
        return {'output': torch.ones(3)}
    p, logged = plan('auto')
    implementation, _ = attention_check.check_sdpa(p, 'fine-tuning', part(compute))
    assert implementation == 'eager' and 'no kernel for these strides' in logged[-1]
    with pytest.raises(ConfigError, match='no kernel for these strides'):
        attention_check.check_sdpa(plan('sdpa')[0], 'fine-tuning', part(compute))


def run_of(device, saved):
    """A Run's state for Run.save and Run.restore (util/run.py), on `device`, mid-epoch (step 3 of 10 an epoch); a
    checkpoint is kept in `saved` instead of a file."""
    from finetune import FinetuneConfig
    from util.run import Run
    model = torch.nn.Linear(2, 2)
    model.arch = {}
    p = SimpleNamespace(device=torch.device(device), world=1, rank=0, main=True, log=[].append)
    p.run_dir = SimpleNamespace(save=saved.update, checkpoint='checkpoint.pt', keep_metrics=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = SimpleNamespace(plan=p, cfg=FinetuneConfig(), model=model, ema=None, opt=opt, classes=None,
                          scaler=torch.amp.GradScaler('cpu', enabled=False), step=3, steps_per_epoch=10,
                          metrics={}, extra={}, record=None, seconds=lambda: 1.0, data='its training split')
    return run, Run


def test_a_checkpoint_keeps_and_restores_the_cuda_generator(monkeypatch):
    """Drop-path and MAE's masks draw from the CUDA generator on a GPU: a mid-epoch resume continues its stream
    (this rank's), as it continues the CPU's; a checkpoint without it resumes, its generator drawing anew."""
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': cuda_state.clone())
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append(state))
    saved = {}
    run, Run = run_of('cuda', saved)
    Run.save(run)
    assert torch.equal(saved['cuda_rng'][0], cuda_state)
    run.plan.resumed = dict(saved)   # the checkpoint the resolve phase read (restore takes its tensors out)
    Run.restore(run)
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    del saved['cuda_rng']   # an older checkpoint
    run.plan.resumed = dict(saved)
    assert Run.restore(run)[0] == 3 and len(restored) == 1


@pytest.mark.parametrize('backward', [True, False], ids=['training', 'evaluation'])
def test_the_kernel_named_is_asked_for_the_steps_inputs(backward, monkeypatch):
    """torch picks a kernel per input, a gradient included (on a GPU, flash for inputs without one, another with):
    the log names the one asked for inputs that need a gradient exactly where the run trains."""
    asked = []
    monkeypatch.setattr(torch, '_fused_sdp_choice', lambda q, k, v, *a, **kw: asked.append(q.requires_grad) or 0)

    def compute(implementation, dtype):
        out = {'output': torch.ones(3)}
        if backward:
            out['q grad'] = torch.ones(3)
        return out
    parts = part(compute)
    attention_check.check_sdpa(plan()[0], 'fine-tuning', parts)
    assert asked == [backward] and not parts['layer 0'][1][0].requires_grad


# (--attn-implementation, the rank whose fused kernel is 5% off, what both ranks end with); the refusal last
VERDICTS = [('auto', 1, 'sdpa'), ('auto', 0, 'eager'), ('sdpa', 0, 'refused: start-up check: ')]


def settle_on(rank, port, out):
    """One of two gloo processes: for each case of VERDICTS, the start-up check of a small ViT's first layer, sdpa
    wrong on the case's rank; writes what this rank ends with (its implementation, or the refusal it raised) to
    out/<case>-<rank>."""
    import datetime
    import json
    import os
    import torch.distributed as dist
    import torch.nn.functional as F
    from util.attention_check import settle_attention
    from util.launch import Plan
    from vit import VisionTransformer
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    real = F.scaled_dot_product_attention
    for case, (choice, wrong_on, _) in enumerate(VERDICTS):
        F.scaled_dot_product_attention = (lambda *a, **kw: real(*a, **kw) * 1.05) if rank == wrong_on else real
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
        x = torch.randn(4, 3, 32, 32)
        cfg = SimpleNamespace(attn_implementation=choice, compile=False)
        p = Plan(cfg, rank, 2, torch.device('cpu'), None, 'sdpa', SimpleNamespace(log=lambda line: None),
                 None, None)
        try:
            settled, _ = settle_attention(p, 'test', [model], lambda: model.forward_tokens(x, depth=1),
                                          {'layer 0': model.blocks[0].attn})
            said = settled if model.blocks[0].attn.implementation == settled else 'models elsewhere'
        except ConfigError as e:
            said = f'refused: {e}'
        with open(os.path.join(out, f'{case}-{rank}'), 'w') as f:
            json.dump(said, f)
    F.scaled_dot_product_attention = real
    dist.destroy_process_group()


def test_under_ddp_every_rank_takes_rank_0_s_verdict(tmp_path):
    """Two processes (gloo) whose kernels differ: both train on rank 0's verdict, and a refusal there stops both at once
    with its line (the other is not left waiting for a peer that stopped)."""
    import json
    import torch.multiprocessing as mp
    mp.spawn(settle_on, (free_port(), str(tmp_path)), nprocs=2, join=True)
    for case, (choice, wrong_on, expected) in enumerate(VERDICTS):
        said = [json.loads((tmp_path / f'{case}-{rank}').read_text()) for rank in (0, 1)]
        assert said[0] == said[1] and said[0].startswith(expected), (choice, wrong_on, said)


def test_the_map_free_loss_s_entry_point_suits_the_dtype_and_is_remembered(monkeypatch):
    """On CUDA the map-free loss asks, in fp32, the efficient kernel alone (torch 2.11's cuDNN entry point took fp32
    and gave NaN on an H100); in half precision the first of CUDA_LSE that takes the inputs, once per dtype and shape,
    not on every call."""
    import attention_distill
    tried = []

    def entry(name, takes):
        def call(q, k, v):
            tried.append(name)
            if not takes:
                raise RuntimeError(f'{name}: not on this GPU')
            return q * 1.0, q.new_zeros(q.shape[:-1], dtype=torch.float32)
        return call
    monkeypatch.setattr(attention_distill, 'CUDA_LSE', {'cudnn': entry('cudnn', False), 'flash': entry('flash', True),
                                                        'efficient': entry('efficient', True)})
    monkeypatch.setattr(attention_distill, 'LSE_RAN', {}, raising=False)
    with standin_cuda():
        q = torch.randn(2, 4, 17, 16, device='cuda:0')
        for _ in range(2):
            attention_distill.attention_with_lse(q, q, q)
        assert tried == ['efficient'] * 2
        half = q.bfloat16()
        for _ in range(3):
            out, lse = attention_distill.attention_with_lse(half, half, half)
        assert out.shape == q.shape and lse.shape == q.shape[:-1]
        attention_distill.attention_with_lse(half[:1], half[:1], half[:1])      # another shape: asked afresh
    assert tried[2:] == ['cudnn', 'flash', 'flash', 'flash', 'cudnn', 'flash']


@pytest.mark.parametrize('script', ['finetune', 'attention_distill'])
def test_the_check_runs_at_the_run_s_batch_size(monkeypatch, tmp_path, script):
    """A kernel wrong only above 32 images (a grid that grows with the batch) is met by the check of a run at a batch
    of 40: --attn-implementation sdpa stops before anything has run on it."""
    import importlib
    import os
    import torch.nn.functional as F
    from conftest import ROOT, TINY, run_in_process
    real = F.scaled_dot_product_attention

    def wrong_above_32(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        return out * 1.05 if q.shape[0] > 32 else out
    monkeypatch.setattr(F, 'scaled_dot_product_attention', wrong_above_32)
    teacher = ['--teacher', os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), '--img-size', '28',
               '--layers', '0-4', '--transfer', 'q'] if script == 'attention_distill' else []
    msg = run_in_process(monkeypatch, importlib.import_module(script), *TINY, *teacher, '--batch-size', '40',
                         '--max-steps', '1', '--amp', 'off', '--attn-implementation', 'sdpa',
                         '--out-dir', tmp_path / 'r')
    assert msg and msg.startswith('error: start-up check: ') and '(40, ' in msg, msg
    assert not (tmp_path / 'r').exists()


@pytest.mark.parametrize('script', ['ensemble', 'evaluate'])
def test_scoring_checks_at_the_batch_it_scores_with(monkeypatch, tmp_path, script):
    """ensemble.py and evaluate.py checked the kernel on 8 images: one wrong only above 32 images changed the printed
    top-1 and was scored. At --batch-size 40, --attn-implementation sdpa stops before any model is scored."""
    import importlib
    import torch.nn.functional as F
    from conftest import TINY, run_in_process
    from vit import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=10)
    torch.save({'model': model.state_dict(), 'arch': model.arch}, tmp_path / 'model.pt')
    real = F.scaled_dot_product_attention

    def wrong_above_32(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        return out * 1.05 if q.shape[0] > 32 else out
    monkeypatch.setattr(F, 'scaled_dot_product_attention', wrong_above_32)
    args = [*TINY, '--models', tmp_path / 'model.pt']
    if script == 'evaluate':   # its fake test split: 512 images
        args = ['--data', 'fake', '--num-workers', '0', '--models', tmp_path / 'model.pt', '--out', tmp_path / 'out']
    msg = run_in_process(monkeypatch, importlib.import_module(script), *args,
                         '--batch-size', '40', '--amp', 'off', '--attn-implementation', 'sdpa')
    assert msg and msg.startswith('error: start-up check: ') and '(40, ' in msg, msg
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('script', ['attention_copy', 'attention_distill'])
def test_the_teacher_s_own_fused_calls_are_checked_at_its_head_width(monkeypatch, tmp_path, script):
    """A student of 4 heads of 16 given a teacher of 8 heads of 8: a kernel wrong only at the teacher's head width
    (its own attention, in the layers before those it hands over) stops --attn-implementation sdpa at the start."""
    import importlib
    import os
    import torch.nn.functional as F
    from conftest import ROOT, TINY, run_in_process
    real = F.scaled_dot_product_attention

    def wrong_at_width_8(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        return out * 1.05 if q.shape[-1] == v.shape[-1] == 8 else out
    monkeypatch.setattr(F, 'scaled_dot_product_attention', wrong_at_width_8)
    msg = run_in_process(monkeypatch, importlib.import_module(script), *TINY, '--teacher',
                         os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), '--img-size', '28', '--layers', '1-4',
                         '--num-heads', '4', '--batch-size', '8', '--max-steps', '1', '--amp', 'off',
                         '--attn-implementation', 'sdpa', '--out-dir', tmp_path / 'r')
    assert msg and msg.startswith('error: start-up check: ') and 'teacher layer 0' in msg, msg
    assert not (tmp_path / 'r').exists()


def wrong_when_compiled(gm, example_inputs):
    """A compile backend: aot_eager, with each fused attention's gradient 5% off (its forward exact), as a kernel
    whose backward goes wrong only under the compiler (cuDNN's, handed a non-contiguous incoming gradient)."""
    import torch.nn.functional as F
    from torch._dynamo.backends.debugging import aot_eager
    real = F.scaled_dot_product_attention

    def wrong_gradient(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * 1.05 - out.detach() * 0.05
    for node in gm.graph.nodes:
        if node.target is real:
            node.target = wrong_gradient
    gm.recompile()
    return aot_eager(gm, example_inputs)


@pytest.mark.parametrize('choice', ['auto', 'sdpa'])
def test_a_compiled_run_s_check_runs_the_attention_compiled(monkeypatch, tmp_path, choice):
    """--compile true with fused attention whose gradients are wrong only when compiled: the check meets it (the
    student's layer compiled as the run compiles it), auto trains on eager and --attn-implementation sdpa stops before
    anything is written."""
    import functools
    import torch._dynamo
    import finetune
    from conftest import TINY, run_in_process
    from util import launch
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=wrong_when_compiled))
    monkeypatch.setitem(launch.AUTO_ATTN, 'cpu', ('sdpa', 'as on a GPU'))
    torch._dynamo.reset()
    msg = run_in_process(monkeypatch, finetune, *TINY, '--compile', 'true', '--batch-size', '8',
                         '--max-steps', '1', '--amp', 'off', '--attn-implementation', choice,
                         '--out-dir', tmp_path / 'r')
    if choice == 'sdpa':
        assert msg and msg.startswith('error: start-up check: ') and 'layer 0 q grad' in msg, msg
        assert not (tmp_path / 'r').exists()
    else:
        assert msg is None, msg
        assert 'falling back to eager' in (tmp_path / 'r' / 'log.txt').read_text()
