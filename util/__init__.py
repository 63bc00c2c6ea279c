"""The machinery the course's scripts share, none of it a concept of attention transfer: read the root's files
first (the README's reading order), and come here for how a run is set up, trained, saved and continued.

    config.py       one dataclass per script becomes its command line; presets by --data; checks of every value
    launch.py       how a script starts and ends: one process or many, device, precision, seeds, the log, errors
    engine.py       the training loop: AdamW with layer decay, warm-up + cosine, EMA, AMP, evaluation, checkpoints
    rundir.py       the run directory: provenance, the lock, whose files it may write over
    resume.py       how --resume true continues a run: what may change, the state loaded, after a divergence
    checkpoints.py  weights from anywhere (this project's files, MAE's, torchvision's, names) into vit.py's ViT
    pretrained.py   the other teacher families' official files, renamed, and how each resizes its positions
    datafiles.py    each data set's files found, downloaded, read and checked
    augment.py      timm's RandAugment policy and random erasing, as the authors' recipe uses them
    files.py        small files (JSON, JSON lines, text) written whole, read back with one line when damaged

None of these imports a script that runs as a command; they may import the shared vit.py and data.py.
"""
