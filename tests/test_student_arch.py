"""--student-arch: a plain student, or one with its teacher's components (layer scale, registers,
pre-norm, activation, LayerNorm epsilon), randomly initialised; both transfer methods run with it."""
import pytest
import torch

from attention_copy import copy_loss
from attention_distill import DistillConfig, distill_loss_fn
from conftest import TINY, run_script, student_of
from teacher import PLAIN
from test_transfer_scripts import transfer
from util.config import ConfigError
from vit import VisionTransformer

COMPONENTS = dict(init_values=0.1, reg_tokens=2, norm_pre=True, act='quick_gelu', norm_eps=1e-5)
ARCH = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def family_teacher():
    """A trained-looking teacher of a family with every component (random weights, gammas not 0.1)."""
    torch.manual_seed(0)
    t = VisionTransformer(**ARCH, **COMPONENTS)
    t.load_state_dict({k: torch.randn_like(v) for k, v in t.state_dict().items()})
    return t.requires_grad_(False).eval()


def test_teacher_arch_student_has_the_components_freshly_initialised():
    teacher = family_teacher()
    student = student_of(DistillConfig(img_size=32, student_arch='teacher'), teacher, 10, [0, 1])
    assert {k: student.arch[k] for k in PLAIN} == COMPONENTS
    assert set(student.state_dict()) == set(teacher.state_dict())
    assert torch.equal(student.blocks[1].ls2.gamma, torch.full((32,), 0.1))      # init value, not the teacher's
    assert not torch.equal(student.reg_token, teacher.reg_token)
    assert student.norm_pre.eps == 1e-5 and type(student.blocks[0].mlp.act).__name__ == 'QuickGELU'


def test_plain_student_drops_the_components_and_registers_need_the_teacher_arch():
    teacher = family_teacher()
    with pytest.raises(ConfigError, match='register tokens.*--student-arch teacher'):
        student_of(DistillConfig(img_size=32), teacher, 10, [0])
    torch.manual_seed(0)
    no_reg = VisionTransformer(**ARCH, **{**COMPONENTS, 'reg_tokens': 0})
    student = student_of(DistillConfig(img_size=32), no_reg, 10, [0])          # plain is the default
    assert {k: student.arch[k] for k in PLAIN} == PLAIN
    assert not any(n.endswith('gamma') or n.startswith('norm_pre') for n in student.state_dict())


@pytest.mark.parametrize('method', ['copy', 'distill'])
def test_a_step_trains_the_students_components(method):
    teacher = family_teacher()
    cfg = DistillConfig(img_size=32, student_arch='teacher')
    student = student_of(cfg, teacher, 10, [0, 1], no_qk=method == 'copy').train()
    loss_fn = (copy_loss if method == 'copy' else distill_loss_fn)(cfg, teacher, [0, 1], None)
    loss, _ = loss_fn(student, torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,)))
    loss.backward()
    for name in ('reg_token', 'norm_pre.weight', 'blocks.0.ls1.gamma', 'blocks.1.ls2.gamma'):
        assert student.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


def test_scripts_build_and_record_the_teacher_arch_student(tmp_path):
    teacher = family_teacher()
    torch.save({'model': teacher.state_dict(), 'arch': teacher.arch}, tmp_path / 'teacher.pt')
    for script in ('attention_copy.py', 'attention_distill.py'):
        out = tmp_path / script
        transfer(script, out, tmp_path / 'teacher.pt', '--student-arch', 'teacher', '--layers', '0')
        ck = torch.load(out / 'checkpoint.pt', weights_only=True)
        record = ck['teacher' if script == 'attention_copy.py' else 'distilled_from']
        assert ck['config']['student_arch'] == 'teacher' and 'student_arch' not in record   # said once
        assert {k: ck['arch'][k] for k in PLAIN} == COMPONENTS
    p = run_script('attention_distill.py', *TINY, '--out-dir', tmp_path / 'plain', '--teacher', tmp_path / 'teacher.pt')
    assert p.returncode != 0 and 'register tokens' in p.stderr and 'Traceback' not in p.stderr


def test_finetune_builds_a_teacher_of_another_family_and_the_student_takes_its_components():
    """finetune.py --layer-scale / --norm-pre / --act: a supervised teacher built like DINOv2 or CLIP, whose
    components --student-arch teacher gives the student (and --student-arch plain drops); --init checks them."""
    from util.checkpoints import CheckpointError, load_weights
    from finetune import FinetuneConfig, build_model
    cfg = FinetuneConfig(data='fake', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         layer_scale=0.1, norm_pre=True, act='quick_gelu')
    teacher = build_model(cfg, 10)
    assert {k: teacher.arch[k] for k in ('init_values', 'norm_pre', 'act')} == \
        {'init_values': 0.1, 'norm_pre': True, 'act': 'quick_gelu'}
    assert torch.equal(teacher.blocks[0].ls1.gamma, torch.full((32,), 0.1))
    like = student_of(DistillConfig(img_size=32, student_arch='teacher'), teacher, 10, [0, 1])
    plain = student_of(DistillConfig(img_size=32), teacher, 10, [0, 1])
    assert {k: like.arch[k] for k in PLAIN} == {k: teacher.arch[k] for k in PLAIN}
    assert {k: plain.arch[k] for k in PLAIN} == PLAIN
    plain_model = build_model(FinetuneConfig(data='fake', img_size=32, patch_size=8, embed_dim=32, depth=2,
                                             num_heads=2), 10)
    with pytest.raises(CheckpointError, match='init_values 0.1'):   # an --init of another family is refused
        load_weights(plain_model, 'teacher.pt', {'model': teacher.state_dict(), 'arch': teacher.arch})
