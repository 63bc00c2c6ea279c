"""The share of the scratch-to-fine-tune gap that copy and distillation close with each MAE teacher tried:
pre-training length, mask ratio, the decoder's depth and width, norm_pix_loss, the pre-training lr, the number
of heads (VALIDATION.md). Every run: seed 0, 3 epochs a stage, blr 4e-3, layers 0-4, 5000 held-out training
images; read from the runs' own metrics.jsonl in results/fashion-mnist/validation:
    python -m tools.teacher_variants   # writes results/fashion-mnist/validation/teacher_variants.png"""
import os

from matplotlib.figure import Figure

from tools.palette import PALETTE
from tools.teacher_gap import RUNS, closed, final_top1
from util.files import save_figure

# what differs from the first shipped teacher (24 epochs, 75% masked, decoder 2 blocks x 64, norm_pix_loss, 4
# heads) -> the suffix of its runs' folders, bf16-{ft,copy,distill}<suffix>
TEACHERS = {'4 heads (shipped before)': '24', '48 epochs': '48', '50% masked': '-m50', '90% masked': '-m90',
            'decoder 4 x 64': '-d4', 'decoder 1 x 64': '-d1', 'decoder 2 x 32': '-w32', 'no norm_pix_loss': '-nonorm',
            'blr 3e-3': '-blr3', 'blr 6e-3': '-blr6', '8 heads, students too (shipped)': '-h8'}
# a teacher whose students differ from the 4-head one's (8 heads) is measured against their own scratch
SCRATCH = {'-h8': 'bf16-scratch-h8'}


def main(path=os.path.join(RUNS, 'teacher_variants.png')):
    scratch = final_top1('bf16-scratch')
    rows = []
    for name, suffix in TEACHERS.items():
        runs = [f'bf16-{m}{suffix}' for m in ('ft', 'copy', 'distill')] + [SCRATCH.get(suffix, 'bf16-scratch')]
        ft, copy, distill, own = map(final_top1, runs)
        base = f'scratch {own:.2f}, ' if suffix in SCRATCH else ''
        rows.append((f'{name}\n({base}fine-tune {ft:.2f})', closed(copy, ft, own), closed(distill, ft, own)))
        print(f'{name}: fine-tune {ft:.2f}, copy {copy:.2f} ({rows[-1][1]:.1f}%), '
              f'distill {distill:.2f} ({rows[-1][2]:.1f}%)')
    fig = Figure(figsize=(8, 0.75 * len(rows) + 1.5), layout='constrained')
    ax = fig.subplots()
    y = range(len(rows))
    for k, (method, color) in enumerate((('copy', PALETTE['copy']), ('distill', PALETTE['distill']))):
        values = [r[1 + k] for r in rows]
        bars = ax.barh([i + 0.2 * (2 * k - 1) for i in y], values, height=0.4, color=color, label=method)
        ax.bar_label(bars, fmt='%.1f', fontsize=8, padding=2)
    for target, color in ((50, PALETTE['copy']), (78, PALETTE['distill'])):
        ax.axvline(target, color=color, linestyle=':', label=f'target, {target}%')
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=f'scratch-to-fine-tune gap closed (%); scratch {scratch:.2f}', xlim=(0, 100),
           title='Fashion-MNIST, 6 x 64 ViT, 3 epochs a stage, seed 0, validation split')
    ax.grid(axis='x', alpha=0.3)
    ax.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.06), ncol=4)
    save_figure(fig, path, dpi=100)
    return fig


if __name__ == '__main__':
    main()
