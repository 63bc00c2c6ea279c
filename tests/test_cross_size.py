"""A student of another size than its teacher (teacher.py): which teacher layer and heads reach which
student layer and head (--layer-map, the head-group rule), a step of copy and of distillation with a
smaller student, what its checkpoint records, and the one-line errors for what cannot fit."""
import itertools
import re

import pytest
import torch

from attention_copy import CopyModel, copied, copy_loss, load_copy_model
import attention_copy
from attention_distill import (DistillConfig, attention_cross_entropy, distill_loss_fn, layer_loss,
                               to_student_heads)
import attention_distill
from conftest import TINY, run_in_process, student_of
from teacher import map_layers, misfit, student_shape
from util.launch import parse_config
from util.config import ConfigError
from vit import IMPLEMENTATIONS, VisionTransformer, model_arch, set_attn_implementation


TEACHER = dict(img_size=32, patch_size=8, num_classes=0, embed_dim=48, depth=4, num_heads=4)
SMALL = dict(model='vit_tiny', embed_dim=32, depth=2, num_heads=2)       # half the depth, half the heads


def make_teacher(seed=0, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(**{**TEACHER, **kw}).requires_grad_(False).eval()


def cfg_for(**kw):
    return DistillConfig(img_size=32, teacher='t.pt', **kw)


def group_mean(logits, g):
    """The rule written out: student head j gets the mean of the probabilities of teacher heads g*j .. g*j+g-1."""
    p = logits.softmax(-1)                                                    # (B, H, N, N)
    return torch.stack([p[:, g * j:g * j + g].mean(1) for j in range(p.shape[1] // g)], 1)   # (B, H / g, N, N)

# -----------------------------------------------------------------------------
# Layers


def test_default_map_spreads_the_transferred_layers_last_on_last():
    assert map_layers('auto', [0, 1, 2, 3], 4, 2) == {0: 0, 1: 3}
    assert map_layers('auto', list(range(24)), 24, 12) == dict(enumerate((0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23)))
    # ViT-L's first 18 of 24 layers (the distillation recipe) into 12: the student's first 9, the last on 17
    assert map_layers('auto', list(range(18)), 24, 12) == dict(enumerate((0, 2, 4, 6, 9, 11, 13, 15, 17)))
    assert map_layers('auto', [0, 1], 2, 4) == {0: 0, 3: 1}                  # a deeper student: spread out
    assert map_layers('auto', [0, 1, 2], 3, 1) == {0: 2}                     # one layer: the last
    assert map_layers('auto', [5], 24, 12) == {2: 5}


def test_default_map_is_the_identity_at_equal_depth():
    """So every run with a student of the teacher's depth transfers exactly the layers it did before."""
    for depth in range(1, 7):
        for n in range(1, depth + 1):
            for layers in itertools.combinations(range(depth), n):
                assert map_layers('auto', list(layers), depth, depth) == {i: i for i in layers}


def test_explicit_map_and_its_errors():
    assert map_layers('2:8,0:0,1:4', list(range(12)), 12, 3) == {0: 0, 1: 4, 2: 8}     # in the student's order
    assert map_layers('1:3', [0, 1, 2, 3], 4, 2) == {1: 3}
    for spec, layers, says in [('0:0,3:4', range(12), 'the student has layers 0..2'),
                               ('0:0,1:9', range(8), 'among --layers 0-7'),
                               ('0:4,1:2', range(12), 'must increase'), ('0:4,1:4', range(12), 'must increase')]:
        with pytest.raises(ConfigError, match=says):
            map_layers(spec, list(layers), 12, 3, '0-7')
    for bad in ('0', '0:1:2', '0:a', '0:-1', '0:0,0:1', '0:0,', 'none'):
        with pytest.raises(ConfigError, match='--layer-map .*student:teacher'):
            parse_config(attention_distill.DistillConfig, {}, ['--teacher', 't.pt', '--layer-map', bad])


def test_layer_map_decides_which_teacher_layer_reaches_which_student_layer():
    teacher = make_teacher()
    x = torch.randn(2, 3, 32, 32)
    given = copied(teacher, x, {0: 1, 1: 2}, None, 'attn', implementation='sdpa')   # q and k handed over
    qk = teacher.internals(x, [1, 2])
    assert sorted(given) == [0, 1]
    assert all(torch.equal(given[s][n], qk[t][n]) for s, t in ((0, 1), (1, 2)) for n in ('q', 'k'))

# -----------------------------------------------------------------------------
# Heads


def test_head_groups_against_a_direct_computation():
    torch.manual_seed(0)
    t, s = torch.randn(2, 6, 5, 5), torch.randn(2, 3, 5, 5)
    pbar = group_mean(t, 2)                                                  # heads (0, 1), (2, 3), (4, 5)
    assert torch.allclose(to_student_heads(t, 3).softmax(-1), pbar, atol=1e-6)
    assert torch.allclose(to_student_heads(t, 2).softmax(-1), group_mean(t, 3), atol=1e-6)
    assert to_student_heads(t, 6) is t                                       # equal heads: untouched
    # distillation: the cross-entropy against the group's mean map, which is the mean over the teacher's heads
    # of the cross-entropy of each against its student head (the target enters linearly)
    direct = -(pbar * s.log_softmax(-1)).sum(-1).mean()
    per_head = torch.stack([attention_cross_entropy(t[:, [h]], s[:, [h // 2]]) for h in range(6)]).mean()
    assert torch.allclose(layer_loss({'logits': s}, {'logits': t}, 'attn'), direct, atol=1e-5)
    assert torch.allclose(direct, per_head, atol=1e-5)


def test_a_smaller_student_gets_each_layer_and_head_its_teacher_group():
    """Default map, teacher depth 4 x 4 heads -> student depth 2 x 2 heads: student layer 0 <- teacher layer 0,
    layer 1 <- layer 3; student head 0 <- mean of teacher heads 0, 1; head 1 <- heads 2, 3."""
    teacher = make_teacher()
    layers = map_layers('auto', [0, 1, 2, 3], 4, 2)
    student = student_of(cfg_for(**SMALL), teacher, 10, layers, no_qk=True)
    assert (student.depth, student.num_heads, student.embed_dim) == (2, 2, 32)
    x = torch.randn(2, 3, 32, 32)
    maps = teacher.attention(x, [0, 3])
    # the copy model gives each student head its group's mean map, on either implementation
    direct = student(x, inject={s: {'attn': group_mean(maps[t], 2)} for s, t in ((0, 0), (1, 3))})
    for implementation in IMPLEMENTATIONS:
        set_attn_implementation(student, implementation)
        copy = CopyModel(teacher, student, layers, implementation=implementation)
        assert torch.allclose(copy(x), direct, atol=1e-5), implementation

# -----------------------------------------------------------------------------
# A training step of each method


@pytest.mark.parametrize('method', ['copy', 'distill'])
def test_a_step_trains_a_smaller_student(method):
    teacher = make_teacher()
    cfg = cfg_for(**SMALL)
    layers = map_layers('auto', [0, 1, 2, 3], 4, 2)
    student = student_of(cfg, teacher, 10, layers, no_qk=method == 'copy').train()
    loss_fn = (copy_loss(cfg, teacher, layers, None) if method == 'copy'
               else distill_loss_fn(cfg, teacher, layers, None))
    loss, parts = loss_fn(student, torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,)))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == ({'ce'} if method == 'copy' else {'ce', 'attn'})
    if method == 'distill':
        assert student.blocks[1].attn.qkv.weight.grad[:64].abs().sum() > 0   # its q and k learn the maps
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pt'
    teacher = make_teacher(num_classes=10)
    torch.save({'model': teacher.state_dict(), 'arch': teacher.arch}, path)
    return path


SMALL_FLAGS = ['--model', 'vit_tiny', '--embed-dim', '32', '--depth', '2', '--num-heads', '2']


def run(monkeypatch, module, out, teacher, *args):
    return run_in_process(monkeypatch, module, *TINY, '--out-dir', out, '--teacher', teacher, '--max-steps', '1',
                          '--amp', 'off', '--log-every', '1', *args)


@pytest.mark.parametrize('module', [attention_copy, attention_distill])
def test_scripts_train_a_smaller_student_and_record_the_mapping(monkeypatch, capsys, tmp_path, teacher_file, module):
    out = tmp_path / 'run'
    assert run(monkeypatch, module, out, teacher_file, *SMALL_FLAGS) is None
    printed = capsys.readouterr().out
    assert "layer map (student:teacher) 0:0 1:3; the teacher's 4 heads in 2 groups of 2" in printed
    assert f"teacher {teacher_file} (this project's): depth 4, 4 heads, patches of 8 px, native size " \
           f"32 px, run at that size" in printed
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    record = ck['teacher' if module is attention_copy else 'distilled_from']
    assert record['layer_map'] == {0: 0, 1: 3}
    assert (ck['arch']['depth'], ck['arch']['num_heads'], ck['arch']['embed_dim']) == (2, 2, 32)
    # a resume with another mapping is refused, naming it
    msg = run(monkeypatch, module, out, teacher_file, *SMALL_FLAGS, '--resume', 'true', '--layer-map', '0:1,1:3')
    assert msg and '--layer-map auto -> 0:1,1:3' in msg, msg


def test_a_copy_student_reloads_with_its_mapping(monkeypatch, tmp_path, teacher_file):
    out = tmp_path / 'copy'
    assert run(monkeypatch, attention_copy, out, teacher_file, *SMALL_FLAGS, '--layer-map', '0:1,1:2') is None
    model = load_copy_model(str(out / 'checkpoint.pt'))
    assert model.layers == {0: 1, 1: 2}
    x = torch.randn(2, 3, 32, 32)
    maps = model.teacher.attention(x, [1, 2])
    with torch.no_grad():
        direct = model.student(x, inject={0: {'attn': group_mean(maps[1], 2)}, 1: {'attn': group_mean(maps[2], 2)}})
        assert torch.allclose(model(x), direct, atol=1e-5)

# -----------------------------------------------------------------------------
# What cannot fit: one line naming the flags


@pytest.mark.parametrize('kw, says', [
    (dict(num_heads=3, embed_dim=48), r'head count must divide 4 \(--model, --num-heads: 1, 2, 4\)'),
    (dict(num_heads=2, heads='0'), '--heads 0 picks heads only when'),
    (dict(num_heads=2, embed_dim=48, transfer='q'), '--transfer q .*dim and heads must be'),
    (dict(embed_dim=32, transfer='k'), '--transfer k .*dim and heads must be'),
    (dict(patch_size=4), r"tokens: --patch-size must be its 8 \(or 0\)"),
])
def test_what_cannot_fit_is_refused(kw, says):
    with pytest.raises(ConfigError, match='does not fit the teacher .*' + says):
        student_of(cfg_for(**kw), make_teacher(), 10, [0])
    assert student_of(cfg_for(embed_dim=96), make_teacher(), 10, [0]).embed_dim == 96   # maps: any width


def test_vit_small_from_vit_large_needs_a_head_count_dividing_16():
    """The shapes alone (no ViT-L is built): ViT-S's 6 heads cannot group ViT-L's 16; 8 heads can."""
    large = model_arch('vit_large', img_size=224)
    layers = map_layers('auto', list(range(18)), 24, 12)
    for heads, says in ((6, r'--num-heads: 1, 2, 4, 8, 16\)'), (8, None)):
        cfg = DistillConfig(img_size=224, teacher='mae_vit_large', model='vit_small', num_heads=heads)
        why = misfit(cfg, student_shape(cfg, large), large, layers)
        assert why is None if says is None else re.search(says, why), why
    cfg = DistillConfig(img_size=224, teacher='mae_vit_large', model='vit_small', num_heads=8, transfer='v')
    assert 'dim and heads must be' in misfit(cfg, student_shape(cfg, large), large, layers)


@pytest.mark.parametrize('module', [attention_copy, attention_distill])
def test_scripts_refuse_in_one_line(monkeypatch, tmp_path, teacher_file, module):
    msg = run(monkeypatch, module, tmp_path / 'a', teacher_file, '--num-heads', '3', '--embed-dim', '48')
    assert msg.startswith('error: student (') and '--num-heads' in msg, msg
    msg = run(monkeypatch, module, tmp_path / 'b', teacher_file, *SMALL_FLAGS, '--layer-map', '0:0,2:3')
    assert msg == 'error: --layer-map 0:0,2:3: the student has layers 0..1', msg
