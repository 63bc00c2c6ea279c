"""The GPU page (results/benchmark-h200/README.md) is written by hand: its table, ratios, start-up checks and loss
differences are computed again here from the benchmark JSON and the runs' logs and configs beside it."""
import json
import math
import os
import re

import pytest

from conftest import ROOT

HERE = os.path.join(ROOT, 'results', 'benchmark-h200')
PAGE = ' '.join(open(os.path.join(HERE, 'README.md')).read().split())
STEPS = {'plain': 'train', 'copy': 'copy', 'distillation': 'distill'}


def rows(name):
    with open(os.path.join(HERE, f'benchmark-{name}.json')) as f:
        result = json.load(f)
    return {(r['method'], r['path']): r for r in result['rows']}, result['gemm_peak']['bf16']


def run(name):
    with open(os.path.join(HERE, 'logs', name, 'config.json')) as f:
        return json.load(f)


def attention_losses(name):
    with open(os.path.join(HERE, 'logs', name, 'log.txt')) as f:
        return {int(s): float(a) for s, a in re.findall(r'step (\d+)/\d+ \| ce [\d.]+ attn ([\d.]+)', f.read())}


@pytest.mark.parametrize('model, label', [('vit_base', 'ViT-B/16, 328'), ('vit_large', 'ViT-L/16, 104')])
def test_the_table_is_the_benchmarks(model, label):
    measured, peak = rows(model)
    table = PAGE.split(f'| {label} |')[1].split('| ViT-L')[0].split('Full tables')[0]
    for step, method in STEPS.items():
        eager, sdpa = measured[method, 'eager'], measured[method, 'sdpa']
        mfu = sdpa['flops'] / sdpa['step_s']
        want = (f" {step} | {eager['img_s']:,.0f} | {sdpa['img_s']:,.0f} | {sdpa['img_s'] / eager['img_s']:.2f}x | "
                f"{100 * mfu / peak:.1f}% ({100 * mfu / 989e12:.1f}%) | {sdpa['peak_mb']:,.0f} |")
        assert want in table, want
    assert f'({peak / 1e12:.0f} TFLOP/s, an 8192³ product)' in PAGE or model == 'vit_base'


def test_the_targets_and_the_compiled_run():
    measured, _ = rows('vit_large')
    img = {m: measured[m, 'sdpa']['img_s'] for m in STEPS.values()}
    mem = {p: measured['distill', p]['peak_mb'] for p in ('sdpa', 'eager')}
    plain_mem = measured['train', 'sdpa']['peak_mb']
    assert f"distillation {img['distill'] / img['train']:.2f}x a plain step ({img['distill']:.0f} / {img['train']:.0f})" in PAGE
    assert f"copy {img['copy'] / img['train']:.2f}x a plain step ({img['copy']:.0f} / {img['train']:.0f})" in PAGE
    assert (f"peak memory {mem['sdpa'] / plain_mem:.2f}x a plain step's ({mem['sdpa']:,.0f} / {plain_mem:,.0f} MiB)"
            in PAGE and f"It is {mem['sdpa'] / mem['eager']:.2f}x `eager` distillation's ({mem['eager']:,.0f} MiB)" in PAGE)
    assert all(img[m] > measured[m, 'eager']['img_s'] for m in STEPS.values())   # 'sdpa is faster ... for every'
    compiled, _ = rows('compile')
    c = {(m, p): compiled[m, p]['img_s'] for m, p in compiled}
    assert (f"a plain step goes from {c['train', 'sdpa']:.0f} to {c['train', 'compile']:,.0f} img/s, copy from "
            f"{c['copy', 'sdpa']:.0f} to {c['copy', 'compile']:.0f}, and distillation from {c['distill', 'sdpa']:.0f} to "
            f"{c['distill', 'compile']:.0f}") in PAGE
    assert (f"{c['distill', 'compile'] / c['train', 'compile']:.2f}x a compiled plain step and "
            f"{c['distill', 'compile'] / c['train', 'sdpa']:.2f}x an uncompiled one") in PAGE


def test_the_start_up_checks_and_the_two_runs():
    for name, shape in (('distill-b-auto', '(32, 12, 197, 64)'), ('distill-l448-auto', '(8, 16, 785, 64)')):
        check = run(name)['attention_check']
        assert check['implementation'] == 'sdpa' and check['error'] <= check['tolerance']
        assert (f"q {shape} | {check['backend']} | {check['error']:.3f} | {check['eager_error']:.3f} | "
                f"{check['tolerance']:.3f} | {check['seconds']:.2f} |") in PAGE
    auto, eager = attention_losses('distill-b-auto'), attention_losses('distill-b-eager')
    assert auto.keys() == eager.keys() and max(auto) == 300
    assert run('distill-b-auto')['layers'] == '0-8'
    layers = 9
    worst = max(abs(auto[s] - eager[s]) for s in auto)
    assert f'differ by at most {worst:.4f} nats ({auto[10]:.1f} at step 10, {auto[300]:.1f} at step 300)' in PAGE
    assert f'That is {worst / layers / math.log(197):.1e} per layer' in PAGE


def test_the_readme_and_reference_quote_it():
    measured, _ = rows('vit_large')
    img = {(m, p): measured[m, p]['img_s'] for m in STEPS.values() for p in ('eager', 'sdpa')}
    readme, reference = (' '.join(open(os.path.join(ROOT, f)).read().split()) for f in ('README.md', 'REFERENCE.md'))
    said = (f"distillation runs at {img['distill', 'sdpa']:.0f} img/s on `sdpa` ({img['distill', 'eager']:.0f} on "
            f"`eager`), {img['distill', 'sdpa'] / img['train', 'sdpa']:.2f}x a plain step")
    assert said in readme
    ratios = [r[m, 'sdpa']['img_s'] / r[m, 'eager']['img_s'] for r in (measured, rows('vit_base')[0]) for m in STEPS.values()]
    assert f'`sdpa` on CUDA ({min(ratios):.2f}-{max(ratios):.2f}x `eager`' in reference
    assert (f"distillation runs at {img['distill', 'sdpa']:.0f} img/s (`eager`: {img['distill', 'eager']:.0f}), "
            f"{img['distill', 'sdpa'] / img['train', 'sdpa']:.2f}x a plain step, in "
            f"{measured['distill', 'sdpa']['peak_mb'] / measured['train', 'sdpa']['peak_mb']:.2f}x its peak memory; copy "
            f"at {img['copy', 'sdpa'] / img['train', 'sdpa']:.2f}x") in reference


H100 = os.path.join(ROOT, 'results', 'benchmark-h100', 'sdpa')


def test_the_h100_page_is_its_benchmarks_and_logs():
    page = ' '.join(open(os.path.join(H100, 'README.md')).read().split())
    result = json.load(open(os.path.join(H100, 'benchmark-224.json')))
    measured, peak = {(r['method'], r['path']): r for r in result['rows']}, result['gemm_peak']['bf16']
    assert f'({peak / 1e12:.0f} TFLOP/s)' in page
    for step, method in STEPS.items():
        eager, sdpa = measured[method, 'eager'], measured[method, 'sdpa']
        mfu = sdpa['flops'] / sdpa['step_s']
        assert (f"| {step} | {eager['img_s']:.0f} | {sdpa['img_s']:.0f} | {sdpa['img_s'] / eager['img_s']:.2f}x | "
                f"{100 * mfu / peak:.1f}% ({100 * mfu / 989e12:.1f}%) | {eager['peak_mb']:,.0f} | {sdpa['peak_mb']:,.0f} |"
                in page), step
        assert sdpa['img_s'] > eager['img_s']
    img = {m: measured[m, 'sdpa']['img_s'] for m in STEPS.values()}
    mem = measured['distill', 'sdpa']['peak_mb'], measured['train', 'sdpa']['peak_mb']
    assert f"distillation {img['distill'] / img['train']:.2f}x a plain step ({img['distill']:.0f} / {img['train']:.0f})" in page
    assert f"copy {img['copy'] / img['train']:.2f}x a plain step ({img['copy']:.0f} / {img['train']:.0f})" in page
    assert f"peak memory {mem[0] / mem[1]:.2f}x a plain step's ({mem[0]:,.0f} / {mem[1]:,.0f} MiB)" in page
    big = {(r['method'], r['path']): r for r in json.load(open(os.path.join(H100, 'benchmark-448.json')))['rows']}
    d, t = big['distill', 'sdpa'], big['train', 'sdpa']
    assert (f"{d['img_s']:.0f} img/s on `sdpa` against {big['distill', 'eager']['img_s']:.0f} on `eager` "
            f"({d['img_s'] / big['distill', 'eager']['img_s']:.2f}x), in {d['peak_mb']:,.0f} MiB against "
            f"{big['distill', 'eager']['peak_mb']:,.0f} ({d['peak_mb'] / big['distill', 'eager']['peak_mb']:.2f}x)") in page
    assert f"{d['img_s'] / t['img_s']:.2f}x a plain step there, in {d['peak_mb'] / t['peak_mb']:.2f}x its memory" in page
    fill = {p: json.load(open(os.path.join(H100, f'benchmark-448-fill-{p}.json'))) for p in ('sdpa', 'eager')}
    b = {p: r['batches']['vit_large'] for p, r in fill.items()}
    assert all(r['config']['fill'] == 0.85 and r['config']['img_size'] == 448 for r in fill.values())
    assert f"`sdpa` distillation fits batch {b['sdpa']} at 448 px, `eager` {b['eager']}, {b['sdpa'] / b['eager']:.1f}x" in page
    assert 'one timed step each: {:.0f} and {:.0f} img/s'.format(*(fill[p]['rows'][0]['img_s'] for p in fill)) in page
    logs = {name: open(os.path.join(H100, 'logs', name)).read() for name in os.listdir(os.path.join(H100, 'logs'))}
    checks = re.findall(r'start-up check: (\w+) on sdpa \((\w+) kernel, cuda:0, torch.bfloat16, q (\([\d, ]+\))\) against '
                        r'the definition \(eager, fp32\): ([\d.e-]+); eager in torch.bfloat16: ([\d.e-]+); tolerance '
                        r'([\d.]+); checked in ([\d.]+) s: sdpa holds', ''.join(logs.values()))
    assert len(checks) == 6 and page.count('| distillation | (') + page.count('| copy | (') == 6
    for what, kernel, shape, *numbers in checks:
        assert kernel == 'cudnn' and float(numbers[0]) <= float(numbers[2])
        assert f"| {what} | {shape} | {' | '.join(numbers)} |" in page, (what, shape)
    auto, eager = (dict(re.findall(r'step (\d+)/\d+ \| ce [\d.]+ attn ([\d.]+)', logs[f'distill-B-{i}.log']))
                   for i in ('auto', 'eager'))
    assert auto.keys() == eager.keys() and len(auto) == 14
    worst = max(abs(float(auto[s]) - float(eager[s])) for s in auto)
    assert f'differ by at most {worst:.4f} nats ({float(auto["1"]):.2f} at step 1, {float(auto["300"]):.2f} at step 300)' in page


def two_distillations(folder):
    """What a round's page says of its `auto` and `eager` distillations (gpu_check.sh's runs.log), computed."""
    with open(os.path.join(folder, 'runs.log')) as f:
        runs = f.read().split('attention_distill.py | ')[1:3]
    auto, eager = ({int(s): float(a) for s, a in re.findall(r'step (\d+)/\d+ \| ce [\d.]+ attn ([\d.]+)', r)}
                   for r in runs)
    assert '/distill-b-auto' in runs[0] and auto.keys() == eager.keys() and max(auto) == 300
    worst = max(abs(auto[s] - eager[s]) for s in auto)
    return f'differ by at most {worst:.4f} ({auto[10]:.2f} at step 10, {auto[300]:.2f} at step 300)'


ROUND5 = os.path.join(ROOT, 'results', 'benchmark-h100', 'round5')


def test_round_five_s_page_is_its_files():
    page = ' '.join(open(os.path.join(ROUND5, 'README.md')).read().replace('**', '').split())
    result = json.load(open(os.path.join(ROUND5, 'benchmark.json')))
    measured = {(r['method'], r['path']): r for r in result['rows']}
    assert f"{result['gemm_peak']['bf16'] / 1e12:.1f} TFLOP/s" in page
    for step, method in STEPS.items():
        eager, sdpa = measured[method, 'eager'], measured[method, 'sdpa']
        assert f"| {step} | {eager['img_s']:.2f} | {sdpa['img_s']:.2f} | {sdpa['peak_mb']:,.0f} |" in page, step
    d, t = measured['distill', 'sdpa'], measured['train', 'sdpa']
    assert f"It is {d['img_s'] / t['img_s']:.2f}x ({d['img_s']:.2f} / {t['img_s']:.2f})" in page
    assert f"It is {d['peak_mb'] / t['peak_mb']:.2f}x ({d['peak_mb']:,.0f} / {t['peak_mb']:,.0f} MB)" in page
    for name, counts in (('first', '54 passed, 7 failed'), ('fixed', '60 passed, 1 failed')):
        with open(os.path.join(ROUND5, f'pytest-gpu-{name}.txt')) as f:
            said = re.findall(r'(\d+) failed, (\d+) passed', f.read())[-1]
        assert said == tuple(reversed(re.findall(r'\d+', counts)))
        assert counts in page
    assert two_distillations(ROUND5) in page
    with open(os.path.join(ROUND5, 'cudnn-layouts.txt')) as f:
        errors = [re.findall(r'@\d+ ([\d.]+)', line) for line in f if 'whole' not in line]
    assert len(errors) == 4
    for row in errors:
        assert f"| {', '.join(row)} |" in page, row


ROUND6 = os.path.join(ROOT, 'results', 'benchmark-h100', 'round6')


def test_round_six_s_page_is_its_files():
    page = ' '.join(open(os.path.join(ROUND6, 'README.md')).read().replace('**', '').split())
    with open(os.path.join(ROUND6, 'pytest-gpu.txt')) as f:
        passed, = re.findall(r'(\d+) passed, \d+ warnings in ([\d.]+)s', f.read())
    assert f'{passed[0]} passed, none failed (6 workers, {float(passed[1]):.0f} s)' in page
    with open(os.path.join(ROUND6, 'fm-e2e', 'log.txt')) as f:
        end_to_end = int(re.findall(r'step 468/468 .* (\d+) img/s', f.read())[-1])
    step = json.load(open(os.path.join(ROUND6, 'fm-step', 'benchmark.json')))
    alone, peak = step['rows'][0], step['gemm_peak']['bf16']
    flops = alone['flops'] * end_to_end / alone['batch']
    assert f'{end_to_end:,} img/s end to end' in page and f"on one batch: {alone['img_s']:,.0f} img/s" in page
    assert f"End to end is {end_to_end / alone['img_s']:.2f}x the step alone" in page
    assert f"At {alone['flops'] / 1e9:.1f} GFLOP a step, {end_to_end:,} img/s is {flops / 1e12:.1f} TFLOP/s, " \
           f"{100 * flops / peak:.1f}% of the bf16 peak" in page
    assert two_distillations(ROUND6) in page
    with open(os.path.join(ROUND6, 'paths.log')) as f:
        paths = f.read()
    assert 'mid-epoch resume against the unbroken run: bit for bit' in paths
    far = re.findall(r'compiled against eager, \w+: gradients ([\d.e+-]+) apart ok', paths)
    assert f'gradients {far[0]} apart on `eager`, {far[1]} on `sdpa`' in page
    for stage, name in (('distill', 'distillation'), ('copy', 'copy'), ('scratch', 'scratch')):
        done = [os.path.join(ROUND6, 'reproduce', stage, f'seed{k}', 'done.json') for k in range(3)]
        done = [json.load(open(f)) if os.path.exists(f) else None for f in done]
        wall = ' / '.join('-' if d is None else f"{d['wall_s']:.1f}" for d in done)
        top1 = ' / '.join('-' if d is None else f"{d['metrics']['top1']:.2f}" for d in done)
        assert f'| {name} | {wall} | {top1} |' in page, stage
    with open(os.path.join(ROUND6, 'l448.log')) as f:
        l448 = f.read()
    check = re.findall(r'start-up check: distillation .* q \(8, 16, 785, 64\)\).* layer 0 q grad at ([\d.]+) '
                       r'\(eager in torch.bfloat16: ([\d.]+); tolerance ([\d.]+)\).*: sdpa holds', l448)
    assert f"| ViT-L/16 distillation, 448 px (second call) | (8, 16, 785, 64) | layer 0 q grad | " \
           f"{' | '.join(check[0])} |" in page
    assert 'distillation exit 0' in l448


ROUND7 = os.path.join(ROOT, 'results', 'benchmark-h200', 'round7')


def small_run(call, name):
    """(wall s, exit, img/s over the epoch, median img/s a step, first 10 steps s) of one Fashion-MNIST run of
    gpu_check.sh's small part: a step's speed from each interval between two progress lines of running means
    (images / img/s = seconds), the first two intervals left out."""
    with open(os.path.join(ROUND7, call, 'printed.txt')) as f:
        code, wall = re.search(rf'{name} \(1 epoch, end to end\): exit (\d+) after (\d+) s', f.read()).groups()
    with open(os.path.join(ROUND7, call, f'{name}.log')) as f:
        points = [(int(s) * 128, int(r)) for s, r in re.findall(r' step (\d+)/468 \|.*\| (\d+) img/s', f.read())]
    times = [(n, n / r) for n, r in points]
    per = sorted((n2 - n1) / (t2 - t1) for (n1, t1), (n2, t2) in zip(times[1:], times[2:]))
    median = per[len(per) // 2] if per else None
    return int(wall), int(code), points[-1][1] if points else None, median, times[0][1] if times else None


def test_round_seven_s_page_is_its_files():
    page = ' '.join(open(os.path.join(ROUND7, 'README.md')).read().replace('**', '').split())
    with open(os.path.join(ROUND7, 'pytest-gpu.txt')) as f:
        failed, passed, seconds = re.search(r'(\d+) failed, (\d+) passed, \d+ warnings in ([\d.]+)s', f.read()).groups()
    assert f'{passed} passed, {failed} failed (6 workers, {float(seconds):.0f} s)' in page
    rows, steps = {}, {}
    for script, method in (('finetune', 'fine-tuning'), ('attention_distill', 'distillation'),
                           ('attention_copy', 'copy')):
        wall, code, epoch, step, _ = small_run('call2', f'fm-{script}-compile-false')
        c_wall, c_code, c_epoch, c_step, first = small_run('call2', f'fm-{script}-compile-true')
        assert code == 0
        eager = f'| {method} | {wall} | {epoch:,} | {step:,.0f} |'
        if c_code == 0:
            rows[method] = f'{eager} {c_wall} | {first:.1f} | {c_epoch:,} | {c_step:,.0f} | {c_step / step:.2f}x |'
        else:
            rows[method] = f'{eager} cut at {c_wall} | - | - | - | - |'
        steps[method] = step, c_step
        assert f'{small_run("call1", f"fm-{script}-compile-false")[2]:,}' in page
    for row in rows.values():
        assert row in page, row
    (tune, tune_c), (distill, distill_c), (copy, _) = steps.values()
    assert f'eager: distillation {distill / tune:.2f}x, copy {copy / tune:.2f}x (a step); compiled: distillation ' \
           f'{distill_c / tune_c:.2f}x' in page
    # the steps that repay a compilation: its overhead in the first 10 steps over the time each later step saves
    repaid = [(small_run('call2', f'fm-{script}-compile-true')[4] - 10 * 128 / c) / (128 / e - 128 / c)
              for script, (e, c) in zip(('finetune', 'attention_distill'), steps.values())]
    assert f'after about {round(repaid[0], -2):,.0f} steps of fine-tuning and {round(repaid[1], -2):,.0f} of ' \
           f'distillation' in page
    with open(os.path.join(ROUND7, 'checks-compared.txt')) as f:
        shared = [r.split(' | ') for r in f if re.search(r'\| [\d.]+ \| [\d.]+ \|', r)]
    assert len(shared) == 3 and all(r[2] == r[3] for r in shared)    # round six's error, to the digits printed
    with open(os.path.join(ROUND7, 'paths.log')) as f:
        assert 'mid-epoch resume against the unbroken run: bit for bit' in f.read()
    with open(os.path.join(ROUND7, 'steps.log')) as f:
        strict = f.read()
    far = re.findall(r'compiled against eager, \w+: gradients ([\d.e+-]+) apart ok', strict)
    assert f'gradients {far[0]} apart on `eager`, {far[1]} on `sdpa`' in page
    assert strict.count('final |') == 4 and 'Traceback' not in strict   # the 4 scripts' steps under the sync mode
