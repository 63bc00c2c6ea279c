"""Where the ViT-L distillation and training steps' GPU time goes, by operator and input shape (batch 104, bf16),
on each attention implementation (made results/benchmark-h100/profile-*-by-shape.txt, then of the eager path).

    OUT=runs/profiles python -m tools.profile_by_shape [eager] [sdpa]    # on a CUDA GPU
"""
import os, sys, torch
sys.path.insert(0, os.getcwd())
from tools.benchmark import BenchConfig
from tools.benchmark_cases import Parts
out = os.environ.get('OUT', 'runs/profiles')
os.makedirs(out, exist_ok=True)
dev = torch.device('cuda')
parts = Parts(BenchConfig(device='cuda', img_size=224), 'vit_large', dev)
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
for method, path in [(m, p) for m in ('distill', 'train') for p in sys.argv[1:] or ('eager', 'sdpa')]:
    run = parts.step(method, path, batch=104)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts, record_shapes=True, with_stack=True) as prof:
        run(); torch.cuda.synchronize()
    with open(f'{out}/profile-vit_large-{method}-{path}-by-shape.txt', 'w') as f:
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by='self_cuda_time_total', row_limit=45, max_name_column_width=40, max_shapes_column_width=90))
        f.write('\n\n')
        f.write(prof.key_averages(group_by_stack_n=6).table(sort_by='self_cuda_time_total', row_limit=30, max_src_column_width=160))
    print(method, path, 'profiled', flush=True)
    del run; parts.batches.clear(); torch.cuda.empty_cache()
