"""Faults of the GPU path that a CPU can still see: the start-up check's definition without TF32, a kernel's error as
a verdict, the CUDA generator's state in a checkpoint."""
from types import SimpleNamespace

import pytest
import torch

from util import attention_check
from util.config import ConfigError


def plan(choice='auto', dtype=None):
    logged = []
    return SimpleNamespace(dtype=dtype, device=torch.device('cpu'), log=logged.append,
                           cfg=SimpleNamespace(attn_implementation=choice)), logged


def part(compute):
    q = torch.randn(2, 4, 17, 16)
    return {'layer 0': (compute, (q, q, q), {})}


def test_the_definition_is_computed_without_tf32(monkeypatch):
    """An fp32 run on CUDA has TF32 on (processes()): the definition (eager, fp32) is computed without it, eager as the
    run runs and sdpa with it; TF32 is on again after the check."""
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', True)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    seen = []

    def compute(implementation, dtype):
        seen.append((implementation, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return {'output': torch.ones(3)}
    attention_check.check_sdpa(plan()[0], 'fine-tuning', part(compute))
    assert seen == [('eager', False, False), ('eager', True, True), ('sdpa', True, True)]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


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
    p.run_dir = SimpleNamespace(save=saved.update, checkpoint='checkpoint.pt', add_metrics=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = SimpleNamespace(plan=p, cfg=FinetuneConfig(), model=model, ema=None, opt=opt, classes=None,
                          scaler=torch.amp.GradScaler('cpu', enabled=False), step=3, steps_per_epoch=10,
                          metrics={}, extra={}, record=None, seconds=lambda: 1.0)
    return run, Run


def test_a_checkpoint_keeps_and_restores_the_cuda_generator(monkeypatch):
    """Drop-path and MAE's masks draw from the CUDA generator on a GPU: a mid-epoch resume continues its stream
    (this rank's), as it continues the CPU's; a checkpoint without it resumes with one line saying so."""
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
    logged = []
    run.plan.log = logged.append
    del saved['cuda_rng']   # an older checkpoint
    run.plan.resumed = dict(saved)
    Run.restore(run)
    assert len(restored) == 1 and len(logged) == 1 and 'no CUDA generator state' in logged[0]


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
