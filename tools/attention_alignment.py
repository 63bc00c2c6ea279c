"""Does cuBLAS pick slow kernels because 197 tokens leave rows unaligned? The attention of one ViT-L layer at
batch 104 (1664 heads), bf16, forward + backward: N = 197 as is, N = 200, and 197 padded to 200 with masking.

    python -m tools.attention_alignment    # on a CUDA GPU; printed results/benchmark-h100/attention-alignment.txt
"""
import torch, torch.nn.functional as F
dev = 'cuda'
def bench(fn, reps=50):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]
BH, d = 1664, 64
def qkv(n):
    return [torch.randn(BH, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
def explicit(q, k, v):
    a = (q * d ** -0.5) @ k.transpose(-2, -1)
    return (a.softmax(-1, dtype=v.dtype) @ v), a
def padded(q, k, v):
    n = q.shape[1]; p = -n % 8
    kp, vp = F.pad(k, (0, 0, 0, p)), F.pad(v, (0, 0, 0, p))
    a = (q * d ** -0.5) @ kp.transpose(-2, -1)
    a[..., n:] = float('-inf')
    return (a.softmax(-1, dtype=v.dtype) @ vp), a[..., :n]
for name, f, n in (('explicit N=197', explicit, 197), ('explicit N=200', explicit, 200), ('padded 197->200', padded, 197)):
    q, k, v = qkv(n)
    g = torch.randn(BH, n, d, device=dev, dtype=torch.bfloat16)
    gl = torch.randn(BH, n, n, device=dev, dtype=torch.bfloat16)
    def fb():
        o, l = f(q, k, v); torch.autograd.backward([o, l], [g, gl])
    qk = bench(lambda: (q * 0.125) @ k.transpose(-2, -1))
    print(f'{name:18s} QK^T fwd {qk:7.3f} ms   attention fwd+bwd {bench(fb):7.3f} ms', flush=True)
q, k, v = qkv(197)
o1, l1 = explicit(q, k, v); o2, l2 = padded(q, k, v)
print('padded vs explicit: out', ((o1 - o2).float().norm() / o1.float().norm()).item(), 'logits', ((l1 - l2).float().norm() / l1.float().norm()).item())
