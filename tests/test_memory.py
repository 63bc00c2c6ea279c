"""util/memory.py: a run's model is built once, on the meta device: the resolve step checks its size there and the run
makes that same model real. Made real, it holds the weights a build on the CPU draws from the same random state (the
oracle: that build), for every component a ViT, a student or an MAE can have; a size no machine holds is refused from
it, before anything is allocated."""
import os

import pytest
import torch

import mae_pretrain
from attention_distill import DistillConfig
from finetune import FinetuneConfig, build_model
from teacher import build_student
from util import memory
from util.launch import parse_config
from vit import VisionTransformer, model_arch

TEACHER = os.path.join(os.path.dirname(__file__), '..', 'teachers', 'fashion-mnist-mae.pt')


def same_weights(made, oracle):
    """The made model equals the one built on the CPU: its tensors' names, in order, and values, bit for bit."""
    a, b = made.state_dict(), oracle.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize('arch', [
    {},
    dict(img_size=32, patch_size=8, num_classes=0, global_pool=True),
    dict(img_size=56, patch_size=14, num_classes=7, qkv_bias=False, mlp_ratio=2.5, init_values=1e-5,
         norm_pre=True, reg_tokens=4, act='quick_gelu', no_qk_layers=[0, 3, 5]),
])
def test_a_vit_made_from_the_meta_device_is_the_cpu_build(arch):
    """Each layer's PyTorch default is drawn, then MAE's initialisation, in a CPU build's order; the classifier is made
    where a build makes it."""
    keywords = model_arch('vit_small', **arch)
    torch.manual_seed(0)
    oracle = VisionTransformer(**keywords)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    with torch.device('meta'):
        model = VisionTransformer(**{**keywords, 'num_classes': 0})
    made = memory.materialised(model, keywords['num_classes'])
    assert made is model and not any(p.is_meta for p in made.parameters())
    same_weights(made, oracle)
    assert torch.equal(torch.get_rng_state(), after)


def test_each_script_trains_the_model_its_resolve_step_checked(monkeypatch):
    """Fine-tuning from scratch, a transfer's student, an MAE: the model checked (on the meta device, its count all
    its parameters: an MAE's decoder too) is the one the run makes real and trains, and made real it is the model a
    CPU build of its keywords draws."""
    checked = []
    monkeypatch.setattr(memory, 'too_big', lambda numbers, *args: checked.append(numbers))
    small = ['--data', 'fake', '--img-size', '28', '--model', 'vit_tiny', '--depth', '2']

    finetune = parse_config(FinetuneConfig, {}, small)
    start = finetune.resolve()
    checks = [(checked.pop(), memory.parameters(start.model))]
    torch.manual_seed(0)
    made = build_model(finetune, 10, start)
    torch.manual_seed(0)
    same_weights(made, VisionTransformer(**made.arch))

    distill = parse_config(DistillConfig, {}, ['--data', 'fake', '--img-size', '28', '--teacher', TEACHER])
    transfer = distill.resolve()
    unmade = transfer.unmade
    checks.append((checked.pop(), memory.parameters(unmade)))
    torch.manual_seed(0)
    student = build_student(transfer, 10)
    torch.manual_seed(0)
    same_weights(student, VisionTransformer(**student.arch))

    mae = parse_config(mae_pretrain.MAEConfig, {}, [*small, '--decoder-dim', '48', '--decoder-depth', '3'])
    model = mae.resolve()
    checks.append((checked.pop(), memory.parameters(model)))
    torch.manual_seed(0)
    made_mae = memory.materialised(model)
    torch.manual_seed(0)
    same_weights(made_mae, mae_pretrain.build_mae(mae))

    assert made is start.model and student is unmade and made_mae is model
    assert all(numbers == count for numbers, count in checks), checks
    encoder = VisionTransformer(**{**mae_pretrain.mae_arch(mae), 'num_classes': 0})
    assert checks[2][1] > memory.parameters(encoder)   # its decoder too


def test_a_size_no_machine_holds_is_refused_from_the_model_on_the_meta_device(monkeypatch):
    monkeypatch.setattr(memory, 'host_memory', lambda: 16 * 2 ** 30)
    with torch.device('meta'):
        big = VisionTransformer(**model_arch('vit_tiny', embed_dim=2 ** 16, num_heads=8, num_classes=0))
        small = VisionTransformer(**model_arch('vit_tiny', num_classes=0))
    assert memory.too_big(memory.parameters(big)).endswith('free on this machine')
    assert memory.too_big(memory.parameters(small)) is None
    with pytest.raises(memory.ConfigError, match='--embed-dim 65536, --depth 12, .* --batch-size 64: a ViT of these '
                                                 'sizes needs'):
        memory.check_trainable(big, 64)
