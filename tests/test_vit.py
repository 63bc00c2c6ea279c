"""vit.py and util/checkpoints.py against independent implementations (torchvision, timm) and identities."""
import pytest
import torch
import torchvision

from conftest import blocks_run
from util.checkpoints import CheckpointError, build_from_checkpoint, load_weights
from util.checkpoints import read_checkpoint, resize_pos_embed
from util.pretrained import AS_DEIT
from vit import IMPLEMENTATIONS, VisionTransformer, create_model, set_attn_implementation


def read(path):
    """load_weights' source and checkpoint: a file's name and what read_checkpoint reads of it."""
    return str(path), read_checkpoint(str(path))


SMALL = dict(img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=3, num_heads=4)


def randomise(model, std=0.05):
    """Random values everywhere (torchvision zero-initialises its head, which would hide errors)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


@pytest.mark.parametrize('name,size', [('vit_b_16', 224), ('vit_b_32', 224)])
def test_torchvision_weights_give_torchvision_logits(tmp_path, name, size):
    torch.manual_seed(0)
    tv = randomise(getattr(torchvision.models, name)(image_size=size)).eval()
    path = tmp_path / f'{name}.pth'
    torch.save(tv.state_dict(), path)
    ours = build_from_checkpoint(str(path)).eval()
    assert ours.arch['depth'] == 12 and ours.arch['num_heads'] == 12 and ours.patch_embed.patch_size == int(name[-2:])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = tv(x)
        for implementation in IMPLEMENTATIONS:
            assert (set_attn_implementation(ours, implementation)(x) - ref).abs().max() < 1e-4, implementation


def test_same_logits_as_timm():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    ours = randomise(VisionTransformer(**SMALL)).eval()
    theirs = timm.models.vision_transformer.VisionTransformer(**SMALL).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)     # same names, same shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5
    pooled = randomise(VisionTransformer(**SMALL, global_pool=True)).eval()
    theirs = timm.models.vision_transformer.VisionTransformer(**SMALL, global_pool='avg', fc_norm=True).eval()
    theirs.load_state_dict(pooled.state_dict(), strict=True)
    with torch.no_grad():
        assert (pooled(x) - theirs(x)).abs().max() < 1e-5


def test_state_dict_round_trips_strictly(tmp_path):
    m = randomise(VisionTransformer(**SMALL))
    torch.save({'model': m.state_dict()}, tmp_path / 'mae_style.pth')      # no 'arch': read off tensors
    with pytest.raises(CheckpointError, match='do not say how many attention heads.*--num-heads N'):
        build_from_checkpoint(str(tmp_path / 'mae_style.pth'))                    # no record: never guessed
    back = build_from_checkpoint(str(tmp_path / 'mae_style.pth'), num_heads=4)
    assert back.arch == m.arch
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    VisionTransformer(**SMALL).load_state_dict(m.state_dict(), strict=True)


def test_mae_pretraining_checkpoint_loads_as_classifier(tmp_path):
    """An MAE pre-training file: encoder + norm + decoder + mask token, no head."""
    enc = randomise(VisionTransformer(**{**SMALL, 'num_classes': 0}))
    sd = {**enc.state_dict(), 'mask_token': torch.zeros(1, 1, 32), 'decoder_embed.weight': torch.zeros(32, 64),
          'decoder_blocks.0.attn.qkv.weight': torch.zeros(96, 32)}
    torch.save({'model': sd}, tmp_path / 'mae.pth')
    clf = load_weights(VisionTransformer(**SMALL, global_pool=True), *read(tmp_path / 'mae.pth'), num_heads=4)
    assert torch.equal(clf.blocks[2].mlp.fc2.weight, enc.blocks[2].mlp.fc2.weight)
    teacher = build_from_checkpoint(str(tmp_path / 'mae.pth'), num_heads=4)
    assert teacher.num_classes == 0 and torch.equal(teacher.norm.weight, enc.norm.weight)


def test_position_embedding_is_resized(tmp_path):
    m = randomise(VisionTransformer(**SMALL))
    torch.save(m.state_dict(), tmp_path / 'm.pth')
    big = load_weights(VisionTransformer(**{**SMALL, 'img_size': 64}), *read(tmp_path / 'm.pth'), num_heads=4)
    assert big.pos_embed.shape == (1, 1 + 64, 64)
    assert torch.equal(big.pos_embed[:, 0], m.pos_embed[:, 0])          # class token position kept
    assert torch.equal(resize_pos_embed(m.pos_embed, 4, AS_DEIT), m.pos_embed)    # same grid: untouched
    # a constant field stays constant under interpolation
    flat = torch.ones(1, 17, 8)
    assert torch.allclose(resize_pos_embed(flat, 6, AS_DEIT), torch.ones(1, 37, 8), atol=1e-5)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='not a readable'):
        build_from_checkpoint(str(tmp_path / 'notes.txt'))
    with pytest.raises(CheckpointError, match='no checkpoint'):
        build_from_checkpoint(str(tmp_path / 'missing.pth'))
    torch.save(VisionTransformer(**SMALL).state_dict(), tmp_path / 'm.pth')
    with pytest.raises(CheckpointError, match='architecture mismatch'):
        load_weights(VisionTransformer(**{**SMALL, 'embed_dim': 96}), *read(tmp_path / 'm.pth'), num_heads=4)
    with pytest.raises(CheckpointError, match='architecture mismatch'):   # deeper model: blocks missing
        load_weights(VisionTransformer(**{**SMALL, 'depth': 4}), *read(tmp_path / 'm.pth'), num_heads=4)


def test_sdpa_and_explicit_attention_agree_with_gradients():
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL)
    x = torch.randn(4, 3, 32, 32)
    outs, grads = [], []
    for implementation in ('sdpa', 'eager'):
        m.zero_grad()
        y = set_attn_implementation(m, implementation)(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


def test_attention_logits_and_early_stop():
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL).eval()
    ran = blocks_run(m)
    x = torch.randn(2, 3, 32, 32)
    maps = m.attention(x, layers=[1, 0])
    assert sorted(maps) == [0, 1] and ran == [0]      # block 1 ran only its norm and q/k, block 2 nothing
    assert maps[0].shape == (2, 4, 17, 17)
    # logits are q k^T / sqrt(d) of the layer's own q and k
    q, k = m.attention(x, [0], 'q')[0], m.attention(x, [0], 'k')[0]
    assert torch.allclose(maps[0], q @ k.transpose(-2, -1) / 4.0, atol=1e-5)


def test_attention_of_the_last_layer_skips_the_rest_of_its_block():
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    ran = []
    hook = m.blocks[1].mlp.register_forward_hook(lambda *a: ran.append('mlp'))
    maps = {what: m.attention(x, [0, 1], what) for what in ('logits', 'q', 'k', 'v')}
    assert ran == []
    hook.remove()
    _, kept = m(x, keep={0: ('logits', 'q', 'k', 'v'), 1: ('logits', 'q', 'k', 'v')})
    for what, by_layer in maps.items():
        for i in (0, 1):
            assert torch.allclose(by_layer[i], kept[i][what], atol=1e-6), (what, i)   # layer 0: fused or not


def test_injected_own_maps_reproduce_the_model():
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = m.attention(x, range(3))
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(m(x, inject={i: {'attn': a.softmax(-1)} for i, a in maps.items()}), ref, atol=1e-5)
        qs = m.attention(x, range(3), 'q')
        assert torch.allclose(m(x, inject={i: {'q': t} for i, t in qs.items()}), ref, atol=1e-5)
        # other maps change the output; giving them to a subset of heads changes it less
        uniform = torch.full_like(maps[1], 1 / 17)
        all_heads = m(x, inject={1: {'attn': uniform}})
        two_heads = m(x, inject={1: {'attn': uniform[:, :2], 'heads': [0, 1]}})
        assert not torch.allclose(all_heads, ref, atol=1e-3)
        assert not torch.allclose(two_heads, all_heads, atol=1e-4) and not torch.allclose(two_heads, ref, atol=1e-4)


def test_layer_without_query_key():
    m = VisionTransformer(**SMALL, no_qk_layers=(0, 2))
    names = {n for n, _ in m.named_parameters()}
    assert 'blocks.0.attn.v.weight' in names and 'blocks.0.attn.qkv.weight' not in names
    assert 'blocks.1.attn.qkv.weight' in names
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match='for every head'):
        m(x)
    maps = {i: torch.full((2, 4, 17, 17), 1 / 17) for i in (0, 2)}
    assert m(x, inject={i: {'attn': a} for i, a in maps.items()}).shape == (2, 7)


def test_factories_and_drop_path():
    m = create_model('vit_base', img_size=32, num_classes=3)
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_embed.patch_size) == (768, 12, 12, 16)
    assert create_model('vit_huge', img_size=28, depth=1).patch_embed.patch_size == 14
    with pytest.raises(ValueError, match='unknown model'):
        create_model('vit_gigantic')
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL, drop_path_rate=0.5)
    x = torch.randn(8, 3, 32, 32)
    assert not torch.equal(m.train()(x), m(x))                   # stochastic in training
    assert torch.equal(m.eval()(x), m(x))                        # deterministic in eval


@pytest.mark.parametrize('change', [dict(act='relu'), dict(num_heads=-4), dict(num_heads=0), dict(num_heads=5),
                                    dict(img_size=30)])
def test_the_constructor_refuses_what_it_cannot_build(change):
    """As timm's Attention asserts its heads divide the width: an activation it does not know (it ran as GELU) and
    heads that are not a positive divisor of the width (-4 divides 64) are refused where the ViT is built."""
    with pytest.raises((AssertionError, ValueError, ZeroDivisionError)):
        VisionTransformer(**{**SMALL, **change})


@pytest.mark.parametrize('shape, std', [((1, 50, 64), 0.02), ((10, 64), 2e-5), ((4096,), 1.5)])
def test_trunc_normal_draws_what_torch_draws_and_a_truncated_normal(shape, std):
    """vit.trunc_normal_ draws, from a seed, what torch's nn.init.trunc_normal_ draws where torch draws a normal and
    draws again what lies beyond its bounds (torch 2.14; torch 2.5 and 2.6 invert the CDF, other numbers: skipped
    there, saying so). On any torch, its values lie within ±2 and their spread is a truncated normal's, worked out
    in float64 from the normal's density (std 1.5: the bound cuts at 1.33 std)."""
    from vit import trunc_normal_
    torch.manual_seed(0)
    ours = trunc_normal_(torch.empty(shape), std=std)
    assert ours.abs().max() <= 2.0
    if std == 1.5:
        a = torch.tensor(2.0 / std, dtype=torch.float64)                      # the bound, in std
        pdf = torch.exp(-a ** 2 / 2) / (2 * torch.pi) ** 0.5
        mass = torch.special.erf(a / 2 ** 0.5)                               # P(|z| <= a)
        want = std * (1 - 2 * a * pdf / mass) ** 0.5                         # a two-sided truncated normal's std
        assert abs(ours.double().std() - want) < 0.03 * want and abs(ours.double().mean()) < 0.05
    torch.manual_seed(0)
    normal = torch.empty(64).normal_(0, 0.02)
    torch.manual_seed(0)
    if not torch.equal(torch.nn.init.trunc_normal_(torch.empty(64), std=0.02), normal):
        pytest.skip(f'torch {torch.__version__} draws trunc_normal_ by the inverse of the CDF')
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.init.trunc_normal_(torch.empty(shape), std=std))
