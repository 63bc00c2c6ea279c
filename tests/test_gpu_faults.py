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
