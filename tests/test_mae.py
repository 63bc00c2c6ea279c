"""MAE pre-training: the masking, the encoder and decoder against the plain ViT's maths, the loss on
hidden patches only, and a tiny run whose checkpoint is a teacher (attention_distill.py) and an
initialisation (finetune.py)."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, finetune, read_metrics, run_in_process, run_script, sub_env
import mae_pretrain
from mae_pretrain import (PRESETS, MAEConfig, MaskedAutoencoder, build_mae, mae_loss, patchify, random_keep,
                          reconstructions, unpatchify)
from util.checkpoints import build_from_checkpoint
from util.config import ConfigError
from util.launch import parse_config
from vit import VisionTransformer

ARCH = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)   # 64 patches of 4x4


def make_mae(mask_ratio=0.75, seed=0, **arch):
    torch.manual_seed(seed)
    return MaskedAutoencoder({**ARCH, **arch}, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                             mask_ratio=mask_ratio).eval()


def inputs_of(module):
    """A list that records the first input of every call of `module`."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen

# -----------------------------------------------------------------------------
# Masking


def test_random_keep_exact_count_unique_and_per_image():
    ids = random_keep(8, 64, 16, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (8, 16)
    for row in ids.tolist():
        assert len(set(row)) == 16 and 0 <= min(row) and max(row) < 64        # no patch kept twice
    assert len({tuple(sorted(row)) for row in ids.tolist()}) == 8               # every image its own mask


@pytest.mark.parametrize('img_size, mask_ratio, keep', [(32, 0.75, 16), (28, 0.75, 12), (32, 0.5, 32)])
def test_model_masks_exactly_int_n_times_one_minus_ratio(img_size, mask_ratio, keep):
    mae = make_mae(mask_ratio, img_size=img_size)
    n = (img_size // 4) ** 2
    assert mae.num_keep == int(n * (1 - mask_ratio)) == keep
    seen = inputs_of(mae.blocks[0])
    pred, mask = mae(torch.randn(4, 3, img_size, img_size))
    assert seen[0].shape == (4, 1 + keep, 32)                  # the encoder sees the class token + kept patches
    assert pred.shape == (4, n, 4 * 4 * 3) and mask.shape == (4, n)
    assert (mask.sum(1) == n - keep).all() and set(mask.unique().tolist()) == {0.0, 1.0}
    assert len({tuple(m.tolist()) for m in mask}) == 4          # different images, different masks


def test_patchify_round_trip_and_token_order():
    x = torch.randn(2, 3, 32, 32)
    patches = patchify(x, 4)                                    # (2, 64, 48)
    assert torch.equal(unpatchify(patches, 4), x)
    # token i of the patch embedding is patch i: row-major over the 8x8 grid
    assert torch.equal(patches[:, 8 * 2 + 5].view(2, 4, 4, 3).permute(0, 3, 1, 2), x[:, :, 8:12, 20:24])

# -----------------------------------------------------------------------------
# Encoder and decoder


def test_encoder_with_every_patch_is_the_plain_vit():
    mae = make_mae()
    vit = VisionTransformer(**mae.arch).eval()
    vit.load_state_dict({k: v for k, v in mae.state_dict().items() if not k.startswith(('decoder', 'mask_token'))})
    x = torch.randn(2, 3, 32, 32)
    everything = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(mae.forward_encoder(x, everything), vit.norm(vit.forward_tokens(x)[0]), atol=1e-5)


def test_encoder_input_is_class_token_and_kept_patches_with_their_positions():
    mae = make_mae()
    x = torch.randn(3, 3, 32, 32)
    ids = random_keep(3, 64, 16, generator=torch.Generator().manual_seed(1))
    seen = inputs_of(mae.blocks[0])
    with torch.no_grad():
        mae.forward_encoder(x, ids)
        tokens = mae.patch_embed(x) + mae.pos_embed[:, 1:]                     # (B, N, D)
        cls = mae.cls_token[0] + mae.pos_embed[0, :1]                          # (1, D)
        expected = torch.stack([torch.cat([cls, tokens[b, ids[b]]]) for b in range(3)])
    assert torch.allclose(seen[0], expected, atol=1e-6)


def test_decoder_puts_kept_tokens_back_and_mask_tokens_elsewhere():
    mae = make_mae()
    x = torch.randn(2, 3, 32, 32)
    ids = random_keep(2, 64, 16, generator=torch.Generator().manual_seed(2))
    seen = inputs_of(mae.decoder_blocks[0])
    with torch.no_grad():
        pred, mask = mae(x, ids)
        latent = mae.decoder_embed(mae.forward_encoder(x, ids))                # (B, 1 + K, Dd)
        pos = mae.decoder_pos_embed[0]                                         # (1 + N, Dd)
    got = seen[0][:, 1:]                                                       # (B, N, Dd) patch positions
    for b in range(2):
        assert torch.allclose(seen[0][b, 0], latent[b, 0] + pos[0], atol=1e-6)            # class token
        assert torch.allclose(got[b, ids[b]], latent[b, 1:] + pos[1:][ids[b]], atol=1e-6)
        hidden = mask[b].bool()
        assert torch.allclose(got[b, hidden], mae.mask_token[0] + pos[1:][hidden], atol=1e-6)

# -----------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_covers_hidden_patches_only(norm_pix):
    torch.manual_seed(0)
    pred, target = torch.randn(3, 10, 12), torch.randn(3, 10, 12)
    mask = torch.zeros(3, 10)
    for b in range(3):
        mask[b, torch.randperm(10)[:7]] = 1
    base = mae_loss(pred, target, mask, norm_pix)
    visible, hidden = tuple((mask == 0).nonzero()[0]), tuple((mask == 1).nonzero()[0])   # (image, patch)

    def changed(t, where):
        t = t.clone()
        t[where] += torch.randn(12) * 5
        return t
    assert torch.equal(mae_loss(changed(pred, visible), target, mask, norm_pix), base)
    assert torch.equal(mae_loss(pred, changed(target, visible), mask, norm_pix), base)
    assert not torch.allclose(mae_loss(changed(pred, hidden), target, mask, norm_pix), base)
    assert not torch.allclose(mae_loss(pred, changed(target, hidden), mask, norm_pix), base)
    # the value: mean over hidden patches of the per-patch MSE (targets standardised per patch)
    t = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True) if norm_pix else target
    assert torch.allclose(base, ((pred - t) ** 2).mean(-1)[mask.bool()].mean(), atol=1e-4)


def test_gradient_reaches_only_predictions_of_hidden_patches():
    mae = make_mae().train()
    x = torch.randn(2, 3, 32, 32)
    pred, mask = mae(x)
    pred.retain_grad()
    mae_loss(pred, patchify(x, 4), mask).backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any(-1).all()
    assert mae.mask_token.grad.abs().sum() > 0 and mae.cls_token.grad.abs().sum() > 0

# -----------------------------------------------------------------------------
# Config


@pytest.mark.parametrize('norm_pix', [True, False])
def test_the_figure_pastes_the_seen_patches_back_into_the_reconstruction(norm_pix):
    """The figure's rows, as MAE's demo shows them: 'reconstruction' is the decoder's painting of every patch (the
    seen ones too, which the loss never scores); 'reconstruction + visible' is the image itself on the patches the
    encoder saw and the painting on the hidden ones; 'masked' names how many of the patches were hidden."""
    mae = make_mae()
    imgs = torch.randn(3, 3, 32, 32)
    rows = reconstructions(mae, imgs, MAEConfig(norm_pix_loss=norm_pix))
    borrowed = ['true means only'] if norm_pix else []
    assert list(rows) == ['original', 'masked: 48 of 64 patches', *borrowed, 'reconstruction',
                          'reconstruction + visible']
    _, mask = mae(imgs, generator=torch.Generator().manual_seed(0))                # the figure's mask
    m = mask[..., None].bool()                                                     # (B, N, 1), True: hidden
    pasted, painted, seen = (patchify(rows[k], 4) for k in ('reconstruction + visible', 'reconstruction', 'original'))
    assert torch.equal(pasted.masked_select(~m), seen.masked_select(~m))
    assert torch.allclose(pasted.masked_select(m), painted.masked_select(m))
    assert not torch.allclose(painted.masked_select(~m), seen.masked_select(~m))   # the painting is not the image
    assert torch.equal(patchify(rows['masked: 48 of 64 patches'], 4).masked_select(m), torch.zeros(int(m.sum()) * 48))


def test_the_figure_shows_what_a_norm_pix_model_borrows_from_the_image():
    """A norm_pix_loss model paints a hidden patch in units of that patch's true std around its true mean: the
    figure's row 'true means only' draws the loan alone. On the hidden patches it is each true patch's mean, flat;
    on the seen ones the image; and it is made without the decoder: a decoder that paints nothing else draws it."""
    mae = make_mae()
    imgs = torch.randn(3, 3, 32, 32)
    rows = reconstructions(mae, imgs, MAEConfig(norm_pix_loss=True))
    _, mask = mae(imgs, generator=torch.Generator().manual_seed(0))                # the figure's mask
    m = mask[..., None].bool().expand(-1, -1, 48)                                  # (B, N, 48), True: hidden
    means, seen = patchify(rows['true means only'], 4), patchify(imgs, 4)
    assert torch.equal(means[~m], seen[~m])
    flat = seen.mean(-1, keepdim=True).expand_as(seen)                             # each patch at its own mean
    assert torch.allclose(means[m], flat[m], atol=1e-6) and not torch.allclose(means[m], seen[m])
    with torch.no_grad():                                                          # a decoder painting zeros
        mae.decoder_pred.weight.zero_()
        mae.decoder_pred.bias.zero_()
    silent = reconstructions(mae, imgs, MAEConfig(norm_pix_loss=True))
    assert torch.equal(silent['true means only'], rows['true means only'])
    assert torch.allclose(silent['reconstruction + visible'], rows['true means only'], atol=1e-6)


def test_the_shipped_figure_has_the_rows_of_a_norm_pix_teacher():
    """teachers/fashion-mnist-mae-reconstruction.png, drawn by save_reconstructions (1.75 inches a row, 1.6 an image,
    at 100 dpi) for the shipped teacher's recipe (norm_pix_loss): as many rows as reconstructions gives such a
    model, 'true means only' among them, for its 6 images."""
    from PIL import Image
    rows = reconstructions(make_mae(), torch.randn(2, 3, 32, 32), MAEConfig(norm_pix_loss=True))
    assert 'true means only' in rows
    with Image.open(os.path.join(ROOT, 'teachers', 'fashion-mnist-mae-reconstruction.png')) as png:
        assert png.size == (6 * 160, len(rows) * 175), png.size


def test_presets_and_config_errors():
    for data in PRESETS:
        parse_config(MAEConfig, PRESETS, ['--data', data])          # every preset key is a field
    big = parse_config(MAEConfig, PRESETS, ['--data', 'imagenet'])
    assert (big.model, big.epochs, big.blr, big.batch_size, big.warmup_epochs, big.beta2, big.weight_decay) == \
        ('vit_large', 800, 1.5e-4, 64, 40, 0.95, 0.05)
    assert (big.mask_ratio, big.decoder_dim, big.decoder_depth, big.min_scale, big.randaug, big.mixup) == \
        (0.75, 512, 8, 0.2, '', 0.0)
    for bad in (['--mask-ratio', '1'], ['--mask-ratio', '0.99'], ['--global-pool', 'true'], ['--mixup', '0.8']):
        with pytest.raises(ConfigError):
            build_mae(parse_config(MAEConfig, PRESETS, ['--data', 'fake', *bad]))   # 16 patches: 0.99 keeps none

# -----------------------------------------------------------------------------
# A tiny run, and its checkpoint as a teacher and as an initialisation


@pytest.fixture(scope='module')
def mae_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('mae')
    p = run_script('mae_pretrain.py', *TINY, '--out-dir', d, '--max-steps', '3', '--log-every', '1',
                   '--export', d / 'shipped' / 'teacher.pt')
    assert p.returncode == 0, f'mae_pretrain.py failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    return d, p


def test_run_writes_checkpoint_figure_and_losses(mae_run):
    d, p = mae_run
    assert ' mse ' in p.stdout and 'held-out masked mse' in p.stdout
    assert read_metrics(d)[-1]['step'] == 3
    assert os.path.getsize(d / 'reconstruction.png') > 1000
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    assert ck['arch']['num_classes'] == 0 and not ck['arch']['global_pool']
    decoder = {k for k in ck['model'] if k.startswith(('decoder_', 'mask_token'))}
    assert {'mask_token', 'decoder_embed.weight', 'decoder_pos_embed', 'decoder_pred.weight'} <= decoder
    # everything else is exactly the encoder, under timm / MAE names
    assert set(ck['model']) - decoder == set(VisionTransformer(**ck['arch']).state_dict())
    assert {'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'norm.weight', 'cls_token', 'pos_embed'} \
        <= set(ck['model'])


def test_checkpoint_loads_as_a_teacher_without_decoder(mae_run):
    d, _ = mae_run
    ck = torch.load(d / 'checkpoint.pt', weights_only=True)
    teacher = build_from_checkpoint(str(d / 'checkpoint.pt')).eval()
    assert type(teacher) is VisionTransformer
    assert not any(n.startswith(('decoder', 'mask_token')) for n in teacher.state_dict())
    assert torch.equal(teacher.state_dict()['blocks.1.attn.qkv.weight'], ck['model']['blocks.1.attn.qkv.weight'])
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, ck['arch']['embed_dim'])


def test_checkpoint_initialises_finetune_and_teaches_distillation(mae_run, tmp_path):
    d, _ = mae_run
    finetune(tmp_path / 'ft', '--init', d / 'checkpoint.pt', '--max-steps', '2')
    assert read_metrics(tmp_path / 'ft')[-1]['step'] == 2
    p = run_script('attention_distill.py', *TINY, '--out-dir', tmp_path / 'distill',
                   '--teacher', d / 'checkpoint.pt', '--max-steps', '2')
    assert p.returncode == 0, f'attention_distill.py failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}'
    assert read_metrics(tmp_path / 'distill')[-1]['step'] == 2


def test_export_is_the_encoder_alone_and_says_how_it_was_made(mae_run):
    d, _ = mae_run
    ck, out = (torch.load(f, weights_only=True) for f in (d / 'checkpoint.pt', d / 'shipped' / 'teacher.pt'))
    assert set(out) == {'model', 'arch', 'config', 'made'}   # no optimiser, EMA, RNG or decoder
    assert set(out['model']) == set(VisionTransformer(**ck['arch']).state_dict())
    assert all(torch.equal(v, ck['model'][k]) for k, v in out['model'].items())
    assert out['made']['epoch'] == ck['epoch'] and out['made']['held_out_mse'] == ck['metrics']['mse']
    assert out['made']['command'].startswith('python mae_pretrain.py') and '--export' in out['made']['command']
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():   # the same teacher as the full checkpoint, at a fraction of its size
        assert torch.equal(build_from_checkpoint(str(d / 'shipped' / 'teacher.pt')).eval()(x),
                           build_from_checkpoint(str(d / 'checkpoint.pt')).eval()(x))
    assert os.path.getsize(d / 'shipped' / 'teacher.pt') < 0.6 * os.path.getsize(d / 'checkpoint.pt')


def test_export_never_writes_over_a_file(mae_run, tmp_path):
    d, _ = mae_run
    target = d / 'shipped' / 'teacher.pt'
    before = target.read_bytes()
    p = run_script('mae_pretrain.py', *TINY, '--out-dir', tmp_path / 'again', '--max-steps', '1', '--export', target)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert '--export' in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert target.read_bytes() == before and not (tmp_path / 'again').exists()


def test_export_onto_a_file_of_its_own_run_is_refused_before_training(mae_run, tmp_path):
    """--export onto the run's checkpoint would replace it (a resume would then find no run), onto its figure
    would replace that: refused before anything is made, for a new run and for a resume; likewise an --export
    whose folder is a file, which could be written only after all the training."""
    d, _ = mae_run
    before = {n: (d / n).read_bytes() for n in ('checkpoint.pt', 'reconstruction.png', 'config.json')}
    new = tmp_path / 'new'
    (tmp_path / 'a_file').write_text('mine\n')
    for out, export, extra, says in [(new, new / 'checkpoint.pt', [], 'is a file of --out-dir'),
                                     (new, new / 'reconstruction.png', [], 'is a file of --out-dir'),
                                     (d, d / 'checkpoint.pt', ['--resume', 'true'], 'is a file of --out-dir'),
                                     (d, d / 'reconstruction.png', ['--resume', 'true'], 'is a file of --out-dir'),
                                     (new, tmp_path / 'a_file' / 'teacher.pt', [],
                                      'cannot write there (')]:
        p = run_script('mae_pretrain.py', *TINY, '--out-dir', out, '--max-steps', '3', '--log-every', '1',
                       '--export', export, *extra)
        assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
        assert len(p.stderr.strip().splitlines()) == 1 and f'--export {export}' in p.stderr and says in p.stderr, \
            p.stderr
        assert not new.exists() and {n: (d / n).read_bytes() for n in before} == before
    assert (tmp_path / 'a_file').read_text() == 'mine\n'


def test_a_stopped_export_run_goes_on_with_the_same_command(tmp_path):
    """A kill -9 left the --export claim, an empty file at the export's name, and the same command with --resume true
    was refused for it ("cannot write there (File exists)") until the user removed it: now nothing is at that name
    until the export is whole, and the command goes on. SIGHUP had no handler: a closed terminal killed the run
    without its line. One run: a closed terminal after its first checkpoint, continued, kill -9 after its next one,
    continued to the end."""
    out, export = tmp_path / 'run', tmp_path / 'shipped' / 'teacher.pt'
    command = [sys.executable, 'mae_pretrain.py', '--data', 'fake', '--fake-size', '1024', '--num-workers', '0',
               '--epochs', '20', '--save-every', '1', '--out-dir', str(out), '--export', str(export)]
    saved = None
    for sig, args in ((signal.SIGHUP, []), (signal.SIGKILL, ['--resume', 'true'])):
        p = subprocess.Popen([*command, *args], cwd=ROOT, env=sub_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:   # until a checkpoint of this start is written
            with contextlib.suppress(FileNotFoundError):
                if (out / 'checkpoint.pt').stat().st_mtime_ns != saved:
                    break
            time.sleep(0.05)
        p.send_signal(sig)
        err = p.communicate(timeout=60)[1]
        saved = (out / 'checkpoint.pt').stat().st_mtime_ns
        if sig == signal.SIGHUP:   # one line, as SIGTERM: the checkpoint kept, nothing at the export's name
            assert p.returncode == 129 and err.strip().splitlines()[-1].startswith('error: stopped (SIGHUP): '), err
            assert 'Traceback' not in err
        else:
            assert p.returncode == -signal.SIGKILL, err[-2000:]
        assert not export.exists()
    step = torch.load(out / 'checkpoint.pt', weights_only=True)['step']
    p = subprocess.run([*command, '--resume', 'true', '--max-steps', str(step + 1)], cwd=ROOT, env=sub_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert set(torch.load(export, weights_only=True)) == {'model', 'arch', 'config', 'made'}
    assert os.listdir(export.parent) == ['teacher.pt']   # the killed run's temporary file gone with it


def test_a_finished_mae_run_resumes_and_exports(monkeypatch, tmp_path):
    """Its evaluations record mse, not top-1: a finished run was refused as 'not evaluated there'."""
    d = tmp_path / 'mae'
    assert run_in_process(monkeypatch, mae_pretrain, *TINY, '--out-dir', d) is None
    assert run_in_process(monkeypatch, mae_pretrain, *TINY, '--out-dir', d, '--resume', 'true', '--export',
                          tmp_path / 'teacher.pt') is None
    assert torch.load(tmp_path / 'teacher.pt', weights_only=True)['made']['held_out_mse'] > 0
