"""Validation top-1 after one epoch against the teacher's MAE pre-training length (VALIDATION.md):
    python -m tools.teacher_epochs   # writes results/fashion-mnist/validation/teacher_epochs.png"""
import json
import os

from matplotlib.figure import Figure

from tools.palette import PALETTE
from util.files import save_figure

RUNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results/fashion-mnist/validation')


def main(path=os.path.join(RUNS, 'teacher_epochs.png')):
    runs = json.load(open(os.path.join(RUNS, 'teacher_epochs.json')))
    fig = Figure(figsize=(6, 4), layout='constrained')
    ax = fig.subplots()
    for method in ('finetune', 'copy', 'distill'):
        points = sorted((r['teacher_epochs'], r['top1']) for r in runs['runs'] if r['method'] == method)
        ax.plot(*zip(*points), marker='o', color=PALETTE[method], label=method)
    ax.axhline(runs['scratch'], color=PALETTE['scratch'], linestyle='--', label='scratch (no teacher)')
    ax.set(xlabel='teacher: MAE pre-training epochs', ylabel='validation top-1 (%) after 1 epoch',
           title='Fashion-MNIST, 6 x 64 ViT, seed 0 (scratch: its best lr, 4e-3)\n(the axis does not start at 0)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
    return fig


if __name__ == '__main__':
    main()
