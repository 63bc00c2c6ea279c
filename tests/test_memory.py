"""util/memory.py: a run's size is checked on its model built on the meta device (its shapes, no memory) by the resolve
step, which then throws it away: the run builds its model on the CPU after its seed. The model counted is the model the
run trains, for fine-tuning, a transfer's student and an MAE (its decoder too); a size no machine holds is refused from
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


def test_each_script_checks_the_size_of_the_model_it_trains(monkeypatch):
    """Fine-tuning from scratch, a transfer's student, an MAE: the count the resolve step checked (on the meta device)
    is that of the model the run builds and trains, its classifier aside (counted once the data's classes are read);
    an MAE's decoder is counted too."""
    checked = []
    monkeypatch.setattr(memory, 'too_big', lambda numbers, *args: checked.append(numbers))
    small = ['--data', 'fake', '--img-size', '28', '--model', 'vit_tiny', '--depth', '2']

    def headless(model):
        return memory.parameters(model) - sum(p.numel() for p in model.head.parameters())

    finetune = parse_config(FinetuneConfig, {}, small)
    start = finetune.resolve()
    model = build_model(finetune, 10, start)
    assert start.weights is None and not any(p.is_meta for p in model.parameters())
    assert checked.pop() == headless(model)

    distill = parse_config(DistillConfig, {}, ['--data', 'fake', '--img-size', '28', '--teacher', TEACHER])
    transfer = distill.resolve()
    student = build_student(transfer.student, distill, 10)
    assert checked.pop() == headless(student)

    mae = parse_config(mae_pretrain.MAEConfig, {}, [*small, '--decoder-dim', '48', '--decoder-depth', '3'])
    assert mae.resolve() is None
    numbers = checked.pop()
    assert numbers == memory.parameters(mae_pretrain.build_mae(mae))
    encoder = VisionTransformer(**{**mae_pretrain.mae_arch(mae), 'num_classes': 0})
    assert numbers > memory.parameters(encoder)   # its decoder too


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
