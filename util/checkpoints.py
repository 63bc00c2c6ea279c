"""
Load ViT weights from anywhere into vit.py's VisionTransformer: a name from PRETRAINED (downloaded once into the
torch hub cache), or a file holding this project's checkpoint ({'model', 'arch', ...}), an MAE checkpoint, a state
dict with timm/MAE or torchvision names, or the official files of DeiT, DINO, MoCo v3, DINOv2 and CLIP (converted
in util/pretrained.py). Every file is read without running any of its code (read_file); any other file is one
CheckpointError line naming it and the fix.

    model = build_from_checkpoint('mae_vit_large', num_classes=0)    # a teacher
    load_weights(model, 'runs/teacher/checkpoint.pt')                # into a model you built

At another image size, position embeddings are resized as the family's official code does
(pretrained.FAMILIES). Loading is strict (load_state_dict's own refusal, in one line): only the
classifier (head, fc_norm) may be missing, only MAE's decoder and the unused final norm may be
unexpected; anything else is an architecture mismatch and an error.
"""
import hashlib
import io
import math
import os
import warnings
import zipfile
from collections import Counter

import torch

from util.errors import CheckpointError
from util.files import read_regular
from util.memory import parameters, too_big
from util.pretrained import (AS_DEIT, FAMILIES, TEACHERS, ArchiveRefused, Family, convert,
                             family_of, read_archive, resize_pos_embed, unwrap)
from vit import MOST, VisionTransformer

MAE_URL = 'https://dl.fbaipublicfiles.com/mae/{0}/mae_{1}_vit_{2}.pth'
PRETRAINED = {   # name -> (url, its family in pretrained.FAMILIES: its heads, its resize)
    # the MAE README's links (_ft: fine-tuned on IN-1k)
    **{f'mae_vit_{s}{tag}': (MAE_URL.format(stage, made, s), 'mae')
       for tag, stage, made in (('', 'pretrain', 'pretrain'), ('_ft', 'finetune', 'finetuned'))
       for s in ('base', 'large', 'huge')},
    # torchvision's DEFAULT weights (torchvision.models.get_model_weights(name).DEFAULT.url), written out: reading
    # them from torchvision would import it, and with it the compiler, into every script's start
    **{f'torchvision_{n}': (f'https://download.pytorch.org/models/{n}{tag}.pth', 'torchvision')
       for n, tag in (('vit_b_16', '-c867db91'), ('vit_b_32', '-d86f8d99'), ('vit_l_16', '-852ce7e3'),
                      ('vit_l_32', '-c7638314'), ('vit_h_14', '_swag-80465313'))},
    **TEACHERS,   # DeiT, DINO, MoCo v3, DINOv2, CLIP: util/pretrained.py
}

# -----------------------------------------------------------------------------
# Reading a checkpoint: a name or a file, without running any of its code


def read_checkpoint(source):
    """Return the raw checkpoint dict of a file path or a PRETRAINED name (read_hashed)."""
    return read_hashed(source)[0]


def read_hashed(source):
    """(the raw checkpoint dict of a file path or a PRETRAINED name, the SHA-256 of the very bytes
    it was read from; None for a name, downloaded once into the torch hub cache, then read as any
    file is). Every checkpoint the scripts read comes through here, read once: a file replaced while
    a run reads it (a sync, a copy finishing) is recorded as the file that was loaded, never as the
    one that came after."""
    if source not in PRETRAINED:   # TEACHERS included
        if not os.path.isfile(source):
            raise CheckpointError(f"no checkpoint '{source}': give a file path or one of "
                                  f"{', '.join(PRETRAINED)}")
        return read_whole(source)
    url = PRETRAINED[source][0]
    # as torch.hub names it
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
    try:
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path)   # through a temporary file: never half of one
    except Exception as e:   # offline
        raise CheckpointError(f"'{source}' could not be downloaded ({type(e).__name__}): put the "
                              f"file {url} at {path} by hand") from None
    return read_whole(path)[0], None   # damaged in the cache: its line names the file to replace


def read_file(path):
    """A checkpoint file's contents, read without running any of its code (read_whole)."""
    return read_whole(path)[0]


def read_whole(path):
    """(a checkpoint file's contents, the SHA-256 of its bytes): the file read once into memory, and
    everything below done on those bytes, so the digest is of what was loaded. Read without running
    any of its code: what torch.save wrote, by torch.load(weights_only=True) (tensors and plain
    containers; a pickled object that could run code is refused unread), or a TorchScript archive's
    parameters and buffers (util/pretrained.py, which executes nothing of it). Every record of a zip
    archive has its CRC-32 checked first, which torch's reader does not do (a flipped bit would be
    read as a weight). Otherwise one CheckpointError line naming the file, with torch's own words
    for what it found. An architecture record is refused where it is built (vit_of) or compared
    (check_arch)."""
    unreadable = f"'{path}' is not a readable PyTorch checkpoint"
    try:
        data = read_regular(path)   # a pipe, a folder or a device refused unread
        script = False
        if zipfile.is_zipfile(io.BytesIO(data)):   # torch's archive (else torch.load says what it is)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                check_records(z.infolist(), len(data))
                bad = z.testzip()   # the first record whose CRC-32 differs
                # a TorchScript archive (torch.load's own test)
                script = any(n.rpartition('/')[2] == 'constants.pkl' for n in z.namelist())
            if bad:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file '{bad}'")
        if script:
            ckpt = read_archive(io.BytesIO(data))
        else:
            # torch's notes on formats: what is wrong is said below, in one line
            with warnings.catch_warnings(action='ignore'):
                ckpt = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except OSError as e:   # nothing read: a pipe, a folder, no permission
        raise CheckpointError(f'{unreadable}: cannot read it ({e.strerror}): name a checkpoint file') from None
    except ArchiveRefused as e:   # args: what it holds, the fix
        raise CheckpointError(f'{unreadable}: {e.args[0]}: {e.args[1]}') from None
    except zipfile.BadZipFile as e:   # a record whose CRC-32 or size is not the archive's
        raise CheckpointError(f'{unreadable}: it is damaged ({e}): copy or download it again') from None
    except Exception as e:   # empty, cut short, not torch's, a pickle naming code, no permission
        raise CheckpointError(f'{unreadable}: torch.load refused it unread ({torch_says(e)}): '
                              'copy or download it again; for a file of your own, save the tensors '
                              'alone: torch.save(model.state_dict(), path)') from None
    odd = next(strange(ckpt), None)
    if odd:
        raise damaged(path, f'holds {odd}')
    return ckpt, hashlib.sha256(data).hexdigest()


def strange(value):
    """What torch.save of a model never writes, found in a checkpoint's nested dicts, lists and tuples (walked here
    without recursion: Python's own walks of a file nested 100,000 lists deep end in RecursionError): nesting deeper
    than DEEPEST, or a tensor that is not a plain one on the CPU (a sparse one, one on the meta device), or that
    repeats one stored value (a stride of 0 along a dimension of more than one element: a (2**20, 2**20) view of one
    float whose finiteness check would ask for 4 TB; a view beyond its storage torch refuses itself)."""
    stack = [('', value, 0)]
    while stack:
        key, v, depth = stack.pop()
        if depth > DEEPEST:
            yield f'containers nested more than {DEEPEST} deep, which no checkpoint is'
        elif torch.is_tensor(v):
            if v.layout != torch.strided:
                yield f'a {str(v.layout).removeprefix("torch.")} tensor {key}, which torch.save of a model never writes'
            elif v.device.type != 'cpu':
                yield f'a tensor {key} on the {v.device.type} device, where it holds no values'
            elif any(st == 0 and n > 1 for n, st in zip(v.shape, v.stride())):
                yield f'a tensor {key} that repeats one stored value (a stride of 0), which torch.save never writes'
        elif isinstance(v, (dict, list, tuple)):
            items = v.items() if isinstance(v, dict) else enumerate(v)
            stack.extend((f'{key}.{k}' if key else str(k), item, depth + 1) for k, item in items)


# no checkpoint nests deeper (an optimizer's state: 4)
DEEPEST = 100


def damaged(source, what, fix='take another copy of it'):
    """The one line for a file a user brings that holds what no ViT is read or built from (the damaged-file class):
    the file, what is wrong with it, the fix."""
    return CheckpointError(f"'{source}' {what}: it was edited or is damaged: {fix}")


def check_records(infos, size):
    """Refuse, before any record is inflated, a zip archive with two records of one name (one reader reads one
    copy, another the other: two files in one, one SHA-256) or a record declared out of proportion to the file
    (torch stores tensors uncompressed and deflates code a few times at most: a 0.4 MB archive whose code
    inflates to 120 MB is none of torch's)."""
    twice = [name for name, n in Counter(i.filename for i in infos).items() if n > 1]
    if twice:
        raise zipfile.BadZipFile(f'it has two records named {twice[0]}')
    most = RECORD_SCALE * max(size, 2 ** 20)
    big = next((i for i in infos if i.file_size > most), None)
    if big:
        raise zipfile.BadZipFile(f'its record {big.filename} declares {big.file_size:,} bytes, '
                                 f'{RECORD_SCALE} times more than the whole file ({size:,}) allows')


# how much larger than its file a record may inflate (a file under 1 MB counts as 1 MB)
RECORD_SCALE = 16


def torch_says(error):
    """What torch.load found, in its own words: the first sentence after 'WeightsUnpickler error:', never its advice
    to load the file with weights_only=False or to allow what it refused, either of which would run the code a
    pickle carries. An error without words: its name."""
    said = str(error).split('Check the documentation')[0].split('WeightsUnpickler error:')[-1]
    said = ' '.join(said.split())
    return said.split('. ')[0].rstrip('.') or type(error).__name__


# -----------------------------------------------------------------------------
# What a checkpoint holds: its state dict in timm's names, its architecture


def state_dict_of(ckpt, source='the checkpoint'):
    """The ViT state dict inside a checkpoint (read from `source`), converted to timm/MAE names, in a new dict (the
    file's is kept)."""
    return _converted(ckpt, source)[0]


def _converted(ckpt, source):
    """(state dict in timm/MAE names, the VisionTransformer components its family needs). Its position embeddings
    are refused where they are no table a ViT of its patch embedding's width adds (the damaged-file line): every
    reader sizes its grid from them."""
    sd = unwrap(ckpt)
    if sd is None:
        raise CheckpointError(f"'{source}' holds no state dict (expected tensors, or a dict with key "
                              f'"model")')
    sd, components = convert(sd)   # this project's names are timm's: kept as they are
    if 'patch_embed.proj.weight' not in sd:
        raise CheckpointError(f"'{source}' is not a ViT: no patch_embed.proj.weight / conv_proj.weight")
    conv, pos = sd['patch_embed.proj.weight'], sd.get('pos_embed')       # (D, C, P, P), (1, 1 + g*g, D)
    if pos is not None and not (conv.ndim == 4 and pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[1] > 1
                                and pos.shape[2] == conv.shape[0] and math.isqrt(pos.shape[1] - 1) ** 2 ==
                                pos.shape[1] - 1):
        raise damaged(source, f'holds a pos_embed of shape {tuple(pos.shape)}, no (1, 1 + a square, '
                              f'{conv.shape[0]}) table of positions')
    # MAE pre-training keeps its decoder and mask token next to the encoder; a classifier needs neither
    return {k: v for k, v in sd.items() if not k.startswith(('decoder', 'mask_token'))}, components


def recorded(ckpt):
    """The VisionTransformer keywords a checkpoint records (this project's do), else None."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get('arch'), dict):
        return ckpt['arch']
    return None


def arch_of(ckpt, source, num_heads, flag):
    """VisionTransformer kwargs that fit a checkpoint: stored ones, else read off the tensors, with the head count
    no tensor shows from heads_of (num_heads: the count its user states with `flag`, 0 if none)."""
    saved = recorded(ckpt)   # None where MoCo v3 stores a name
    # a size no flag may ask for, refused before anything is counted or built (a block a module: 10,000 took a minute)
    beyond = [(k, v, most) for k, most in MOST.items()
              if isinstance(v := (saved or {}).get(k), int) and not isinstance(v, bool) and v > most]
    if beyond:
        k, v, most = beyond[0]
        raise damaged(source, f'records {k} {v:,}, more than the {most:,} any command line allows')
    sd, components = _converted(ckpt, source)
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})   # the blocks it holds
    if depth > MOST['depth']:
        raise damaged(source, f"holds {depth:,} blocks, more than the {MOST['depth']:,} any command line allows")
    if saved:   # a stated head count is compared with it where it is loaded (check_arch); its depth before a block
        # is built (each is a module, on the meta device too: 10 million of them took hours)
        if saved.get('depth') != depth:
            raise damaged(source, f"records a depth of {saved.get('depth')!r} and holds {depth} blocks")
        return dict(saved)
    conv = sd['patch_embed.proj.weight']                                  # (D, C, P, P)
    dim = conv.shape[0]
    try:   # the shapes a ViT's tensors have, else the damaged-file line
        grid = math.isqrt(sd['pos_embed'].shape[1] - 1)
        mlp_ratio = sd['blocks.0.mlp.fc1.weight'].shape[0] / dim
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise damaged(source, f"holds tensors of no ViT's shapes ({type(e).__name__}: {e})") from None
    num_classes = sd['head.weight'].shape[0] if 'head.weight' in sd else 0
    return dict(img_size=grid * conv.shape[-1], patch_size=conv.shape[-1], in_chans=conv.shape[1],
                num_classes=num_classes, embed_dim=dim, depth=depth,
                num_heads=heads_of(ckpt, source, dim, num_heads, flag), mlp_ratio=mlp_ratio,
                qkv_bias='blocks.0.attn.qkv.bias' in sd, global_pool='fc_norm.weight' in sd,
                **components)


def heads_of(ckpt, source, dim, num_heads, flag):
    """How many attention heads the ViT of a checkpoint has. No tensor shape shows it, so it is never guessed: it is
    the file's record (this project's checkpoints), its family's at its width (a family known by its name, an official
    file name or keys only its files have: pretrained.FAMILIES), or what its user states (num_heads, with `flag`). A
    stated count that the record or the family contradicts, or that does not divide the width, is refused, and so is
    a file that says nothing, with the flag that states it."""
    rule = family(source, ckpt).heads   # the width of every head, or {model width: heads}
    if isinstance(rule, int):
        rule = {dim: dim // rule} if dim % rule == 0 else {}
    saved = recorded(ckpt) or {}
    known = saved.get('num_heads', rule.get(dim))
    if known is None:
        if not num_heads:
            raise CheckpointError(f"'{source}' holds weights alone, which do not say how many "
                                  f"attention heads its ViT has (its record, a name or its family "
                                  f"would): state them with {flag} N")
        if dim % num_heads:
            fits = ', '.join(str(h) for h in range(1, dim + 1) if dim % h == 0)
            raise CheckpointError(f"{flag} {num_heads}: a ViT {dim} wide, as '{source}' is, cannot be "
                                  f"built (embed_dim must be divisible by num_heads) with {num_heads} "
                                  f"heads: state a divisor of {dim} ({fits})")
        return num_heads
    if num_heads and num_heads != known:
        raise CheckpointError(f"{flag} {num_heads}: '{source}' has {known} attention heads")
    return known


# this project's own files (their layer scale is not DINOv2's) and a file of no known family: resized as DeiT's, their
# heads recorded or stated, never guessed
OURS = Family("this project's", AS_DEIT, {})
UNKNOWN = Family('family not known', AS_DEIT, {})


def family(source, ckpt):
    """The Family (pretrained.FAMILIES: its name, resize and heads) of a checkpoint by the keys only its family's
    format has, else by its name in PRETRAINED or its official file name (DeiT's, DINO's and MAE's files hold timm
    names only); OURS or UNKNOWN."""
    if recorded(ckpt):
        return OURS
    official = next((f for name, (url, f) in PRETRAINED.items()
                     if source == name or os.path.basename(source) == os.path.basename(url)), None)
    return FAMILIES.get(family_of(unwrap(ckpt) or {}) or official, UNKNOWN)


# what loading adapts or ignores: a recorded architecture may differ in these
ADAPTED = ('img_size', 'num_classes', 'global_pool', 'drop_path_rate')


def vit_of(arch, source, native=None):
    """VisionTransformer(**arch) on the meta device (nothing allocated): the architecture a file records or its tensors
    show, with the fields its caller changes. Refused in the damaged-file line naming `source` where no ViT is made
    from it (unbuilt): what the constructor refuses, or a size this machine's memory clearly cannot hold. native: the
    file's own img_size where its caller asks for another (--img-size), named instead where the file's own size would
    do."""
    model, why = unbuilt(arch)
    if model is not None:
        return model
    if native not in (None, arch.get('img_size')) and unbuilt({**arch, 'img_size': native})[0] is not None:
        raise CheckpointError(f"'{source}' at --img-size {arch['img_size']} {why}: choose another --img-size")
    raise damaged(source, why)


def unbuilt(arch):
    """(VisionTransformer(**arch) on the meta device, None), or (None, why no ViT of keywords arch is made on this
    machine): what the constructor refuses, or a size, counted from the model built, more than its memory clearly
    holds (util/memory)."""
    try:
        with torch.device('meta'):
            model = VisionTransformer(**arch)
    except (TypeError, ValueError, ArithmeticError, AssertionError, RuntimeError) as e:
        return None, f'cannot be built ({first_line(e)})'
    big = too_big(parameters(model))
    if big:
        return None, f'is a ViT that needs {big}; a real one runs only on a machine with more memory'
    return model, None


def first_line(error):
    """An error's words, their first line (torch's can add the signatures it tried), or its name."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# -----------------------------------------------------------------------------
# Loading into a ViT, with every difference refused


def check_arch(model, source, ckpt, sd, num_heads, flag):
    """Refuse a checkpoint (sd: its state dict) whose heads (heads_of: num_heads as stated with `flag`) or, with a
    record (this project's checkpoints have one), whose recorded fields not ADAPTED are not the model's: heads matter
    though no tensor shape shows them (the other fields show in the tensors' names and shapes: load_state_dict checks
    them). A copy student (no q / k of its own in some layers) is no model without its teacher."""
    heads = heads_of(ckpt, source, sd['patch_embed.proj.weight'].shape[0], num_heads, flag)
    saved = recorded(ckpt) or {'num_heads': heads}
    if saved.get('no_qk_layers') and not model.arch.get('no_qk_layers'):
        raise CheckpointError(f"'{source}' is an attention-copy student: it has no attention of "
                              f"its own in layers {saved['no_qk_layers']} and runs only with its "
                              f"teacher (attention_copy.load_copy_model); it cannot be a teacher or "
                              f"an --init")
    diff = [f'{k} {v!r} (here {model.arch.get(k)!r})' for k, v in saved.items()
            if k not in ADAPTED and model.arch.get(k) != v]
    if diff:
        raise CheckpointError(f"architecture mismatch loading '{source}': the checkpoint has "
                              f"{', '.join(diff)}")


# the floating-point types a model's weights are trained and saved in
REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_weights(model, source, ckpt, num_heads=0, flag='--num-heads', assign=False):
    """Load `source` into `model`: resize position embeddings, drop a classifier of the wrong size, and raise
    CheckpointError on any other difference of architecture (check_arch; heads: num_heads as stated with `flag`),
    missing/unexpected key or shape beyond the allowed ones, or a weight that is not finite. assign: the model takes
    the file's tensors themselves (check_weights), not copies. ckpt: source as read_checkpoint read it."""
    sd = state_dict_of(ckpt, source)   # a new dict: changing it leaves ckpt as it is
    check_arch(model, source, ckpt, sd, num_heads, flag)
    own = model.state_dict()
    # load_state_dict would cast int8 / int64 / complex / float8 to float: a quantised file without its scales (or
    # complex values without their imaginary part) would become a model of garbage maps, without a word
    typed = next((f'{k} is {v.dtype}' for k, v in sd.items()
                  if k in own and own[k].is_floating_point() and v.dtype not in REAL), None)
    if typed:
        raise CheckpointError(f"'{source}' holds weights that are not real floating-point numbers "
                              f"({typed}): dequantise it (or take its float original) and save "
                              f"that")
    broken = next((k for k, v in sd.items()
                   if v.is_floating_point() and not v.isfinite().all()), None)
    if broken:
        raise CheckpointError(f"'{source}' holds weights that are not finite ({broken} has nan or "
                              f"inf): it is no usable model (a run that diverged?): take an earlier "
                              f"checkpoint of it")
    if 'pos_embed' in sd:   # to the model's grid (one already on it is kept as it is)
        how = family(source, ckpt).resize   # as the family's own code does
        sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], model.patch_embed.grid, how)
    # a new task keeps the model's own classifier; a global-pool model has no `norm`, a class-token
    # one no `fc_norm`: the file's dropped where the model has none of that shape, the model's own
    # kept where the file has none
    sd = {k: v for k, v in sd.items() if not k.startswith(('head.', 'norm.', 'fc_norm.'))
          or (k in own and v.shape == own[k].shape)}
    for k in own:
        if k.startswith(('head.', 'fc_norm.')):
            sd.setdefault(k, own[k])
    try:
        model.load_state_dict(sd, assign=assign)
    except RuntimeError as e:
        # in its own words: 'Missing key(s) in state_dict: ...', 'size mismatch for ...'
        said = ' '.join(str(e).partition(':')[2].split())
        raise CheckpointError(f"architecture mismatch loading '{source}': {said[:300]}") from None
    return model


def check_weights(model, source, ckpt, num_heads, flag):
    """`model`, a ViT built on the meta device (vit_of: a record VisionTransformer cannot build refused, nothing
    allocated), holding the checkpoint's weights after every refusal load_weights makes: how the resolve phase looks
    at a file of weights. The file's own tensors are assigned to it (load_state_dict(assign=True)): no random
    initialisation, nothing copied. What the file does not hold (a classifier, the only part that may be missing) is
    initialised on the CPU; every weight is made fp32, as loading into a built ViT makes it."""
    load_weights(model, source, ckpt, num_heads, flag, assign=True)
    for m in model.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            m.to_empty(device='cpu', recurse=False).reset_parameters()
    return model.float()


def build_from_checkpoint(source, ckpt=None, num_heads=0, **overrides):
    """A VisionTransformer shaped like the checkpoint (overrides applied), with its weights: built on the meta device
    (its record refused before anything is allocated), then given the file's tensors (check_weights). ckpt: the
    checkpoint already read from source; num_heads: the head count its user states with --num-heads (heads_of)."""
    ckpt = read_checkpoint(source) if ckpt is None else ckpt
    # always a plain ViT: a copy student (no q/k in some layers) cannot run without its teacher
    own = arch_of(ckpt, source, num_heads, '--num-heads')
    model = vit_of({**own, 'no_qk_layers': (), **overrides}, source, own['img_size'])
    return check_weights(model, source, ckpt, num_heads, '--num-heads')


def describe_teacher(source, ckpt, arch, size):
    """The teacher in one line for the log: its family, depth, heads, patches and native size, and at another size
    whose official way resized its position embeddings (pretrained.FAMILIES). arch: its VisionTransformer keywords
    as the file gives them (arch_of); size: the image size it runs at."""
    known = family(source, ckpt)
    native = arch['img_size']
    said = f"teacher {source} ({known.name}): depth {arch['depth']}, {arch['num_heads']} heads, " \
           f"patches of {arch['patch_size']} px, native size {native} px"
    if size == native:
        return f'{said}, run at that size'
    return f'{said}, run at {size} px: position embeddings resized as {known.resize.like} does'

# -----------------------------------------------------------------------------
# What a student's checkpoint records about its teacher (never its weights)

def teacher_record(cfg, transfer):
    """What a student checkpoint stores about its teacher (never the teacher's weights): where it
    came from, the SHA-256 of the bytes its weights were loaded from (read_hashed: None for a name),
    and the mapping (layer map, heads) a copy student needs to be given the same maps again."""
    return {'source': cfg.teacher, 'sha256': transfer.sha256, 'img_size': cfg.img_size,
            # as stated (0: its record or family): to load it again
            'teacher_num_heads': cfg.teacher_num_heads, 'layer_map': transfer.layers,
            'heads': transfer.heads, 'transfer': cfg.transfer, 'average_maps': cfg.average_maps}


def teacher_mismatch(source, digest, record):
    """Why `source`, read as bytes whose SHA-256 is `digest` (read_hashed: the ones its weights were
    loaded from; None for a name), is not the teacher a student checkpoint recorded (None if it is):
    another file's contents (both SHA-256 shown), or another name. A moved file with the same
    contents is the same teacher."""
    if not record:
        return None
    if not record.get('sha256'):   # the teacher was a name: another name, or a file, is another teacher
        digest = None
    if (digest is None and source == record['source']) or (digest and digest == record['sha256']):
        return None
    return f"the teacher {record['source']} (sha256 {record.get('sha256')}) -> {source} " \
           f"(sha256 {digest})"
