"""benchmark.py's flags and its GPU side: refusals in one line and the GPU report on any machine; the bytes saved
for backward (sdpa keeps no (N, N) map, eager does); on CUDA (`python -m pytest -m gpu tests`) a quick run with MFU
and max_memory_allocated, and the batch that fills a given share of the memory."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from conftest import run_script
from tools.benchmark import BenchConfig, configure, device_slug
from tools.benchmark_cases import Parts
from util.config import ConfigError
from util.launch import parse_config


@pytest.mark.parametrize('flags, words', [
    (dict(batch_size=-8), '--batch-size -8'),
    (dict(fill=1.5), r'--fill 1.5: must be in \(0, 1\]'),
    # checked once --quick has set its sizes (img 32), and bounded: each was a traceback
    (dict(device='cpu', quick=True, patch_size=7), '--img-size 32: must be a multiple of --patch-size 7'),
    (dict(device='cpu', img_size=0), '--img-size 0: must be at least 1')])
def test_bad_flags_are_config_errors(flags, words):
    with pytest.raises(ConfigError, match=words):
        configure(BenchConfig(**flags))


@pytest.mark.parametrize('argv, words', [
    (['--methods', 'train', 'nope'], "--methods: invalid choice: 'nope'"),
    (['--models', 'vit_nope'], "--models: invalid choice: 'vit_nope'"),
    (['--profile', 'eval-copy'], "--profile: invalid choice: 'eval-copy'"),
    (['--paths', 'eager', 'default'], "--paths: invalid choice: 'default'"),
    (['--device', 'gpu'], "--device: invalid choice: 'gpu'")])
def test_a_choice_not_offered_is_refused_as_the_line_is_parsed(argv, words):
    with pytest.raises(SystemExit, match=f'^error: {words}.*see --help'):
        parse_config(BenchConfig, argv=argv)


def test_gpu_mode_without_cuda_refuses_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(ConfigError, match='fills a GPU'):
        configure(BenchConfig(batch_size=0))
    p = run_script('-m', 'tools.benchmark', '--device', 'cuda', '--out-dir', tmp_path)
    assert p.returncode != 0 and p.stderr.strip().count('\n') == 0 and 'no CUDA device' in p.stderr
    assert not os.listdir(tmp_path)


def test_default_out_dir_is_ignored_by_git_and_never_the_committed_results(repo_root):
    """Without --out-dir the benchmark wrote over the committed results/benchmark/; now a git-ignored folder."""
    import subprocess
    for flags in (dict(device='cpu'), dict(device='cpu', quick=True)):
        out = configure(BenchConfig(**flags))[0].out_dir
        assert out.startswith('runs/'), out
        ignored = subprocess.run(['git', 'check-ignore', '-q', out], cwd=repo_root)
        assert ignored.returncode == 0, f'{out} is not ignored by git'
    assert configure(BenchConfig(device='cpu', out_dir='results/benchmark'))[0].out_dir == 'results/benchmark'


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_timing(tmp_path):
    (tmp_path / 'file').write_text('mine')
    p = run_script('-m', 'tools.benchmark', '--quick', 'true', '--out-dir', tmp_path / 'file')
    assert p.returncode == 1 and p.stderr.count('\n') == 1, p.stderr[-2000:]
    file = tmp_path / 'file'
    assert f'--out-dir {file} cannot be written into ({file}: Not a directory): choose another --out-dir' in p.stderr
    assert 'GEMM peak' not in p.stdout and (tmp_path / 'file').read_text() == 'mine'
    if os.geteuid() != 0:   # root writes into a read-only folder
        (tmp_path / 'ro').mkdir(mode=0o555)
        with pytest.raises(ConfigError, match='cannot be written'):
            configure(BenchConfig(device='cpu', out_dir=str(tmp_path / 'ro' / 'bench')))


def test_a_users_own_benchmark_md_is_not_written_over(tmp_path):
    """--out-dir D holding a BENCHMARK.md the benchmark did not write (no benchmark.json): it was replaced."""
    (tmp_path / 'BENCHMARK.md').write_text('mine\n')
    with pytest.raises(ConfigError, match=r'is not empty and holds no benchmark.json: choose an empty or new --out-dir$'):
        configure(BenchConfig(device='cpu', quick=True, out_dir=str(tmp_path)))
    (tmp_path / 'benchmark.json').write_text('{}')   # an earlier result of its own: replaced
    assert configure(BenchConfig(device='cpu', quick=True, out_dir=str(tmp_path)))[0].out_dir == str(tmp_path)


def test_gpu_results_are_named_by_device():
    assert [device_slug(n) for n in ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB', 'Tesla T4', 'NVIDIA H200',
                                     'NVIDIA GeForce RTX 4090')] == ['h100', 'a100', 't4', 'h200', 'geforce-rtx-4090']


def results(out_dir):
    with open(os.path.join(out_dir, 'benchmark.json')) as f:
        return json.load(f)


@pytest.mark.gpu
def test_quick_benchmark_on_cuda(tmp_path):
    p = run_script('-m', 'tools.benchmark', '--quick', 'true', '--out-dir', tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = results(tmp_path)
    assert r['device'] == 'cuda' and set(r['gemm_peak']) == {'fp32', 'bf16'} and r['batches'] == {'vit_tiny': 4}
    assert all(0 < row['peak_fraction'] < 1 and row['batch'] == 4 and row['flops'] > 0 for row in r['rows'])
    distill = {row['path']: row for row in r['rows'] if row['method'] == 'distill'}
    assert distill['sdpa']['auto'] and 0 < distill['sdpa']['peak_mb'] < distill['naive']['peak_mb']
    md = open(tmp_path / 'BENCHMARK.md').read()
    assert torch.cuda.get_device_name() in md and '| batch | img/s |' in md and 'max_memory_allocated' in md


@pytest.mark.gpu
def test_batch_fills_the_given_share_of_gpu_memory(tmp_path):
    """--fill 0.05: the chosen batch is a multiple of 8 and each case, measured alone at it, stays near 5%."""
    p = run_script('-m', 'tools.benchmark', '--models', 'vit_tiny', '--depth', '4', '--fill', '0.05', '--methods', 'train',
                   'distill', '--rounds', '1', '--steps', '1', '--warmup', '0', '--out-dir', tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = results(tmp_path)
    batch, total_mb = r['batches']['vit_tiny'], torch.cuda.get_device_properties(0).total_memory / 2 ** 20
    assert batch % 8 == 0 and 8 < batch < 1024
    peaks = [row['peak_mb'] for row in r['rows'] if 'peak_mb' in row]
    assert peaks and max(peaks) < 0.05 * total_mb and max(peaks) > 0.02 * total_mb   # the fullest case fills it


def test_gpu_report_renders_on_any_machine():
    """The end of a GPU run, checked here: rows as measure() makes them on CUDA give the batch column, an
    out-of-memory case says so, and each case is set against the naive path of its model and method."""
    from tools.benchmark import markdown

    def row(method, path, img_s, peak_fraction, peak_mb):
        return {'model': 'vit_large', 'method': method, 'path': path, 'auto': path == 'sdpa', 'batch': 64,
                'img_s': img_s, 'flops': 1e13, 'peak_fraction': peak_fraction, 'peak_mb': peak_mb, 'step_mb': peak_mb / 2}
    rows = [row('train', 'sdpa', 500, 0.5, 30e3), row('distill', 'sdpa', 350, 0.45, 40e3),
            row('distill', 'eager', 300, 0.4, 50e3), row('distill', 'naive', 70, 0.1, 80e3),
            {'model': 'vit_large', 'method': 'copy', 'path': 'naive', 'auto': False, 'batch': 64,
             'error': 'out of memory'}]
    rows[0].update(saved_mb=1000.0, saved_vs_train=1.0)
    rows[1].update(saved_mb=1100.0, saved_vs_train=1.1)
    result = {'config': asdict(configure(BenchConfig(device='cpu'))[0]) | {'batch_size': 0},
              'machine': {'device': 'NVIDIA H100 80GB HBM3', 'cpus': 16, 'threads': 16, 'torch': torch.__version__,
                          'commit': 'unknown', 'date': ''},
              'device': 'cuda', 'argv': ['benchmark.py', '--device', 'cuda'], 'gemm_peak': {'bf16': 8e14},
              'rows': rows, 'batches': {'vit_large': 64}}
    md = markdown(result)
    assert '# Benchmark: NVIDIA H100' in md and 'vit_large 64' in md and '| batch | img/s | vs naive |' in md
    assert '| vit_large | distill | naive | 64 | 70.00 | 1.00x | 10000.0 | 10.0 | 80000 | 40000 |  |  |' in md
    assert '| vit_large | distill | sdpa (auto) | 64 | 350.00 | 5.00x | 10000.0 | 45.0 | 40000 | 20000 | 1100.0 | 1.100x |' in md
    assert '| vit_large | copy | naive | 64 | out of memory |' in md
    assert 'GEMM peak measured here: bf16 800000 GFLOP/s' in md


@pytest.mark.parametrize('dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_saved_for_backward_holds_no_map_on_sdpa_and_does_on_eager(dtype):
    """The device-independent memory figure, in fp32 and in bf16 whatever this CPU's --amp auto picks: sdpa
    distillation keeps no tensor whose last two dims are (N, N), the teacher's q and k are all it adds to a plain
    sdpa step; eager keeps the maps. Copy adds at most the third of the teacher's qkv output that its q and k, views
    of that output, keep with them (in bf16 the student's fewer weight copies more than make up for it)."""
    cfg, _ = configure(BenchConfig(device='cpu', quick=True))
    parts = Parts(cfg, 'vit_tiny', torch.device('cpu'))
    parts.dtype = dtype    # before any model is built: the teacher's weights are cast to it
    n = (cfg.img_size // cfg.patch_size) ** 2 + 1
    saved = {(m, p): parts.saved_for_backward(m, p, batch=2) for m in ('train', 'copy', 'distill')
             for p in ('eager', 'sdpa')}
    maps = {c: [s for s in shapes if s[-2:] == (n, n)] for c, (_, shapes) in saved.items()}
    assert not maps['distill', 'sdpa'] and not maps['copy', 'sdpa'] and not maps['train', 'sdpa']
    assert maps['distill', 'eager'] and maps['train', 'eager']
    assert saved['train', 'sdpa'][0] < saved['distill', 'sdpa'][0] <= 1.2 * saved['train', 'sdpa'][0]
    itemsize = (dtype or torch.float32).itemsize
    teacher_v = len(parts.copied) * 2 * n * parts.arch['embed_dim'] * itemsize
    assert saved['copy', 'sdpa'][0] <= saved['train', 'sdpa'][0] + teacher_v


def test_measuring_saved_bytes_frees_what_the_step_saved():
    """saved_for_backward keeps nothing once it returns: a pack hook that handed back the saved tensor itself tied
    each output to its own grad_fn, so every case's activations stayed allocated (on a 140 GB GPU the benchmark ran
    out of memory at ViT-B/16, batch 328, after measuring them). Counted as live tensors, round after round."""
    import gc
    cfg, _ = configure(BenchConfig(device='cpu', quick=True))
    parts = Parts(cfg, 'vit_tiny', torch.device('cpu'))
    gc.collect()
    # what earlier tests left (a compiled graph's tensors, say) is not counted: its freeing is not this step's
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    live = []
    for _ in range(3):
        for case in (('train', 'eager'), ('copy', 'sdpa'), ('distill', 'sdpa'), ('distill', 'eager')):
            parts.saved_for_backward(*case, batch=2)
        gc.collect()
        live.append(sum(isinstance(o, torch.Tensor) and id(o) not in before for o in gc.get_objects()))
    assert live[0] == live[1] == live[2], live


def test_quick_benchmark_on_cpu_writes_every_case_and_times_both_implementations(tmp_path):
    p = run_script('-m', 'tools.benchmark', '--quick', 'true', '--device', 'cpu', '--out-dir', tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = results(tmp_path)
    cases = {(row['method'], row['path']) for row in r['rows']}
    assert {(m, p) for m in ('train', 'distill') for p in ('eager', 'sdpa')} <= cases
    assert {('distill', 'naive'), ('copy', 'naive-bf16'), ('eval-copy', 'sdpa')} <= cases
    assert all(row['img_s'] > 0 for row in r['rows'])
    trained = [row for row in r['rows'] if row['method'] in ('train', 'distill') and row['path'] in ('eager', 'sdpa')]
    assert all(row['flops'] > 0 and row['saved_mb'] > 0 for row in trained)
    assert [row['path'] for row in trained if row['auto']] == ['eager', 'eager']      # auto's pick on a CPU
    naive, fast = (next(row for row in r['rows'] if row['method'] == 'copy' and row['path'] == p)
                   for p in ('naive', 'eager'))
    assert naive['flops'] > fast['flops']        # the naive copy student computes q, k and its own maps
    assert all(row['peak_mb'] > 0 for row in r['rows'] if row['method'] == 'distill' and row['path'] in ('eager', 'naive'))
    assert r['machine']['torch'] == torch.__version__
    assert '| vit_tiny | distill | eager (auto) |' in open(tmp_path / 'BENCHMARK.md').read()


@pytest.mark.parametrize('growth', ['linear', 'faster-than-linear', 'out-of-memory-above-300'])
def test_the_filled_batch_is_measured_to_fit_and_the_next_is_not(growth):
    """--batch-size 0's search on a memory curve of each shape: the batch it returns was measured within the
    budget, and the next multiple of 8 was measured over it (a line through two small batches overshoots when
    memory grows faster than linearly: the GPU run found 4064 MB at a 4054 MB budget)."""
    from tools.benchmark_cases import MAX_BATCH, largest_batch
    curve = {'linear': lambda b: 100 + 10 * b, 'faster-than-linear': lambda b: 100 + 10 * b + 0.02 * b * b,
             'out-of-memory-above-300': lambda b: float('inf') if b > 300 else 100 + 30 * b}[growth]
    measured = {}

    def peak_at(batch):
        measured[batch] = curve(batch)
        return measured[batch]
    budget = 5000
    batch = largest_batch(peak_at, budget)
    assert batch % 8 == 0 and measured[batch] <= budget
    assert measured.get(batch + 8, curve(batch + 8)) > budget and batch + 8 in measured
    assert largest_batch(lambda b: b, 1e9) == MAX_BATCH and largest_batch(lambda b: 1e9, budget) == 8


def test_a_compiled_case_is_counted_when_autos_path_is_not_timed(tmp_path):
    """--compile true --paths sdpa on a CPU (auto: eager, not timed): the compiled step's FLOPs are auto's, counted
    for it (they were None, and the report's division failed after every timing); --profile breaks the compiled step
    down too, after its timed rounds."""
    p = run_script('-m', 'tools.benchmark', '--quick', 'true', '--device', 'cpu', '--methods', 'distill', '--paths',
                   'sdpa', '--compile', 'true', '--saved-bytes', 'false', '--memory-batch-size', '0', '--profile',
                   'distill', '--out-dir', tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {row['path']: row for row in results(tmp_path)['rows']}
    assert set(rows) == {'sdpa', 'compile'} and rows['compile']['flops'] > 0 and rows['compile']['peak_fraction'] > 0
    table = (tmp_path / 'profile-vit_tiny-distill-compile.txt').read_text()
    assert 'CompiledFunctionBackward' in table and 'Torch-Compiled Region' in table
