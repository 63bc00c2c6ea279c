"""util/memory.py: a model's size counted from its keywords is the size of the model they build (the oracle: the
model itself, on the meta device), for every component a ViT or an MAE can have; the count answers at once for any
numbers, before anything is built."""
import pytest
import torch

from mae_pretrain import MAEConfig, build_mae
from util import memory
from vit import VisionTransformer, model_arch


def built(make):
    with torch.device('meta'):
        model = make()
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize('arch', [
    {},
    dict(img_size=32, patch_size=8, num_classes=0, global_pool=True),
    dict(img_size=56, patch_size=14, num_classes=7, qkv_bias=False, mlp_ratio=2.5, init_values=1e-5,
         norm_pre=True, reg_tokens=4, act='quick_gelu', no_qk_layers=[0, 3, 5]),
])
def test_a_vits_count_is_the_built_models(arch):
    keywords = model_arch('vit_small', **arch)
    assert memory.vit_numbers(keywords) == built(lambda: VisionTransformer(**keywords))


def test_an_maes_count_is_the_built_models(monkeypatch):
    cfg = MAEConfig(data='fake', img_size=32, patch_size=8, model='vit_tiny', decoder_dim=48, decoder_depth=3)
    counted = {}
    monkeypatch.setattr('mae_pretrain.check_trainable', lambda *args, **kw: counted.update(kw))
    cfg.resolve()
    assert counted['numbers'] == built(lambda: build_mae(cfg))


def test_a_size_no_machine_holds_is_refused_from_its_numbers_alone(monkeypatch):
    """10 million blocks, 2**60 tokens: counted, not built (a module a block on the meta device took minutes)."""
    monkeypatch.setattr(memory, 'host_memory', lambda: 16 * 2 ** 30)
    for big in (dict(depth=10 ** 7), dict(img_size=2 ** 30 * 16)):
        assert memory.too_big(memory.vit_numbers(model_arch('vit_tiny', **big))).endswith('free on this machine')
    assert memory.too_big(memory.vit_numbers(model_arch('vit_tiny'))) is None
    with pytest.raises(memory.ConfigError, match='--batch-size 64: a ViT of these sizes needs'):
        memory.check_trainable(model_arch('vit_tiny', depth=10 ** 7), 64)
