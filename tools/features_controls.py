"""
features.py's controls: every pair of methods beside the seed-to-seed pairs of one method (how alike one recipe's
runs are anyway), each number as its mean and spread over the pairs and a bootstrap interval over the test images.
Models named <method>-<seed> are grouped; two methods are compared over their pairs of models of different seeds.
The bootstrap redraws the test images: for CKA in the batches they were run in (each batch's statistics are
kept: one image's would be a d x d matrix per pair of models), for predictions one by one.
"""
import re
import statistics
from itertools import combinations, combinations_with_replacement

import torch

from ensemble import ensemble_probs

LEVEL = 0.95   # the share of the resamples an interval holds


def method_seed(name):
    """'distill-2' -> ('distill', 2); a name without a seed is a method of its own: 'teacher' -> ('teacher', None)."""
    m = re.fullmatch(r'(.+)-(\d+)', name)
    return (m[1], int(m[2])) if m else (name, None)


def group_pairs(names, a, b):
    """The pairs of models that compare method a with method b: two seeds of one method (its seed-to-seed control),
    or one model of each method from different seeds, so that no pair shares an initialisation or an order of
    batches, as no seed-to-seed pair does (the same seed of two methods can start from the same weights)."""
    of = lambda m: [k for k in names if method_seed(k)[0] == m]
    if a == b:
        return list(combinations(of(a), 2))
    pairs = [(x, y) for x in of(a) for y in of(b)]
    apart = [(x, y) for x, y in pairs if method_seed(x)[1] is None or method_seed(x)[1] != method_seed(y)[1]]
    return apart or pairs


def interval(values):
    """The interval holding LEVEL of values (R,), as [low, high]."""
    return torch.quantile(values.double(), torch.tensor([1 - LEVEL, 1 + LEVEL], dtype=torch.float64) / 2).tolist()


def spread(values, replicates=None):
    """mean, std over the pairs (0 for one), min, max, and the bootstrap's interval of the mean ((R, pairs) values)."""
    out = {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0,
           'min': min(values), 'max': max(values)}
    if replicates is not None:
        out['interval'] = interval(replicates.double().mean(1))
    return out


def draws(k, resamples, seed):
    """(resamples, k) counts: how often each of k units is drawn in each resample, k draws with replacement."""
    idx = torch.randint(k, (resamples, k), generator=torch.Generator().manual_seed(seed))
    return torch.zeros(resamples, k).scatter_add_(1, idx, torch.ones(resamples, k))


def resampled(stats, pairs, counts):
    """{(a, b): (R,) CKA} of each pair on R resamples of the batches a CKAStats kept, counts (R, K): how many times
    each of the K batches is drawn. Counts of all ones give its `cka` (to fp32's digits)."""
    w = counts.double()   # (R, K)
    total = lambda key: torch.tensordot(w, torch.stack([b[1][key] for b in stats.batches]).double(), 1)   # (R, ...)
    n = w @ torch.tensor([b[0] for b in stats.batches]).double()   # (R,)
    s = {k: total(k) for k in stats.shift}   # (R, d) each

    def centred(a, b):   # (R, d_a, d_b), as CKAStats.centred
        c = total((a, b)) if (a, b) in stats.total else total((b, a)).mT
        return c - s[a][:, :, None] * s[b][:, None, :] / n[:, None, None]
    norm = {k: centred(k, k).flatten(1).norm(dim=1) for k in {x for p in pairs for x in p}}   # (R,) each
    return {(a, b): centred(a, b).square().sum((1, 2)) / (norm[a] * norm[b]) for a, b in pairs}


def prediction_values(logits, labels, a, b, w):
    """For the pair of classifiers (a, b), each (R,) on the images weighted by w (R, n): top-1 of each and of their
    ensemble (mean of probabilities, ensemble.py) and its gain over the better one, how often their top-1 differs,
    how often both are wrong, and P(b wrong | a wrong) (b's error rate if their errors were independent; 1 if b
    fails wherever a does)."""
    pa, pb = logits[a].argmax(-1), logits[b].argmax(-1)
    pe = ensemble_probs([logits[a], logits[b]]).argmax(-1)
    mean = lambda t: w @ t.double() / w.sum(1)   # (R,)
    wa, wb = pa != labels, pb != labels
    both, top1_a, top1_b = mean(wa & wb), 100 * mean(~wa), 100 * mean(~wb)
    top1_ensemble = 100 * mean(pe == labels)
    return {'disagreement': mean(pa != pb), 'both_wrong': both,
            'b_wrong_given_a_wrong': both / mean(wa), 'a_wrong_given_b_wrong': both / mean(wb),
            'top1_a': top1_a, 'top1_b': top1_b, 'top1_ensemble': top1_ensemble,
            'gain': top1_ensemble - torch.maximum(top1_a, top1_b)}


def controls(r, tokens, logits, labels, resamples, seed):
    """'groups': for every two methods (and each with itself: its seed-to-seed control), the CKA of their pairs
    (`group_pairs`) per block and, between classifiers, their predictions (`prediction_values`), each as `spread`
    over the pairs; each pair's interval of its CKA ('tokens_interval'); 'bootstrap': how the intervals were drawn.
    The predictions are computed once on every image (a first row of weights all ones), then on each resample."""
    cka = {(p['a'], p['b']): p for p in r['cka']}
    boot = [dict.fromkeys(cka)] * r['depth']                                   # [block] {pair: (R,) CKA}
    if resamples:
        counts = draws(len(tokens[0].batches), resamples, seed)
        boot = [resampled(s, list(cka), counts) for s in tokens]
        for pair, p in cka.items():
            p['tokens_interval'] = [interval(b[pair]) for b in boot]
    weights = torch.cat([torch.ones(1, len(labels)), draws(len(labels), resamples, seed + 1)]).double()   # (1 + R, n)
    stack = lambda values: torch.stack(values, 1) if resamples else None   # (R, pairs) replicates
    groups = []
    for a, b in combinations_with_replacement(dict.fromkeys(method_seed(k)[0] for k in r['models']), 2):
        ps = group_pairs(r['models'], a, b)
        if not ps:
            continue
        keys = [p if p in cka else p[::-1] for p in ps]
        g = {'a': a, 'b': b, 'pairs': [list(p) for p in ps],
             'tokens': [spread([cka[p]['tokens'][i] for p in keys], stack([boot[i][p] for p in keys]))
                        for i in range(r['depth'])],
             'class_token': [spread([cka[p]['class_token'][i] for p in keys]) for i in range(r['depth'])]}
        if all(k in logits for p in ps for k in p):
            values = [prediction_values(logits, labels, x, y, weights) for x, y in ps]   # each (1 + R,)
            g['predictions'] = {m: spread([v[m][0].item() for v in values], stack([v[m][1:] for v in values]))
                                for m in values[0]}
        groups.append(g)
    how = {'resamples': resamples, 'seed': seed, 'level': LEVEL, 'cka_unit': 'a batch of images',
           'cka_units': len(tokens[0].batches), 'prediction_unit': 'an image'} if resamples else None
    return {'groups': groups, 'bootstrap': how}
