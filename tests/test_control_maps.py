"""--maps uniform | local: the controls of distillation pull the student's attention toward a map no teacher made:
every token attended to alike, or a fixed locality prior, the same for every image, layer and head. Their maps
against the rule written out in float64, the loss against its definition with the teacher never asked, and the
refusals where a control means nothing."""
import math

import pytest
import torch

import attention_distill
from attention_distill import DistillConfig, attention_cross_entropy, control_logits, distill_loss_fn
from conftest import TINY, run_in_process, student_of
from test_average_maps import LAYERS, TEACHER, teacher_file  # noqa: F401 (a fixture)
from vit import VisionTransformer


def written_out(kind, grid, prefix):
    """The controls' maps (N, N), probabilities in float64, one entry at a time: uniform rows; a patch's row
    exp(-d**2 / 2) over the patches at distance d (in patches), 1 for each prefix token, normalised; a prefix
    token's row uniform."""
    where = [None] * prefix + [(r, c) for r in range(grid) for c in range(grid)]
    rows = []
    for a in where:
        row = [1.0 if kind == 'uniform' or a is None or b is None else
               math.exp(-((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) / 2) for b in where]
        rows.append([v / sum(row) for v in row])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize('kind', ['uniform', 'local'])
@pytest.mark.parametrize('grid, prefix', [(4, 1), (3, 5)])
def test_the_control_maps_are_the_rule(kind, grid, prefix):
    maps = control_logits(kind, grid, prefix).double().softmax(-1)
    assert torch.allclose(maps, written_out(kind, grid, prefix), atol=1e-6)
    if kind == 'local':   # patch (1, 1) attends most to itself and the prefix, then to (0, 1), then to (0, 0)
        p = maps[prefix + grid + 1]
        assert p[prefix + grid + 1] == p[0] > p[prefix + 1] > p[prefix]


class Untouchable(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError('a control asked the teacher')

    def __getattr__(self, name):
        raise AssertionError(f'a control asked the teacher for {name}')


@pytest.mark.parametrize('kind', ['uniform', 'local'])
def test_distillation_pulls_toward_the_control_alone(kind):
    torch.manual_seed(0)
    teacher = VisionTransformer(**TEACHER).requires_grad_(False).eval()
    for block in teacher.blocks:                # sharp maps, far from either control's
        block.attn.qkv.weight.mul_(6)
    cfg = DistillConfig(img_size=32, teacher='t.pt', maps=kind)
    student = student_of(cfg, teacher, 10, LAYERS)
    student.load_state_dict(teacher.state_dict(), strict=False)   # the teacher's own maps: far from a control
    control = control_logits(kind, student.patch_embed.grid, 1).expand(student.num_heads, -1, -1)
    x = torch.randn(3, 3, 32, 32)
    _, parts = distill_loss_fn(cfg, Untouchable(), LAYERS, None, 'eager', control)(student, x, torch.arange(3))
    _, own = student(x, keep={i: ('logits',) for i in LAYERS})
    target = written_out(kind, student.patch_embed.grid, 1).log().float()
    expected = sum(attention_cross_entropy(target.expand_as(own[i]['logits']), own[i]['logits']) for i in LAYERS)
    assert torch.allclose(parts['attn'], expected, rtol=1e-5), (parts['attn'], expected)
    # not the teacher's maps: the teacher's loss is another number
    maps = teacher.attention(x, LAYERS)
    assert (sum(attention_cross_entropy(maps[i], own[i]['logits']) for i in LAYERS) - expected).abs() > 0.01


def run(monkeypatch, out, teacher, *args):
    return run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', out, '--teacher', teacher,
                          '--max-steps', '2', '--amp', 'off', '--layers', '0,2', *args)


def test_a_control_run_trains_and_says_so(monkeypatch, tmp_path, teacher_file):
    assert run(monkeypatch, tmp_path / 'run', teacher_file, '--maps', 'local', '--log-every', '1') is None
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert "control: toward local maps, not the teacher's" in log, log
    assert 'attention: eager' in log, log


@pytest.mark.parametrize('flags, said', [
    (['--transfer', 'q'], 'error: --maps uniform: only with --transfer attn'),
    (['--average-maps', 'batch'], 'error: --maps uniform: only with --average-maps none'),
    (['--attn-implementation', 'sdpa'], 'error: --maps uniform: writes the maps out: with --attn-implementation '
                                        'eager or auto')])
def test_a_control_where_it_means_nothing_is_refused(monkeypatch, tmp_path, teacher_file, flags, said):
    msg = run(monkeypatch, tmp_path / 'run', teacher_file, '--maps', 'uniform', *flags)
    assert msg == said, msg
    assert not (tmp_path / 'run').exists()
