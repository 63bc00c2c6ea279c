"""Attention copy and distillation: identities, frozen teacher, layer / head / q-k-v selection."""
import types

import pytest
import torch
import torch.nn.functional as F

from attention_copy import CopyModel, copied, copy_loss
from attention_distill import DistillConfig, attention_cross_entropy, distill_loss_fn, layer_loss
from conftest import blocks_run, student_of
from teacher import INDEX_RULE, parse_index, teacher_outputs
from util.engine import build_optimizer
from vit import VisionTransformer

ARCH = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=4, num_heads=4)


def make_teacher(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(**ARCH).requires_grad_(False).eval()


def cfg_for(**kw):
    return DistillConfig(img_size=32, **kw)


def test_copy_identity_reproduces_teacher():
    """A copy student holding the teacher's weights (values = the teacher's v slice), given all of
    the teacher's maps, computes exactly the teacher's logits."""
    teacher = make_teacher()
    layers = list(range(4))
    student = student_of(cfg_for(), teacher, 5, layers, no_qk=True)
    assert not any('qkv' in n for n, _ in student.named_parameters())
    sd = {}
    for k, v in teacher.state_dict().items():
        if k.endswith(('attn.qkv.weight', 'attn.qkv.bias')):
            sd[k.replace('qkv', 'v')] = v[2 * 48:]                      # rows: q, k, v
        else:
            sd[k] = v
    student.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(CopyModel(teacher, student.eval(), layers)(x), teacher(x), atol=1e-6)


def test_attention_cross_entropy_identities():
    torch.manual_seed(0)
    t, s = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    p = t.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(attention_cross_entropy(t, t), entropy, atol=1e-6)       # KL = 0
    kl = F.kl_div(s.log_softmax(-1), p, reduction='none').sum(-1).mean()
    assert torch.allclose(attention_cross_entropy(t, s), kl + entropy, atol=1e-5)  # H(p, q) = KL + H(p)
    direct = sum(-(p[b, h, i] * s[b, h, i].log_softmax(-1)).sum()
                 for b in range(2) for h in range(3) for i in range(5)) / 30
    assert torch.allclose(attention_cross_entropy(t, s), direct, atol=1e-5)
    assert attention_cross_entropy(t, s) > attention_cross_entropy(t, t)
    # heads subset and the MSE variants
    assert torch.allclose(layer_loss({'logits': s}, {'logits': t}, 'attn', heads=[1]),
                          attention_cross_entropy(t[:, [1]], s[:, [1]]))
    assert torch.allclose(layer_loss({'q': s}, {'q': t}, 'q'), ((s - t) ** 2).mean())


@pytest.mark.parametrize('implementation', ['eager', 'sdpa'])
def test_distillation_gradient_reaches_student_qk_never_teacher(implementation):
    teacher = make_teacher()
    layers = [0, 1]
    student = student_of(cfg_for(), teacher, 5, layers)
    x = torch.randn(2, 3, 32, 32)
    names = ('logits',) if implementation == 'eager' else ('q', 'k')
    target = teacher_outputs(teacher, x, layers, names)
    assert not any(t.requires_grad for out in target.values() for t in out.values())
    _, kept = student(x, keep={i: names for i in layers})
    sum(layer_loss(kept[i], target[i], 'attn', None, implementation) for i in layers).backward()
    g = student.blocks[1].attn.qkv.weight.grad                  # the last distilled layer:
    assert g[:96].abs().sum() > 0                               # its q and k rows learn,
    assert g[96:].abs().sum() == 0                              # its v shapes no distilled logits
    assert student.blocks[0].attn.qkv.weight.grad[96:].abs().sum() > 0   # layer 0's v feeds layer 1
    assert student.blocks[3].attn.qkv.weight.grad is None       # layer 3 was not distilled
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize('method', ['copy', 'distill'])
def test_teacher_stays_frozen_through_a_training_step(method):
    teacher = make_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = cfg_for(drop_path=0.3)
    layers = [0, 1, 2, 3]
    student = student_of(cfg, teacher, 5, layers, no_qk=method == 'copy').train()
    loss_fn = (copy_loss if method == 'copy' else distill_loss_fn)(cfg, teacher, layers, None)
    opt = build_optimizer(types.SimpleNamespace(layer_decay=1.0, layer_decay_offset=1, weight_decay=0.05, beta2=0.999),
                          student, 1e-2)
    loss, parts = loss_fn(student, torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    loss.backward()
    opt.step()
    assert set(parts) == ({'ce'} if method == 'copy' else {'ce', 'attn'})
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    assert not in_opt & {id(p) for p in teacher.parameters()}
    assert in_opt == {id(p) for p in student.parameters()}


def test_layer_selection_touches_only_those_layers():
    teacher = make_teacher()
    ran = blocks_run(teacher)
    given = []
    student = student_of(cfg_for(), teacher, 5, [0, 2])
    for i, b in enumerate(student.blocks):
        b.attn.register_forward_pre_hook(lambda m, a, kw, i=i: given.append(i) if kw.get('q') is not None
                                         else None, with_kwargs=True)
    x = torch.randn(2, 3, 32, 32)
    student(x, inject=copied(teacher, x, [0, 2], None, 'attn', implementation='sdpa'))   # q and k
    assert given == [0, 2]
    assert ran == [0, 1]                      # the teacher stopped inside layer 2 of 4 (its q and k only)
    ran.clear()
    _, kept = student(x, keep={0: ('logits',), 2: ('logits',)})
    teacher_outputs(teacher, x, [0], ('q', 'k'))
    assert sorted(kept) == [0, 2] and ran == []


@pytest.mark.parametrize('transfer', ['q', 'k', 'v'])
def test_qkv_copy_of_one_head_leaves_that_projection_untrained(transfer):
    """Copying head 0's q (k, v) from the teacher: the student's own q (k, v) rows of head 0 get no
    gradient, every other head's do."""
    teacher = make_teacher()
    student = student_of(cfg_for(transfer=transfer), teacher, 5, [0])
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    loss, _ = copy_loss(cfg_for(transfer=transfer), teacher, [0], [0])(student, x, y)
    loss.backward()
    off = 'qkv'.index(transfer) * 48
    g = student.blocks[0].attn.qkv.weight.grad[off:off + 48].view(4, 12, 48)     # (heads, head_dim, dim)
    assert g[0].abs().sum() == 0 and (g[1:].abs().sum((1, 2)) > 0).all()


@pytest.mark.parametrize('implementation', ['eager', 'sdpa'])
def test_distilling_a_head_subset_trains_only_those_heads_attention(implementation):
    teacher = make_teacher()
    student = student_of(cfg_for(), teacher, 5, [0])
    x = torch.randn(2, 3, 32, 32)
    names = ('logits',) if implementation == 'eager' else ('q', 'k')
    _, kept = student(x, keep={0: names})
    layer_loss(kept[0], teacher_outputs(teacher, x, [0], names)[0], 'attn', [1, 3], implementation).backward()
    g = student.blocks[0].attn.qkv.weight.grad[:48].view(4, 12, 48)               # q rows per head
    assert g[[0, 2]].abs().sum() == 0 and (g[[1, 3]].abs().sum((1, 2)) > 0).all()


def test_student_must_fit_teacher():
    from util.config import ConfigError
    teacher = make_teacher()
    with pytest.raises(ConfigError, match='does not fit'):
        student_of(cfg_for(num_heads=6, embed_dim=48), teacher, 5, [0])
    with pytest.raises(ConfigError, match='does not fit'):
        student_of(cfg_for(patch_size=4), teacher, 5, [0])
    assert student_of(cfg_for(embed_dim=96), teacher, 5, [0]).embed_dim == 96   # maps need no equal width
    assert parse_index('0-2,5', 8, 'layers') == [0, 1, 2, 5] and parse_index('all', 3, 'heads') == [0, 1, 2]
    for bad in ('9', 'x', '2-'):
        with pytest.raises(ConfigError):
            parse_index(bad, 8, 'layers')
    for bad in ('1-0', '0,1-0', '0,3-1', '2,5-3,6'):   # a reversed range inside a list once dropped silently
        with pytest.raises(ConfigError, match=r'-\d is an empty range \(low-high, as \d-\d\)$'):
            parse_index(bad, 8, 'layers')
        assert not INDEX_RULE[0](bad)   # refused when the config is checked, before any file is read


@pytest.mark.parametrize('script', ['attention_copy', 'attention_distill'])
def test_small_presets_build_the_teacher_shaped_student(script):
    """A small preset names model 'teacher': its student takes the teacher's width, depth and heads, never
    finetune.py's sizes (which once silently made a 128-wide student of a 64-wide teacher)."""
    import importlib
    from util.launch import parse_config
    mod = importlib.import_module(script)
    teacher = make_teacher()   # 48 wide, unlike any preset
    for data in ('fashion-mnist', 'cifar10', 'fake'):
        config_class = mod.CopyConfig if script == 'attention_copy' else mod.DistillConfig
        cfg = parse_config(config_class, mod.PRESETS, ['--data', data, '--img-size', str(teacher.arch['img_size']),
                                                            '--teacher', 'unread.pt'])
        student = student_of(cfg, teacher, 5, [0])
        assert all(student.arch[k] == teacher.arch[k] for k in ('embed_dim', 'depth', 'num_heads')), data


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    from conftest import finetune
    out = tmp_path_factory.mktemp('teacher')
    finetune(out, '--epochs', '1', '--amp', 'off')
    return out / 'checkpoint.pt'


@pytest.mark.parametrize('script', ['attention_copy.py', 'attention_distill.py'])
def test_a_run_on_sdpa_ends_as_the_same_run_on_eager(script, tiny_teacher, tmp_path):
    """The same seed on both implementations (fp32): the same computation, so the same top-1 (within a point,
    far inside the seed-to-seed spread); the log names the implementation and why; a run started on eager
    resumes on sdpa."""
    from conftest import TINY, read_metrics, run_script
    top1 = {}
    for implementation in ('eager', 'sdpa'):
        out = tmp_path / implementation
        p = run_script(script, *TINY, '--teacher', tiny_teacher, '--epochs', '2', '--amp', 'off',
                       '--attn-implementation', implementation, '--out-dir', out)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f'attention: {implementation} (--attn-implementation {implementation})' in p.stdout
        top1[implementation] = read_metrics(out)[-1]['top1']
    assert abs(top1['eager'] - top1['sdpa']) <= 1.0, top1
    out = tmp_path / 'switched'
    args = [script, *TINY, '--teacher', tiny_teacher, '--epochs', '2', '--amp', 'off', '--out-dir', out]
    assert run_script(*args, '--attn-implementation', 'eager', '--max-steps', '3').returncode == 0
    p = run_script(*args, '--attn-implementation', 'sdpa', '--resume', 'true')
    assert p.returncode == 0, p.stderr[-3000:]
    assert abs(read_metrics(out)[-1]['top1'] - top1['eager']) <= 1.0
