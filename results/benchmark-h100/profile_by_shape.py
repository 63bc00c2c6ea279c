"""Where the ViT-L distillation and training steps' GPU time goes, by operator and input shape (batch 104, bf16).

    python results/benchmark-h100/profile_by_shape.py    # from the repository root, on a CUDA GPU
"""
import os, sys, torch
sys.path.insert(0, os.getcwd())
from tools.benchmark import BenchConfig
from tools.benchmark_cases import Parts
out = os.environ.get('OUT', os.path.dirname(os.path.abspath(__file__)))
dev = torch.device('cuda')
parts = Parts(BenchConfig(device='cuda', img_size=224), 'vit_large', dev)
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
for method in ('distill', 'train'):
    run = parts.step(method, 'default', batch=104)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts, record_shapes=True, with_stack=True) as prof:
        run(); torch.cuda.synchronize()
    with open(f'{out}/profile-vit_large-{method}-by-shape.txt', 'w') as f:
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by='self_cuda_time_total', row_limit=45, max_name_column_width=40, max_shapes_column_width=90))
        f.write('\n\n')
        f.write(prof.key_averages(group_by_stack_n=6).table(sort_by='self_cuda_time_total', row_limit=30, max_src_column_width=160))
    print(method, 'profiled', flush=True)
    del run; parts.batches.clear(); torch.cuda.empty_cache()
