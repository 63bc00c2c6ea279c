"""The machinery the course's scripts share, none of it a concept of attention transfer: read the root's files
first (the README's reading order), and come here for how a run is resolved, trained, saved and continued.

    launch.py       how a script starts and ends: its command line, then resolve (every refusal, in order, into one
                    immutable Plan); a refusal, Ctrl-C and a signal in one line, anything else with its traceback
    config.py       one dataclass per script, each flag declared once (default, help, range): a training run's fields,
                    a scoring's; the small presets
    engine.py       the step every script calls (train_one_epoch), its schedule, evaluation (a trained model's
                    predictions and top-k too), AdamW with layer decay
    run.py          a run in progress (Run: optimizer, EMA, resume, evaluate, save); the checks after the data
    stop.py         a scheduler's signal (SIGUSR1, SIGTERM) while a run trains: the step every process agrees on,
                    saved, and exit 75 for a batch script to requeue on (tools/slurm.sbatch)
    attention_check.py  the fused attention checked both ways against eager before anything runs on it, and the
                    verdict decided once and told to the models once (settle_attention)
    rundir.py       the run directory, one object: claimed and locked, its log (printed, held, then log.txt), its
                    files, let go; how --resume true is checked (what the checkpoint holds, what may change, after
                    a divergence) and the command that continues
    checkpoints.py  weights from anywhere (this project's files, MAE's, torchvision's, names) into vit.py's ViT, each
                    file read once, without running any of its code (torch.load's weights only, CRC-32s checked),
                    hashed from the bytes read; one line naming a file no ViT is read or built from
    memory.py       what a model needs of this machine's memory, counted from the run's model built on the meta
                    device, which the run then makes real: the one fault (the host's OOM killer) that would
                    otherwise give no message
    pretrained.py   the other teacher families' official files, renamed, and how each resizes its positions;
                    CLIP's TorchScript archive's tensors read without running its code
    datafiles.py    the data: Fashion-MNIST's, CIFAR's and ImageNet's files found, downloaded, read, checked;
                    a small data set held in memory on the device, its batches made there; the loader, whose
                    batches a resume continues exactly; a training split's fingerprint, which a resume compares
    augment.py      timm's RandAugment policy and random erasing, as the authors' recipe uses them;
                    the same on a whole batch on the device
    files.py        the run and report files (JSON, JSON lines, text) written whole, one line when damaged; where a
                    command writes, refused before any work where open() says it cannot be; outputs written once
                    the work is done, one policy for all (a file there refused unless it is the command's own)
    errors.py       what a user reads: the one-line refusals (a setting, data, a checkpoint, a damaged or unwritable
                    file), how a flag and its value are spelled in them, and say, the print every line goes through

None of these imports a file of the root but vit.py: the scripts resolve their run, build their data, teacher and
model and hand them here (tests/test_layout.py).
"""
