"""
The figures and numbers of results/fashion-mnist/VALIDATION.md: three figures drawn from the validation runs
committed under results/fashion-mnist/validation (each run's own metrics.jsonl), how sharp a teacher's attention
is, and the control teacher whose maps carry nothing.

    python -m tools.validation figures      # teacher_gap.png, teacher_variants.png, teacher_epochs.png, and their numbers
    python -m tools.validation entropy teachers/fashion-mnist-mae.pt [more teachers]
    python -m tools.validation uniform-teacher runs/uniform-teacher.pt

Every validation run: seed 0, 3 epochs a stage, blr 4e-3, layers 0-4, 5000 training images held out as the
validation split.
"""
import json
import math
import os
import sys

import torch
from matplotlib.figure import Figure

from data import build_eval_set
from mae_pretrain import gather_tokens, random_keep
from tools.features_maps import entropy
from tools.palette import PALETTE
from util.checkpoints import build_from_checkpoint
from util.config import ConfigError, TrainConfig
from util.files import replacing, save_figure
from util.launch import run_main

RUNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results/fashion-mnist/validation')
METHODS = ('finetune', 'copy', 'distill')


def final_top1(run):
    with open(os.path.join(RUNS, run, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f][-1]['top1']


def closed(method_top1, finetune_top1, scratch):
    """The share of the scratch-to-fine-tune gap a method closes, in %."""
    return 100 * (method_top1 - scratch) / (finetune_top1 - scratch)

# -----------------------------------------------------------------------------
# Top-1 and the gap closed against the teacher's pre-training length


# (MAE epochs, epochs in its schedule) -> the runs' folders
LENGTHS = {(12, 48): 'bf16-{}12of48', (24, 48): 'bf16-{}24of48', (48, 48): 'bf16-{}48', (24, 24): 'bf16-{}24'}


def teacher_gap(path=os.path.join(RUNS, 'teacher_gap.png')):
    scratch = final_top1('bf16-scratch')
    top1 = {(m, t): final_top1(LENGTHS[t].format(m.replace('finetune', 'ft'))) for m in METHODS for t in LENGTHS}
    fig = Figure(figsize=(10, 5), layout='constrained')
    left, right = fig.subplots(1, 2)
    for schedule, style in ((48, dict(marker='o')), (24, dict(marker='s', linestyle='none', markersize=8))):
        epochs = sorted(e for e, s in LENGTHS if s == schedule)
        note = 'a 48-epoch MAE run' if schedule == 48 else 'the 4-head teacher shipped before (24 of 24)'
        for m in METHODS:
            left.plot(epochs, [top1[m, (e, schedule)] for e in epochs], color=PALETTE[m], label=f'{m}: {note}',
                      **style)
        for m in METHODS[1:]:
            right.plot(epochs, [closed(top1[m, (e, schedule)], top1['finetune', (e, schedule)], scratch)
                                for e in epochs], color=PALETTE[m], label=f'{m}: {note}', **style)
    left.axhline(scratch, color=PALETTE['scratch'], linestyle='--', label='scratch (no teacher)')
    left.set(xlabel='teacher: epochs of MAE pre-training', ylabel='validation top-1 (%) after 3 epochs')
    for target, m in ((50, 'copy'), (78, 'distill')):
        right.axhline(target, color=PALETTE[m], linestyle=':', label=f'{m}: target, {target}%')
    left.set_title('(the axis does not start at 0)', fontsize=9)
    right.set(xlabel='teacher: epochs of MAE pre-training', ylabel='scratch-to-fine-tune gap closed (%)',
              ylim=(0, 100))
    for ax in (left, right):
        ax.set_xticks(sorted({e for e, _ in LENGTHS}))
        ax.grid(alpha=0.3)
    legend = {}
    for ax in (left, right):
        legend.update({label: h for h, label in zip(*ax.get_legend_handles_labels())})
    fig.legend(legend.values(), legend.keys(), loc='outside lower center', ncol=3, fontsize=8)
    fig.suptitle('Fashion-MNIST, 6 x 64 ViT, 3 epochs a stage, seed 0, 5000 held-out training images')
    save_figure(fig, path, dpi=100)
    for t in LENGTHS:
        print(t, {m: top1[m, t] for m in METHODS},
              {m: round(closed(top1[m, t], top1['finetune', t], scratch), 1) for m in METHODS[1:]})
    return fig

# -----------------------------------------------------------------------------
# The gap closed with each MAE teacher tried


# what differs from the first shipped teacher (24 epochs, 75% masked, decoder 2 blocks x 64, norm_pix_loss, 4
# heads) -> the suffix of its runs' folders, bf16-{ft,copy,distill}<suffix>
VARIANTS = {'4 heads (shipped before)': '24', '48 epochs': '48', '50% masked': '-m50', '90% masked': '-m90',
            'decoder 4 x 64': '-d4', 'decoder 1 x 64': '-d1', 'decoder 2 x 32': '-w32', 'no norm_pix_loss': '-nonorm',
            'blr 3e-3': '-blr3', 'blr 6e-3': '-blr6', '8 heads, students too (shipped)': '-h8'}
# a teacher whose students differ from the 4-head one's (8 heads) is measured against their own scratch
SCRATCH = {'-h8': 'bf16-scratch-h8'}


def teacher_variants(path=os.path.join(RUNS, 'teacher_variants.png')):
    scratch = final_top1('bf16-scratch')
    rows = []
    for name, suffix in VARIANTS.items():
        runs = [f'bf16-{m}{suffix}' for m in ('ft', 'copy', 'distill')] + [SCRATCH.get(suffix, 'bf16-scratch')]
        ft, copy, distill, own = map(final_top1, runs)
        base = f'scratch {own:.2f}, ' if suffix in SCRATCH else ''
        rows.append((f'{name}\n({base}fine-tune {ft:.2f})', closed(copy, ft, own), closed(distill, ft, own)))
        print(f'{name}: fine-tune {ft:.2f}, copy {copy:.2f} ({rows[-1][1]:.1f}%), '
              f'distill {distill:.2f} ({rows[-1][2]:.1f}%)')
    fig = Figure(figsize=(8, 0.75 * len(rows) + 1.5), layout='constrained')
    ax = fig.subplots()
    y = range(len(rows))
    for k, method in enumerate(('copy', 'distill')):
        bars = ax.barh([i + 0.2 * (2 * k - 1) for i in y], [r[1 + k] for r in rows], height=0.4,
                       color=PALETTE[method], label=method)
        ax.bar_label(bars, fmt='%.1f', fontsize=8, padding=2)
    for target, method in ((50, 'copy'), (78, 'distill')):
        ax.axvline(target, color=PALETTE[method], linestyle=':', label=f'target, {target}%')
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=f'scratch-to-fine-tune gap closed (%); scratch {scratch:.2f}', xlim=(0, 100),
           title='Fashion-MNIST, 6 x 64 ViT, 3 epochs a stage, seed 0, validation split')
    ax.grid(axis='x', alpha=0.3)
    ax.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.06), ncol=4)
    save_figure(fig, path, dpi=100)
    return fig

# -----------------------------------------------------------------------------
# Top-1 after one epoch against the teacher's pre-training length (teacher_epochs.json: runs of 1 epoch)


def teacher_epochs(path=os.path.join(RUNS, 'teacher_epochs.png')):
    with open(os.path.join(RUNS, 'teacher_epochs.json')) as f:
        runs = json.load(f)
    fig = Figure(figsize=(6, 4), layout='constrained')
    ax = fig.subplots()
    for method in METHODS:
        points = sorted((r['teacher_epochs'], r['top1']) for r in runs['runs'] if r['method'] == method)
        ax.plot(*zip(*points), marker='o', color=PALETTE[method], label=method)
    ax.axhline(runs['scratch'], color=PALETTE['scratch'], linestyle='--', label='scratch (no teacher)')
    ax.set(xlabel='teacher: MAE pre-training epochs', ylabel='validation top-1 (%) after 1 epoch',
           title='Fashion-MNIST, 6 x 64 ViT, seed 0 (scratch: its best lr, 4e-3)\n(the axis does not start at 0)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
    return fig

# -----------------------------------------------------------------------------
# How sharp a teacher's attention is: the mean entropy of its maps per layer and head, on the first 1000 held-out
# images, as a fraction of an even map's (ln of the tokens). Twice: on all the patches, as attention transfer shows
# them, and on a quarter of them (and the class token), as MAE pre-training with 75% masked did


@torch.no_grad()
def entropies(teacher, images, keep=None):
    """{layer: (H,) entropies}: on every patch, or on `keep` random patches of each image (and the class
    token), embedded as MAE's encoder embeds them."""
    if keep is None:
        return {i: entropy(t) for i, t in teacher.attention(images, range(len(teacher.blocks))).items()}
    x = teacher.patch_embed(images) + teacher.pos_embed[:, 1:]                        # (B, N, D)
    ids = random_keep(len(x), x.shape[1], keep, generator=torch.Generator().manual_seed(0))
    cls = (teacher.cls_token + teacher.pos_embed[:, :1]).expand(len(x), -1, -1)
    x, out = torch.cat([cls, gather_tokens(x, ids)], dim=1), {}                       # (B, 1 + keep, D)
    for i, block in enumerate(teacher.blocks):
        x, kept = block(x, keep=('logits',))
        out[i] = entropy(kept['logits'])
    return out


def print_entropies(paths):
    held_out, _ = build_eval_set(TrainConfig(data='fashion-mnist', val_size=5000))
    images = torch.stack([held_out[i][0] for i in range(1000)])
    for path in paths:
        teacher = build_from_checkpoint(path).eval()
        patches = teacher.patch_embed.num_patches
        for keep in (None, patches // 4):
            tokens = 1 + (keep or patches)
            print(f'{path}, {tokens} tokens: mean entropy per layer in nats, its fraction of ln {tokens} = '
                  f'{math.log(tokens):.2f} (an even map), each head in brackets')
            for i, h in entropies(teacher, images, keep).items():
                print(f'  layer {i}: {h.mean():.2f} ({h.mean() / math.log(tokens):.2f})  '
                      f'[{" ".join(f"{v:.2f}" for v in h.tolist())}]')

# -----------------------------------------------------------------------------
# A control for attention copy: the shipped teacher with every query projection set to zero, so that each of its
# maps spreads evenly over all tokens (every logit q . k is 0) whatever the image; copied, they give the student
# fixed, even mixing and nothing of the teacher. Train on it: python attention_copy.py --teacher <out> ...


def uniform_teacher(out, source='teachers/fashion-mnist-mae.pt'):
    if os.path.exists(out):
        raise ConfigError(f'{out} exists: name a new file (nothing is written over)')
    ckpt = torch.load(source, map_location='cpu', weights_only=True)
    dim = ckpt['arch']['embed_dim']
    for k, v in ckpt['model'].items():
        if k.endswith('attn.qkv.weight') or k.endswith('attn.qkv.bias'):
            v[:dim] = 0          # the rows of q: [q; k; v] stacked along the output features
    ckpt['made'] = {**ckpt.get('made', {}), 'command': f'python -m tools.validation uniform-teacher {out}'}
    with replacing(out) as tmp:
        torch.save(ckpt, tmp)


def main():
    what, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ('', [])
    if what == 'figures' and not args:
        teacher_gap(), teacher_variants(), teacher_epochs()
    elif what == 'entropy' and args:
        print_entropies(args)
    elif what == 'uniform-teacher' and len(args) == 1:
        uniform_teacher(args[0])
    else:
        raise ConfigError('usage: python -m tools.validation figures | entropy TEACHER.pt ... | uniform-teacher OUT.pt')


if __name__ == '__main__':
    run_main(main)
