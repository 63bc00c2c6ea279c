"""Your runs' curves: test top-1, loss and lr against the training images seen, for any run directories a script of
this repository wrote (a smoke test, the quick command's stages, a long run on a cluster), several in one figure, each
labelled by its folder:

    python -m tools.curves runs/copy runs/distill                  # -> runs/curves.png, beside them
    python -m tools.curves runs/reproduce/fashion-mnist-quick/*/seed0 --out curves.png

Top-1 and the test loss are read from each run's metrics.jsonl (one record an evaluation), the training loss and the lr
from the progress lines of its log.txt (one every --log-every steps); images seen are the step times the images a step
takes (config.json). The figures are drawn as the notebook's are (tools/tutorial.py)."""
import argparse
import os
import re

import matplotlib.pyplot as plt

from tools.tutorial import images_a_step, mark_axes, metrics, seen
from util.files import read_bytes, save_figure
from util.launch import run_main

# a progress line of util/engine.py: 'epoch   0.21 step 100/1404 | ce 1.9627 attn 19.0639 | lr 1.41e-03 | ...'
# (mae_pretrain.py's first loss is mse)
PROGRESS = re.compile(r'step (\d+)/\d+ \| \w+ ([-\d.e+]+).* \| lr ([-\d.e+]+) \|')


def progress(run_dir):
    """{step: (training loss, lr)} from the run's log.txt, the loss its first term (the cross-entropy on the labels;
    an MAE's masked mse); a resumed run's repeated steps keep the last."""
    text = read_bytes(os.path.join(run_dir, 'log.txt'), 'name a run folder that holds its log')
    found = (PROGRESS.search(line) for line in text.decode(errors='replace').splitlines())
    return {int(m[1]): (float(m[2]), float(m[3])) for m in found if m}


def shared_folder(run_dirs):
    """The folder the runs share: the one above a single run, else the runs' common path."""
    paths = [os.path.abspath(d) for d in run_dirs]
    return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])


def label(run_dirs):
    """Each run's folder, relative to the folder the runs share: 'copy/seed0' for runs/reproduce/x/copy/seed0."""
    return [os.path.relpath(os.path.abspath(d), shared_folder(run_dirs)) for d in run_dirs]


def draw(run_dirs):
    """The figure: top-1, loss (training cross-entropy solid, test loss dashed with dots), lr; one colour a run."""
    fig, (top1, loss, lr) = plt.subplots(1, 3, figsize=(14, 3.8), layout='constrained')
    for i, (d, name) in enumerate(zip(run_dirs, label(run_dirs))):
        c = f'C{i}'   # the colour cycle's i-th (it repeats)
        evals = metrics(d)
        x = seen(d)
        if 'top1' in evals[-1]:   # an MAE's run has none
            top1.plot(x, [r['top1'] for r in evals], marker='o', color=c,
                      label=f"{name}: {evals[-1]['top1']:.2f}%")
        loss.plot(x, [r.get('loss', r.get('mse')) for r in evals], marker='o', ls='--', color=c)
        steps = progress(d)
        at = [s * images_a_step(d) / 1000 for s in steps]
        loss.plot(at, [ce for ce, _ in steps.values()], color=c, label=name)
        lr.plot(at, [v for _, v in steps.values()], color=c, label=name)
    top1.set(title='test top-1 after each evaluation', ylabel='top-1 (%)')
    loss.set(title='loss: training (solid), test (dashed)', ylabel='cross-entropy (nats); an MAE: mse')
    lr.set(title='learning rate (the peak group)', ylabel='lr')
    for ax in (top1, loss, lr):
        ax.set_xlim(0)
        ax.set_xlabel('training images seen (thousands)')
    loss.legend(fontsize=8)
    if top1.lines:
        top1.legend(fontsize=8, title='run: last top-1', title_fontsize=8)
    mark_axes(fig)
    return fig


def parser():
    p = argparse.ArgumentParser(prog='python -m tools.curves', description=__doc__.split('\n\n')[0])
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                   help="a run directory a script wrote (its metrics.jsonl, log.txt, config.json)")
    p.add_argument('--out', default='',
                   help='the PNG to write; default curves.png in the folder the runs share')
    return p


def main():
    args = parser().parse_args()
    # a folder without an evaluation: one line naming its metrics.jsonl (records)
    out = args.out or os.path.join(shared_folder(args.run_dirs), 'curves.png')
    save_figure(draw(args.run_dirs), out, dpi=150, bbox_inches='tight')
    print(f'written: {out}')


if __name__ == '__main__':
    run_main(main)
