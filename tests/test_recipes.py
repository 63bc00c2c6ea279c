"""Every --data imagenet preset, field for field, against the commands it comes from (written out here,
with their sources; RECIPES.md says the same in prose), and the two places where a recipe is more than
its numbers: the release's layer-wise lr decay and its copy schedule. Also: the fine-tuning head's
initialisation, and that the ImageNet fine-tuning recipe cannot run without weights by accident."""
import math
import os
import re
from dataclasses import asdict, fields

import pytest
import torch

from attention_copy import PRESETS as COPY, CopyConfig
from attention_distill import PRESETS as DISTILL, DistillConfig
from conftest import run_script
from finetune import PRESETS as FINETUNE, FinetuneConfig, build_model, presets
from mae_pretrain import PRESETS as MAE, MAEConfig
from teacher import parse_index
from tools.reproduce import PRESETS as REPRODUCE, ReproduceConfig
from util.launch import parse_config
from util.config import ConfigError
from util.engine import build_optimizer, lr_at
from vit import create_model

# -----------------------------------------------------------------------------
# The table. Sources: the release's README commands and main_finetune.py defaults (alexlioralexli/
# attention-transfer), MAE's FINETUNE.md / PRETRAIN.md and main_*.py defaults, the MAE paper's Table 11.

# settings of a run, not of a recipe: everything else must be in the table below
RUN_FIELDS = {'data', 'data_dir', 'val_size', 'out_dir', 'resume', 'amp', 'attn_implementation', 'compile', 'seed',
              'cuda_graph', 'eval_batch_size',
              'fake_size', 'log_every', 'save_every', 'max_steps', 'new_teacher', 'new_data', 'export', 'overwrite', 'dist_timeout',
              'teacher_num_heads', 'init_num_heads'}   # what the user's files are, not what a recipe trains
# timm's augmentation as main_finetune.py sets it up: --aa default, --reprob 0.25 (mode 'pixel', count 1),
# RandomResizedCrop (0.08, 1) and flip 0.5 (create_transform defaults), label smoothing default 0.1
AUGMENT = dict(hflip=0.5, min_scale=0.08, crop_pad=2, randaug='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8,
               cutmix=1.0, smoothing=0.1)      # crop_pad: unused at ImageNet scale (the small presets' crop)
VIT_L = dict(model='vit_large', img_size=224, patch_size=16, embed_dim=None, depth=None, num_heads=None)
STUDENT = dict(teacher='mae_vit_large', model='teacher', img_size=224, patch_size=0, embed_dim=None, depth=None,
               num_heads=None, heads='all', transfer='attn',       # dual_vit_large_patch16, mae_pretrain_vit_large.pth
               average_maps='none',                                # the map of each image and query, as it is
               layer_map='auto',                                   # the teacher's depth: the identity
               student_arch='auto')                                # MAE's plain ViT: auto's student is plain
PLAIN_VIT = dict(layer_scale=0.0, norm_pre=False, act='gelu')   # MAE's ViT-L: none of other families' parts
RECIPES = {
    'finetune': dict(   # MAE FINETUNE.md, ViT-Large: 4 nodes x 8 GPUs x 32 = 1024
        **VIT_L, **AUGMENT, init='mae_vit_large', scratch=False, global_pool=True, drop_path=0.2, epochs=50,
        warmup_epochs=5, batch_size=32, accum_steps=1, blr=1e-3, min_lr=1e-6, min_lr_ratio=0.0, weight_decay=0.05, layer_decay=0.75,
        layer_decay_offset=1, beta2=0.999, clip_grad=0.0, ema=0.0, num_workers=10, **PLAIN_VIT),
    'scratch': dict(    # MAE paper Table 11 (ViT-L): 4096 = 64 GPUs x 64; no random erasing in the table
        **VIT_L, **{**AUGMENT, 'reprob': 0.0}, init='', scratch=True, global_pool=True, drop_path=0.2, epochs=200,
        warmup_epochs=20, batch_size=64, accum_steps=1, blr=1e-4, min_lr=1e-6, min_lr_ratio=0.0, weight_decay=0.3, layer_decay=1.0,
        layer_decay_offset=1, beta2=0.95, clip_grad=0.0, ema=0.9999, num_workers=10, **PLAIN_VIT),
    'copy': dict(       # release README, Attention Copy: 8 nodes x 8 GPUs x 32 = 2048; --warmup_epochs default 5
        **STUDENT, **AUGMENT, layers='all', global_pool=True, drop_path=0.0, epochs=100, warmup_epochs=5,
        batch_size=32, accum_steps=1, blr=1e-3, min_lr=1e-6, min_lr_ratio=0.25, weight_decay=0.05, layer_decay=0.75,
        layer_decay_offset=0, beta2=0.999, clip_grad=0.0, ema=0.9999, num_workers=10),
    'distill': dict(    # release README, Attention Distillation: --end_layer -6, --atd_weight 3.0
        **STUDENT, **AUGMENT, layers='0-17', weight=3.0, maps='teacher', global_pool=True, drop_path=0.2, epochs=200,
        warmup_epochs=20, batch_size=32, accum_steps=1, blr=1e-4, min_lr=1e-6, min_lr_ratio=0.0, weight_decay=0.3, layer_decay=1.0,
        layer_decay_offset=0, beta2=0.95, clip_grad=0.0, ema=0.9999, num_workers=10),
    'mae_pretrain': dict(   # MAE PRETRAIN.md: 8 nodes x 8 GPUs x 64 = 4096; main_pretrain.py: crop (0.2, 1), flip
        **VIT_L, global_pool=False, drop_path=0.0, hflip=0.5, min_scale=0.2, crop_pad=2, randaug='', reprob=0.0,
        mixup=0.0, cutmix=0.0, smoothing=0.0, epochs=800, warmup_epochs=40, batch_size=64, accum_steps=1, blr=1.5e-4,
        min_lr=0.0, min_lr_ratio=0.0, weight_decay=0.05, layer_decay=1.0, layer_decay_offset=1, beta2=0.95, clip_grad=0.0, ema=0.0,
        num_workers=10, mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True,
        **PLAIN_VIT),
}
GLOBAL_BATCH = {'finetune': (32, 1024), 'scratch': (64, 4096), 'copy': (64, 2048), 'distill': (64, 2048),
                'mae_pretrain': (64, 4096)}     # GPUs, the batch the recipe's blr is scaled by


def imagenet_config(script, *flags):
    argv = ['--data', 'imagenet', *flags]
    cls, chosen = {'finetune': (FinetuneConfig, presets(argv)), 'copy': (CopyConfig, COPY),
                   'distill': (DistillConfig, DISTILL), 'mae_pretrain': (MAEConfig, MAE)}[script]
    return cls, parse_config(cls, chosen, argv)


@pytest.mark.parametrize('name', RECIPES)
def test_every_field_of_every_imagenet_preset(name):
    script, flags = ('finetune', ['--scratch', 'true']) if name == 'scratch' else (name, [])
    cls, cfg = imagenet_config(script, *flags)
    recipe = {k: v for k, v in asdict(cfg).items() if k not in RUN_FIELDS}
    assert set(recipe) == {f.name for f in fields(cls)} - RUN_FIELDS
    assert recipe == RECIPES[name]
    gpus, batch = GLOBAL_BATCH[name]
    assert cfg.batch_size * cfg.accum_steps * gpus == batch

# -----------------------------------------------------------------------------
# Layer-wise lr decay: util/lr_decay.py of the release (num_layers = depth for its dual model) and of MAE
# (num_layers = depth + 1), written out


def release_lr_scales(names, decay, num_layers):
    """{parameter name: lr scale} by param_groups_lrd / get_layer_id_for_vit."""
    scales = [decay ** (num_layers - i) for i in range(num_layers + 1)]

    def layer_id(n):
        if n.startswith(('cls_token', 'pos_embed', 'patch_embed')):
            return 0
        if n.startswith('blocks'):
            return int(n.split('.')[1]) + 1
        return num_layers
    return {n: scales[layer_id(n)] for n in names}


def lr_scales(cfg, model):
    opt = build_optimizer(cfg, model, lr=1.0)
    by_id = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize('depth', [2, 24])
def test_layer_decay_counts_as_the_release_and_as_mae(depth):
    _, copy = imagenet_config('copy')
    _, ft = imagenet_config('finetune')
    for no_qk in ((), range(depth)):      # a plain ViT and a copy student (no q/k in its copied blocks)
        model = create_model('vit_tiny', depth=depth, embed_dim=48, num_heads=3, img_size=32, patch_size=8,
                             num_classes=10, global_pool=True, no_qk_layers=no_qk)
        names = [n for n, _ in model.named_parameters()]
        assert lr_scales(copy, model) == pytest.approx(release_lr_scales(names, 0.75, depth))
        assert lr_scales(ft, model) == pytest.approx(release_lr_scales(names, 0.75, depth + 1))
    ours = lr_scales(copy, model)
    if depth == 24:    # ViT-L under the copy recipe: the last block trains at the full lr, not 0.75x
        assert ours['blocks.23.mlp.fc2.weight'] == ours['head.weight'] == 1.0
        assert ours['blocks.0.attn.v.weight'] == pytest.approx(0.75 ** 23)
        assert ours['pos_embed'] == pytest.approx(0.75 ** 24)

# -----------------------------------------------------------------------------
# The copy schedule: peak 1e-3 x 2048 / 256 = 8e-3, 5 warm-up epochs, cosine down to the release's absolute 2e-3,
# a quarter of the peak: at any other batch the same quarter of its peak


def test_copy_schedule_is_the_releases():
    _, cfg = imagenet_config('copy')
    peak = cfg.blr * 2048 / 256

    def release(epoch):    # util/lr_sched.adjust_learning_rate, with the release's --min_lr 2e-3
        if epoch < cfg.warmup_epochs:
            return peak * epoch / cfg.warmup_epochs
        return 2e-3 + (peak - 2e-3) * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / (100 - 5)))
    for epoch in [0.0, 0.3, 2.5, 4.99, 5.0, 17.2, 50.0, 99.9, 100.0]:
        assert lr_at(cfg, peak, epoch) == pytest.approx(release(epoch), rel=1e-12), epoch
    assert peak == 8e-3 and lr_at(cfg, peak, 5.0) == pytest.approx(8e-3)
    assert lr_at(cfg, peak, 100.0) == pytest.approx(2e-3)


@pytest.mark.parametrize('batch', [4, 256, 2048])
def test_copy_schedule_decays_at_any_batch(batch):
    """8 GPUs x 32 = 256 (or 4 images) decays as the release's 2048 does: to the same fraction of the peak."""
    _, cfg = imagenet_config('copy')
    peak = cfg.blr * batch / 256
    lrs = [lr_at(cfg, peak, e) for e in (5.0, 50.0, 100.0)]
    assert lrs[0] > lrs[1] > lrs[2] == pytest.approx(peak / 4)


@pytest.mark.parametrize('script, flags', [('finetune.py', ['--blr', '1e-4', '--min-lr', '0.5']),
                                           ('attention_copy.py', ['--data', 'imagenet', '--min-lr', '1e-5'])])
def test_a_final_lr_above_the_peak_or_unused_is_refused(script, flags, tmp_path):
    r = run_script(script, '--data', 'fake', *flags, '--out-dir', str(tmp_path / 'r'))
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip().count('\n') == 0 and '--min-lr' in r.stderr, r.stderr
    assert not (tmp_path / 'r').exists()


# -----------------------------------------------------------------------------
# Fine-tuning: a new head starts at std 2e-5 (MAE main_finetune); no weights only with --scratch true


def test_new_head_starts_near_zero(tmp_path):
    small = dict(depth=2, embed_dim=48, num_heads=3, img_size=32, patch_size=8, global_pool=True)
    src = create_model('vit_tiny', **small, num_classes=0)       # an encoder, as MAE's pre-trained checkpoints
    torch.save({'model': src.state_dict()}, tmp_path / 'encoder.pt')
    torch.manual_seed(0)
    encoder = FinetuneConfig(**small, init=str(tmp_path / 'encoder.pt'), init_num_heads=3)   # weights alone
    head = build_model(encoder, 100, encoder.resolve()).head.weight              # (100, 48); its file as resolved
    assert 1.5e-5 < head.std() < 2.5e-5 and head.abs().max() < 1e-4
    cfg = FinetuneConfig(**small)
    scratch = build_model(cfg, 100, cfg.resolve()).head.weight
    assert 0.015 < scratch.std() < 0.025                           # vit.py's 0.02 from scratch
    full = create_model('vit_tiny', **small, num_classes=100)      # a classifier for this very task keeps its head
    torch.save({'model': full.state_dict()}, tmp_path / 'classifier.pt')
    classifier = FinetuneConfig(**small, init=str(tmp_path / 'classifier.pt'), init_num_heads=3)
    assert torch.equal(build_model(classifier, 100, classifier.resolve()).head.weight, full.head.weight)


def test_imagenet_fine_tuning_without_weights_is_refused():
    with pytest.raises(ConfigError, match='--scratch true'):
        presets(['--data', 'imagenet', '--init', ''])
    with pytest.raises(ConfigError, match='drop --init'):
        presets(['--data', 'imagenet', '--scratch', 'true', '--init', 'mae_vit_large'])
    assert parse_config(FinetuneConfig, presets(['--data', 'fake']), ['--data', 'fake']).init == ''   # small: scratch
    p = run_script('finetune.py', '--data', 'imagenet', '--init', '', '--out-dir', 'runs/never-made')
    assert p.returncode != 0 and p.stderr.strip().count('\n') == 0 and '--scratch true' in p.stderr

# -----------------------------------------------------------------------------
# Which layers: the paper's choice in each preset, the release's runs (layers 0-20 of ViT-L, its builder's
# end_layer -3, since --end_layer never reached the model) one flag away


@pytest.mark.parametrize('script, paper', [('copy', list(range(24))), ('distill', list(range(18)))])
def test_layers_the_paper_and_the_releases_runs(script, paper):
    _, cfg = imagenet_config(script)
    assert parse_index(cfg.layers, 24, 'layers') == paper
    cls, chosen = {'copy': (CopyConfig, COPY), 'distill': (DistillConfig, DISTILL)}[script]
    release = parse_config(cls, chosen, ['--data', 'imagenet', '--layers', '0-20'])
    assert parse_index(release.layers, 24, 'layers') == list(range(24 - 3))
    assert asdict(release) == {**asdict(cfg), 'layers': '0-20'}          # nothing else changes

# -----------------------------------------------------------------------------
# RECIPES.md's tables of the small presets: every cell is the preset's value, every preset field has its row

SCRIPTS = {'finetune.py': (FinetuneConfig, FINETUNE, []),
           'attention_copy.py': (CopyConfig, COPY, ['--teacher', 't']),
           'attention_distill.py': (DistillConfig, DISTILL, ['--teacher', 't']),
           'mae_pretrain.py': (MAEConfig, MAE, []), 'reproduce.py': (ReproduceConfig, REPRODUCE, [])}


def small_preset_tables():
    """{(script, data): {field: cell}} from the '#### `--data ...`' and '#### `tools/reproduce.py`' tables of
    RECIPES.md; a cell is the value as typed on the command line, a dash where the script has no such field."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'RECIPES.md')).read()
    out = {}
    for heading, body in re.findall(r'\n#### (.+)\n((?:.*\n)*?)(?=\n#|\Z)', text[text.index('## The small presets'):]):
        rows = [[c.strip().strip('`') for c in line.strip().strip('|').split('|')]
                for line in body.splitlines() if line.startswith('|') and not line.startswith('|---')]
        header, rows = rows[0], rows[1:]
        if heading == '`tools/reproduce.py`':                      # columns: data sets
            keys = [('reproduce.py', h.removeprefix('--data ')) for h in header[1:-1]]
        else:                                                # columns: scripts; the heading names the data sets
            keys = [(h, d) for d in re.findall(r'`--data ([\w-]+)`', heading) for h in header[1:-1]]
        for key in keys:
            col = header.index(key[0] if key[0] != 'reproduce.py' else f'--data {key[1]}')
            out[key] = {row[0]: row[col] for row in rows}
    return out


def test_recipes_md_holds_every_small_preset_field_for_field():
    tables = small_preset_tables()
    for script, (cls, chosen, extra) in SCRIPTS.items():
        for data in chosen:
            if data == 'imagenet':
                continue
            table = tables[(script, data)]
            assert set(chosen[data]) - {'data'} <= {f for f, cell in table.items() if cell != '—'}, (script, data)
            base = parse_config(cls, chosen, ['--data', data, *extra])
            for name, cell in table.items():
                if cell == '—':
                    assert name not in asdict(base), (script, name)
                    continue
                value = [''] if cell == "''" else cell.split()
                typed = parse_config(cls, chosen, ['--data', data, *extra, '--' + name.replace('_', '-'), *value])
                assert typed == base, f'RECIPES.md: {script} --data {data} --{name} {cell}: the preset has ' \
                                      f'{getattr(base, name)!r}'
