"""Validation top-1 after three epochs a stage, and the share of the scratch-to-fine-tune gap that copy and
distillation close, against the teacher's MAE pre-training length (VALIDATION.md), read from the runs' own
metrics.jsonl under results/fashion-mnist/validation:
    python -m tools.teacher_gap   # writes results/fashion-mnist/validation/teacher_gap.png"""
import json
import os

from matplotlib.figure import Figure

from tools.palette import PALETTE
from tools.reproduce_report import gap_closed
from util.files import save_figure

# the validation runs these figures read, and where the figures go
RUNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results/fashion-mnist/validation')
METHODS = ('finetune', 'copy', 'distill')
# (MAE epochs, epochs in its schedule) -> the runs' folders; every run: seed 0, 3 epochs, blr 4e-3, layers 0-4
TEACHERS = {(12, 48): 'bf16-{}12of48', (24, 48): 'bf16-{}24of48', (48, 48): 'bf16-{}48', (24, 24): 'bf16-{}24'}


def final_top1(run):
    with open(os.path.join(RUNS, run, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f][-1]['top1']


def closed(method_top1, finetune_top1, scratch):
    return 100 * gap_closed(method_top1, scratch, finetune_top1)


def main(path=os.path.join(RUNS, 'teacher_gap.png')):
    scratch = final_top1('bf16-scratch')
    top1 = {(m, t): final_top1(TEACHERS[t].format(m.replace('finetune', 'ft'))) for m in METHODS for t in TEACHERS}
    fig = Figure(figsize=(10, 5), layout='constrained')
    left, right = fig.subplots(1, 2)
    for schedule, style in ((48, dict(marker='o')), (24, dict(marker='s', linestyle='none', markersize=8))):
        epochs = sorted(e for e, s in TEACHERS if s == schedule)
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
        ax.set_xticks(sorted({e for e, _ in TEACHERS}))
        ax.grid(alpha=0.3)
    legend = {}
    for ax in (left, right):
        legend.update({label: h for h, label in zip(*ax.get_legend_handles_labels())})
    fig.legend(legend.values(), legend.keys(), loc='outside lower center', ncol=3, fontsize=8)
    fig.suptitle('Fashion-MNIST, 6 x 64 ViT, 3 epochs a stage, seed 0, 5000 held-out training images')
    save_figure(fig, path, dpi=100)
    for t in TEACHERS:
        print(t, {m: top1[m, t] for m in METHODS},
              {m: round(closed(top1[m, t], top1['finetune', t], scratch), 1) for m in METHODS[1:]})
    return fig


if __name__ == '__main__':
    main()
