"""Synthetic stand-ins for the feature pickles and the anchor cache, in the exact real layouts.

The real IEMOCAP/MELD features and the emotion images are not shipped, so tests, smoke runs and
benchmarks use these. The data is built so that a model has something real to learn:
- labels follow a sticky Markov chain inside a dialogue (an utterance usually keeps the previous emotion),
- every modality holds a class prototype plus Gaussian noise, text most informative and visual least,
- a fraction of utterances carries only a weak signal, so their label must come from the context,
- class frequencies follow the real datasets' label counts.
"""
import pickle

import numpy as np
import torch

from vega_utils.common import _atomic_write, atomic_torch_save
from vega_utils.data.datasets import dataset_info

# Label counts of the real files (whole dataset), in class-id order: the class prior of the generator.
REAL_CLASS_COUNTS = {
    "IEMOCAP": (648, 1084, 1708, 1103, 1041, 1849),
    "MELD": (6436, 1636, 358, 1002, 2308, 361, 1607),
}
# Distance between two class prototypes in units of the noise std, per modality (at signal=1).
SEPARATION = {"text": 3.0, "audio": 2.0, "visual": 1.2}
STAY_PROB = 0.7             # chance an utterance keeps the previous utterance's emotion
AMBIGUOUS_FRACTION = 0.25   # utterances whose features carry only a weak class signal
AMBIGUOUS_STRENGTH = 0.15
SPEAKER_SWITCH_PROB = 0.8   # IEMOCAP: chance the other speaker talks next

IEMOCAP_LIKE = dict(n_train=120, n_test=31, min_len=8, max_len=110)  # the real split sizes (151 dialogues)


def _dialogue_ids(dataset, n):
    if dataset == "MELD":
        return list(range(n))  # MELD ids are ints
    return [f"Ses{i % 5 + 1:02d}{'FM'[i % 2]}_synth{i:03d}" for i in range(n)]


def _prototypes(rng, n_classes, dim, separation):
    """Random class centres whose pairwise distance is about `separation` (noise std 1), whatever dim is."""
    scale = separation / np.sqrt(2 * dim)
    return (rng.standard_normal((n_classes, dim)) * scale).astype(np.float32)   # (C, D)


def _label_chain(rng, n, prior):
    labels = np.empty(n, dtype=np.int64)
    labels[0] = rng.choice(len(prior), p=prior)
    fresh = rng.choice(len(prior), size=n, p=prior)   # drawn from the prior keeps it the stationary law
    stay = rng.random(n) < STAY_PROB
    for i in range(1, n):
        labels[i] = labels[i - 1] if stay[i] else fresh[i]
    return labels


def _speakers(rng, dataset, n, n_speakers):
    if dataset == "IEMOCAP":
        who = [int(rng.integers(2))]
        for _ in range(n - 1):
            who.append(1 - who[-1] if rng.random() < SPEAKER_SWITCH_PROB else who[-1])
        return ["MF"[w] for w in who]
    cast = rng.choice(n_speakers, size=int(rng.integers(2, 5)), replace=False)   # 2-4 people per scene
    who = rng.choice(cast, size=n)
    return [[int(j == w) for j in range(n_speakers)] for w in who]


def _features(rng, labels, strength, protos):
    noise = rng.standard_normal((len(labels), protos.shape[1]), dtype=np.float32)   # (n, D)
    return noise + strength[:, None] * protos[labels]                               # (n, D)


def make_synthetic_dataset(path, dataset="IEMOCAP", n_train=40, n_test=12, min_len=8, max_len=30,
                           seed=0, signal=1.0, text_as_3d=False):
    """Write a pickle in the real 7-tuple layout (docs/method.md, section 1) and return a short summary.

    text_as_3d stores text as [1, n_utt, 1024], as some IEMOCAP files do.
    """
    info = dataset_info(dataset)
    rng = np.random.default_rng(seed)
    prior = np.asarray(REAL_CLASS_COUNTS[info.name], dtype=np.float64)
    prior /= prior.sum()
    dims = {"text": info.text_dim, "audio": info.audio_dim, "visual": info.visual_dim}
    protos = {m: _prototypes(rng, len(prior), d, SEPARATION[m]) for m, d in dims.items()}

    ids = _dialogue_ids(info.name, n_train + n_test)
    speakers, labels, feats = {}, {}, {m: {} for m in dims}
    for vid in ids:
        n = int(rng.integers(min_len, max_len + 1))
        y = _label_chain(rng, n, prior)
        ambiguous = rng.random(n) < AMBIGUOUS_FRACTION
        strength = (signal * np.where(ambiguous, AMBIGUOUS_STRENGTH, 1.0)).astype(np.float32)   # (n,)
        for m in dims:
            feats[m][vid] = _features(rng, y, strength, protos[m])
        if text_as_3d:
            feats["text"][vid] = feats["text"][vid][None]   # (n, D) -> (1, n, D)
        labels[vid] = [int(v) for v in y]
        speakers[vid] = _speakers(rng, info.name, n, info.n_speakers)

    train_ids, test_ids = ids[:n_train], ids[n_train:]
    blob = (speakers, labels, feats["text"], feats["audio"], feats["visual"], train_ids, test_ids)
    _atomic_write(path, lambda f: pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL), "wb")
    counts = np.bincount(np.concatenate([labels[v] for v in ids]), minlength=len(prior))
    return {"path": str(path), "dataset": info.name, "n_dialogues": len(ids), "n_train": len(train_ids),
            "n_test": len(test_ids), "n_utterances": int(counts.sum()),
            "class_counts": dict(zip(info.class_names, counts.tolist()))}


def make_synthetic_anchor_cache(path, dataset="IEMOCAP", clip_dim=512, n_per_class=5, seed=0):
    """Write an anchor cache in the reference layout: unit features clustered around one direction per class.

    The centre of a class is the mean of its normalised features, not re-normalised (as the reference).
    Returns the saved dict.
    """
    info = dataset_info(dataset)
    gen = torch.Generator().manual_seed(seed)
    raw_directions = torch.randn(len(info.class_names), clip_dim, generator=gen)    # (C, K)
    directions = torch.nn.functional.normalize(raw_directions, dim=-1)
    bank, centres = {}, []
    for c, name in enumerate(info.class_names):
        # noise of total norm about 0.5 around a unit direction: cosine to the direction about 0.9
        noise = torch.randn(n_per_class, clip_dim, generator=gen) * (0.5 / clip_dim ** 0.5)   # (n, K)
        feats = torch.nn.functional.normalize(directions[c] + noise, dim=-1)                # (n, K)
        bank[name] = {"feature": feats}
        centres.append(feats.mean(0))
    cache = {"anchor_center": torch.stack(centres), "anchor_img_dict": bank}   # (C, K)
    atomic_torch_save(cache, path)
    return cache
