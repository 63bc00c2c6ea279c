"""The machinery the course's scripts share, none of it a concept of attention transfer: read the root's files
first (the README's reading order), and come here for how a run is set up, trained, saved and continued.

    engine.py       the step every script calls (train_one_epoch), evaluation, AdamW with layer decay, the log
    run.py          a run in progress (Run: optimizer, EMA, resume, evaluate, save) and what it writes
    loader.py       samplers and loaders that make a resume exact
    launch.py       how a script starts and ends: one process or many, device, precision, errors in one line
    config.py       one dataclass per script, each flag declared once (default, help, rule); the small presets
    cli.py          a config dataclass made a command line; --help with each value and where it comes from
    memory.py       sizes that cannot fit this machine, refused before anything is built
    rundir.py       the run directory: the lock, whose files it may write over
    resume.py       how --resume true continues a run: what may change, the state loaded, after a divergence
    checkpoints.py  weights from anywhere (this project's files, MAE's, torchvision's, names) into vit.py's ViT
    pretrained.py   the other teacher families' official files, renamed, and how each resizes its positions
    datafiles.py    each data set's files found, downloaded, read and checked
    augment.py      timm's RandAugment policy and random erasing, as the authors' recipe uses them
    files.py        small files (JSON, JSON lines, text) written whole, read back with one line when damaged

None of these imports a file of the root but vit.py: the scripts build their data, teacher and model and hand them
here (tests/test_layout.py).
"""
