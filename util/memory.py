"""
Sizes that cannot fit, refused before anything is built: a ViT of a million blocks took minutes to build, then
failed; a million-pixel image, an allocator's traceback. A lower bound of what one step needs, against the memory
of the device it trains on.
"""
import os

SAMPLER_BYTES = 100    # an image's index in a shuffled epoch (the permutation, the list of (epoch, index) keys)


def machine_memory():
    """Bytes of memory a process trains in: the GPU's when there is one, else the machine's RAM."""
    import torch   # only here: the command line is parsed without it
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def memory_needed(dim, depth, img_size, patch_size, batch_size, mlp_ratio=4.0, training=True):
    """A lower bound of the bytes a ViT needs for one step, in fp32: its parameters (the blocks' attention and MLP
    weights, the position embeddings), 4 bytes each, 16 when training (gradients and AdamW's two moments too), and
    one batch of tokens (B x N x D numbers) per block when training, once without (the blocks' inputs kept for the
    backward pass). Attention maps, which some paths never build, are not counted."""
    tokens = (img_size // max(patch_size, 1)) ** 2 + 1
    params = depth * (4 + 2 * mlp_ratio) * dim ** 2 + tokens * dim + 3 * patch_size ** 2 * dim
    return (16 if training else 4) * params + 4 * batch_size * tokens * dim * (depth if training else 1)


def too_big(cfg, dim, depth, patch_size, mlp_ratio=4.0, training=True, what='a ViT'):
    """[] if a ViT of these sizes fits this machine's memory (memory_needed), else one checks() row naming the flag
    furthest above a usual value (ViT-L/16 at 224 px, batch 256) and every size that went into the estimate."""
    if not (dim and depth and patch_size and cfg.img_size > 0):
        return []       # a size not known yet (a transfer student's is its teacher's): checked once it is
    need, have = memory_needed(dim, depth, cfg.img_size, patch_size, cfg.batch_size, mlp_ratio, training), \
        machine_memory()
    if need <= have:
        return []
    usual = {'img_size': cfg.img_size / patch_size / 14, 'depth': depth / 24, 'embed_dim': dim / 1024,
             'batch_size': cfg.batch_size / 256}
    return [(max(usual, key=usual.get), False,
             f"makes {what} of {depth} blocks {dim} wide on {cfg.img_size} px images in {patch_size} px patches, "
             f"batch {cfg.batch_size}: at least {need / 1e9:,.0f} GB {'to train' if training else 'to run'}, more "
             f"than the {have / 1e9:,.0f} GB here (--img-size, --depth, --embed-dim, --batch-size)")]
