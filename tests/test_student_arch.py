"""--student-arch: a plain student, or one with its teacher's components (layer scale, registers,
pre-norm, activation, LayerNorm epsilon), randomly initialised; both transfer methods run with it. auto, the default:
the teacher's components where it has any, else the plain student (the committed reproduction's)."""
import json
import os
from dataclasses import asdict

import pytest
import torch

import attention_copy
import attention_distill
from attention_copy import CopyConfig, copy_loss
from attention_distill import DistillConfig, distill_loss_fn
from conftest import ROOT, TINY, run_script, student_of
from finetune import FinetuneConfig, build_model, presets
from teacher import PLAIN, build_student, components, describe_arch
from test_pretrained import official_clip, official_dinov2, plain_timm
from test_transfer_scripts import transfer
from tools.reproduce import parse, plan, preflight, teacher_components
from util.config import ConfigError
from util.launch import parse_config
from vit import VisionTransformer, model_arch

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
    with pytest.raises(ConfigError, match='register tokens'):
        student_of(DistillConfig(img_size=32, student_arch='plain'), teacher, 10, [0])
    torch.manual_seed(0)
    no_reg = VisionTransformer(**ARCH, **{**COMPONENTS, 'reg_tokens': 0})
    student = student_of(DistillConfig(img_size=32, student_arch='plain'), no_reg, 10, [0])
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
    # copy asks for the teacher's components, distillation gets them by default (auto): the log says which and why
    for script, arch in (('attention_copy.py', 'teacher'), ('attention_distill.py', 'auto')):
        out = tmp_path / script
        flags = ['--student-arch', 'teacher'] if arch == 'teacher' else []
        p = transfer(script, out, tmp_path / 'teacher.pt', *flags, '--layers', '0')
        ck = torch.load(out / 'checkpoint.pt', weights_only=True)
        record = ck['teacher' if script == 'attention_copy.py' else 'distilled_from']
        assert ck['config']['student_arch'] == arch and 'student_arch' not in record   # said once
        assert {k: ck['arch'][k] for k in PLAIN} == COMPONENTS
        said = [line for line in p.stdout.splitlines() if 'student: ' in line]
        assert len(said) == 1 and '(layer scale from 0.1, a LayerNorm before the blocks, quick_gelu, 2 register ' \
            'tokens, LayerNorm eps 1e-05)' in said[0] and f'--student-arch {arch}' in said[0], said
    p = run_script('attention_distill.py', *TINY, '--out-dir', tmp_path / 'plain', '--teacher', tmp_path / 'teacher.pt',
                   '--student-arch', 'plain')
    assert p.returncode != 0 and 'register tokens' in p.stderr and 'Traceback' not in p.stderr


def test_finetune_builds_a_teacher_of_another_family_and_the_student_takes_its_components():
    """finetune.py --layer-scale / --norm-pre / --act: a supervised teacher built like DINOv2 or CLIP, whose
    components --student-arch teacher gives the student (and --student-arch plain drops); --init checks them."""
    from util.checkpoints import CheckpointError, load_weights
    cfg = FinetuneConfig(data='fake', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         layer_scale=0.1, norm_pre=True, act='quick_gelu')
    teacher = build_model(cfg, 10, cfg.resolve())
    assert {k: teacher.arch[k] for k in ('init_values', 'norm_pre', 'act')} == \
        {'init_values': 0.1, 'norm_pre': True, 'act': 'quick_gelu'}
    assert torch.equal(teacher.blocks[0].ls1.gamma, torch.full((32,), 0.1))
    like = student_of(DistillConfig(img_size=32, student_arch='teacher'), teacher, 10, [0, 1])
    plain = student_of(DistillConfig(img_size=32, student_arch='plain'), teacher, 10, [0, 1])
    assert {k: like.arch[k] for k in PLAIN} == {k: teacher.arch[k] for k in PLAIN}
    assert {k: plain.arch[k] for k in PLAIN} == PLAIN
    plain_cfg = FinetuneConfig(data='fake', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    plain_model = build_model(plain_cfg, 10, plain_cfg.resolve())
    with pytest.raises(CheckpointError, match='init_values 0.1'):   # an --init of another family is refused
        load_weights(plain_model, 'teacher.pt', {'model': teacher.state_dict(), 'arch': teacher.arch})

# -----------------------------------------------------------------------------
# --student-arch auto (the default): the teacher's components where it has any (arXiv 2605.07191), else a plain ViT

# each family's components beyond a plain ViT, as its official code builds it: DINOv2's layer scale starts at 1e-5
# (its hub models' layerscale), OpenAI CLIP's ViT has ln_pre, QuickGELU and LayerNorm's default eps 1e-5
FAMILIES = {'dinov2': ('dinov2.pth', 28, dict(init_values=1e-5)),
            'dinov2_reg': ('dinov2_reg.pth', 28, dict(init_values=1e-5, reg_tokens=4)),
            'clip': ('ViT-B-16.pt', 32, dict(norm_pre=True, act='quick_gelu', norm_eps=1e-5))}


def official_file(tmp_path, family):
    """(path, image size, the family's components): a file in the family's official format, random weights."""
    name, size, extra = FAMILIES[family]
    if family == 'clip':
        sd = official_clip(grid=2, patch=16)
    else:
        sd = official_dinov2(grid=2, patch=14, reg=4 if family == 'dinov2_reg' else 0)
    torch.save(sd, tmp_path / name)
    return str(tmp_path / name), size, extra


def resolved(config, teacher, size, *flags):
    """What a transfer run's resolve step settles for this teacher file: its Transfer, and the config."""
    cfg = parse_config(config, {}, ['--data', 'fake', '--img-size', str(size), '--teacher', teacher, *flags])
    return cfg.resolve(), cfg


@pytest.mark.parametrize('family', FAMILIES)
def test_auto_gives_the_student_its_teachers_components(tmp_path, family):
    path, size, extra = official_file(tmp_path, family)
    for config in (CopyConfig, DistillConfig):
        transfer, cfg = resolved(config, path, size)
        assert cfg.student_arch == 'auto' and components(transfer.student) == extra
        with torch.device('meta'):   # the student the run trains, built where it costs nothing
            student = build_student(transfer.student, cfg)
        assert ('blocks.0.ls1.gamma' in student.state_dict()) == ('init_values' in extra)
        assert ('reg_token' in student.state_dict()) == ('reg_tokens' in extra)
        line = describe_arch(cfg, transfer.teacher)
        assert "student: with its teacher's components" in line and '2605.07191' in line and '\n' not in line
    if 'reg_tokens' not in extra:   # a plain student stays a choice, where the maps fit one
        assert components(resolved(DistillConfig, path, size, '--student-arch', 'plain')[0].student) == {}


def plain_teacher_files(tmp_path):
    """{name: (path, image size, flags)}: MAE's and DeiT's official files (timm's names, known by their file names),
    and the teacher this repository ships (this project's own MAE)."""
    mae = {k: v for k, v in plain_timm(num_classes=0, img=32, patch=16).state_dict().items() if k != 'head.weight'}
    torch.save({'model': mae}, tmp_path / 'mae_pretrain_vit_base.pth')
    torch.save({'model': plain_timm(num_classes=7, img=32, patch=16).state_dict()},
               tmp_path / 'deit_small_patch16_224-cd65a155.pth')
    heads = ['--teacher-num-heads', '2']   # timm's names do not say them, and these are not 64-d heads
    return {'mae': (str(tmp_path / 'mae_pretrain_vit_base.pth'), 32, heads),
            'deit': (str(tmp_path / 'deit_small_patch16_224-cd65a155.pth'), 32, heads),
            'shipped': (os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), 28, [])}


def test_auto_gives_a_plain_teacher_the_plain_student_of_before(tmp_path):
    for name, (path, size, heads) in plain_teacher_files(tmp_path).items():
        auto, cfg = resolved(DistillConfig, path, size, *heads)
        plain, _ = resolved(DistillConfig, path, size, *heads, '--student-arch', 'plain')
        assert components(auto.teacher) == {} and auto.student == plain.student, name
        assert {k: auto.student[k] for k in PLAIN} == PLAIN
        assert describe_arch(cfg, auto.teacher).startswith('student: a plain ViT'), name


def test_the_committed_reproduction_builds_the_students_it_built():
    """Every stage of results/fashion-mnist: its command is the one tools/reproduce.py plans today (no flag added for
    the shipped plain teacher), and what that command builds now is the model committed from it."""
    cfg = parse(['--data', 'fashion-mnist'])
    root = os.path.join('runs', 'reproduce', 'fashion-mnist')
    steps = dict(plan(cfg, root, cfg.teacher, teacher_components(cfg)))
    logs = os.path.join(ROOT, 'results', 'fashion-mnist', 'logs')
    models = os.path.join(ROOT, 'results', 'fashion-mnist', 'features', 'models')
    configs = {'scratch': FinetuneConfig, 'finetune': FinetuneConfig, 'copy': CopyConfig, 'distill': DistillConfig}
    scripts = {'copy': attention_copy, 'distill': attention_distill}
    for stage, config in configs.items():
        for seed in (0, 1, 2):
            committed = json.load(open(os.path.join(logs, stage, f'seed{seed}', 'config.json')))['argv']
            assert steps[stage, seed][2:] == committed[1:], (stage, seed)
            chosen = presets(committed[1:]) if config is FinetuneConfig else scripts[stage].PRESETS
            run = parse_config(config, chosen, committed[1:])
            if config is FinetuneConfig:
                arch = build_model(run, 10, run.resolve()).arch
            else:
                transfer = run.resolve()
                arch = {**transfer.student, 'num_classes': 10, 'global_pool': run.global_pool,
                        'drop_path_rate': run.drop_path}
            saved = torch.load(os.path.join(models, f'{stage}-{seed}.pt'), weights_only=True)['arch']
            assert {**arch, 'no_qk_layers': list(arch['no_qk_layers'])} == saved, (stage, seed)


def test_a_run_saved_with_plain_resumes_under_auto_where_the_student_is_the_same(tmp_path):
    """A run saved with --student-arch plain continues under auto from a plain teacher (the same student), and is
    refused from a teacher with components (auto would build another)."""
    shipped = os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt')
    no_reg = VisionTransformer(**ARCH, **{**COMPONENTS, 'reg_tokens': 0})
    torch.save({'model': no_reg.state_dict(), 'arch': no_reg.arch}, tmp_path / 'family.pt')
    for path, size, refused in ((shipped, 28, False), (str(tmp_path / 'family.pt'), 32, True)):
        plain, plain_cfg = resolved(DistillConfig, path, size, '--student-arch', 'plain')
        saved = {'config': asdict(plain_cfg), 'arch': plain.student, 'rng': [0]}
        auto, cfg = resolved(DistillConfig, path, size, '--new-teacher', 'true')
        conflicts = cfg.resume_conflicts(saved, 1, method=auto)
        assert conflicts == (['--student-arch plain -> auto'] if refused else []), conflicts


def test_reproduce_builds_scratch_and_finetune_like_a_teacher_with_components(tmp_path):
    """Where the table compares students (tools/reproduce.py), scratch and fine-tune get the components the transfer
    students get (auto): the teacher's; fine-tuning then loads its weights (preflight resolves every stage)."""
    torch.manual_seed(0)
    built = dict(init_values=0.1, norm_pre=True, act='quick_gelu')
    t = VisionTransformer(**model_arch('vit_tiny', depth=2, img_size=32, patch_size=8, **built))   # --data fake's
    torch.save({'model': t.state_dict(), 'arch': t.arch}, tmp_path / 'teacher.pt')
    cfg = parse([*TINY, '--teacher', str(tmp_path / 'teacher.pt')])
    steps = plan(cfg, str(tmp_path), cfg.teacher, teacher_components(cfg))
    for (stage, _), argv in steps:
        if stage in ('scratch', 'finetune'):
            run = parse_config(FinetuneConfig, presets(argv[2:]), argv[2:])
            assert components(run.components()) == built, stage
        elif stage in ('copy', 'distill'):
            assert '--student-arch' not in argv and '--layer-scale' not in argv   # auto, the default
    preflight(steps, True)


def test_mae_pretrains_a_teacher_of_another_familys_build_whose_components_auto_passes_on():
    """mae_pretrain.py --layer-scale / --norm-pre / --act (tools/followup.sh's teacher): the encoder is built with
    them, a step trains them, and its weights, read as a teacher, give the auto student the same components."""
    from mae_pretrain import MAEConfig, build_mae, mae_loss_fn
    cfg = parse_config(MAEConfig, {}, ['--data', 'fake', '--img-size', '32', '--patch-size', '8', '--embed-dim', '32',
                                       '--depth', '2', '--num-heads', '2', '--layer-scale', '0.1', '--norm-pre', 'true',
                                       '--act', 'quick_gelu'])
    torch.manual_seed(0)
    mae = build_mae(cfg)
    built = dict(init_values=0.1, norm_pre=True, act='quick_gelu')
    assert components(mae.arch) == built
    loss, _ = mae_loss_fn(cfg)(mae, torch.randn(2, 3, 32, 32), None)
    loss.backward()
    assert all(mae.get_parameter(n).grad.abs().sum() > 0 for n in ('norm_pre.weight', 'blocks.1.ls2.gamma'))
    encoder = VisionTransformer(**{**mae.arch, 'num_classes': 0})
    encoder.load_state_dict({k: v for k, v in mae.state_dict().items() if not k.startswith(('decoder', 'mask'))})
    student = student_of(DistillConfig(img_size=32), encoder, 10, [0, 1])
    assert components(student.arch) == built
