"""Tests of data loading, checking, batching, augmentation and the synthetic generators."""
import copy
import pickle

import numpy as np
import pytest
import torch

from dataloader import DialogueDataset, collate, load_dialogues, make_loaders, speaker_names, split_validation
from vega_utils.anchors.bank import AnchorBank
from vega_utils.common import VegaError
from vega_utils.data.datasets import DATASETS
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
from vega_utils.runs.config import load_preset

SMALL = dict(n_train=10, n_test=4, min_len=3, max_len=12)


@pytest.fixture(scope="module")
def iemocap(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "IEMOCAP.pkl"
    summary = make_synthetic_dataset(path, "IEMOCAP", seed=1, **SMALL)
    return path, summary, load_dialogues(path, "IEMOCAP")


@pytest.fixture(scope="module")
def meld(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "meld.pkl"
    summary = make_synthetic_dataset(path, "MELD", seed=2, **SMALL)
    return path, summary, load_dialogues(path, "MELD")


def config(seed=5, batch_size=4):
    return load_preset("IEMOCAP").replace(seed=seed, batch_size=batch_size, num_workers=0)


def read_raw(path):
    with open(path, "rb") as f:
        return pickle.load(f)


# ---------------------------------------------------------------- loading good files
@pytest.mark.parametrize("text_as_3d", [False, True])
def test_iemocap_file_loads(tmp_path, text_as_3d):
    path = tmp_path / "iemocap.pkl"
    summary = make_synthetic_dataset(path, "IEMOCAP", seed=3, text_as_3d=text_as_3d, **SMALL)
    raw = read_raw(path)
    assert raw[2][raw[5][0]].ndim == (3 if text_as_3d else 2)
    data = load_dialogues(path, "IEMOCAP")
    assert data.dataset == "IEMOCAP" and data.class_names == list(DATASETS["IEMOCAP"].class_names)
    assert data.train_ids == raw[5] and data.test_ids == raw[6]          # file order kept
    assert len(data.train_ids) == 10 and len(data.test_ids) == 4
    assert all(isinstance(v, str) and v.startswith("Ses") for v in data.records)
    assert sum(len(d) for d in data.records.values()) == summary["n_utterances"]
    d = data.records[data.train_ids[0]]
    n = len(raw[1][d.id])
    assert d.text.shape == (n, 1024) and d.audio.shape == (n, 1582) and d.visual.shape == (n, 342)
    assert d.text.dtype == torch.float32 and d.labels.dtype == torch.long and d.speakers.dtype == torch.long
    assert d.labels.tolist() == raw[1][d.id]
    assert d.speakers.tolist() == ["MF".index(s) for s in raw[0][d.id]]
    assert torch.equal(d.text, torch.from_numpy(raw[2][d.id].reshape(n, 1024)))


def test_3d_text_matches_2d_text(tmp_path):
    flat, deep = tmp_path / "flat.pkl", tmp_path / "deep.pkl"
    make_synthetic_dataset(flat, "IEMOCAP", seed=4, **SMALL)
    make_synthetic_dataset(deep, "IEMOCAP", seed=4, text_as_3d=True, **SMALL)
    a, b = load_dialogues(flat, "IEMOCAP"), load_dialogues(deep, "IEMOCAP")
    assert all(torch.equal(a.records[v].text, b.records[v].text) for v in a.records)


def test_meld_file_loads(meld):
    path, summary, data = meld
    raw = read_raw(path)
    assert all(isinstance(v, int) for v in data.train_ids + data.test_ids)
    d = data.records[data.test_ids[-1]]
    assert d.audio.shape[1] == 300 and d.text.shape[1] == 1024 and d.visual.shape[1] == 342
    assert d.speakers.tolist() == [row.index(1) for row in raw[0][d.id]]
    assert d.speakers.max() < 9 and d.labels.max() < 7
    assert sum(summary["class_counts"].values()) == summary["n_utterances"]


def test_features_stored_as_tensors_and_lists_load(tmp_path, iemocap):
    raw = list(copy.deepcopy(read_raw(iemocap[0])))
    first = raw[5][0]
    raw[2] = {k: torch.from_numpy(v) for k, v in raw[2].items()}       # torch tensors
    raw[3] = {k: v.tolist() for k, v in raw[3].items()}                # nested lists
    path = tmp_path / "mixed.pkl"
    path.write_bytes(pickle.dumps(tuple(raw)))
    data = load_dialogues(path, "IEMOCAP")
    assert torch.equal(data.records[first].text, iemocap[2].records[first].text)
    assert torch.equal(data.records[first].audio, iemocap[2].records[first].audio)


def test_generation_is_deterministic(tmp_path):
    a, b, c = (tmp_path / f"{k}.pkl" for k in "abc")
    make_synthetic_dataset(a, "MELD", seed=7, **SMALL)
    make_synthetic_dataset(b, "MELD", seed=7, **SMALL)
    make_synthetic_dataset(c, "MELD", seed=8, **SMALL)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def class_mean_accuracy(data, modality):
    """Nearest-class-mean accuracy on the test set, with means from the training set."""
    def stack(ids):
        return (torch.cat([getattr(data.records[v], modality) for v in ids]),
                torch.cat([data.records[v].labels for v in ids]))
    x, y = stack(data.train_ids)
    means = torch.stack([x[y == c].mean(0) for c in range(len(data.class_names))])   # (C, D)
    xt, yt = stack(data.test_ids)
    return (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()


def test_synthetic_labels_are_learnable_and_context_matters(tmp_path):
    path = tmp_path / "big.pkl"
    summary = make_synthetic_dataset(path, "IEMOCAP", seed=0, n_train=60, n_test=20)
    data = load_dialogues(path, "IEMOCAP")
    counts = np.array(list(summary["class_counts"].values()))
    assert counts.max() > 2 * counts.min()                               # non-uniform like the real data
    text, visual = class_mean_accuracy(data, "text"), class_mean_accuracy(data, "visual")
    majority = counts.max() / counts.sum()
    assert text > majority + 0.15 and text > visual
    labels = [data.records[v].labels for v in data.train_ids]
    stay = np.mean([(y[1:] == y[:-1]).float().mean().item() for y in labels])
    assert stay > 0.6                                                    # sticky chain: context predicts


# ---------------------------------------------------------------- batching
def test_collate_shapes_padding_and_mask(iemocap):
    data = iemocap[2]
    dialogues = data.dialogues(data.train_ids[:3])
    lengths = [len(d) for d in dialogues]
    batch = collate(dialogues, n_speakers=2)
    L = max(lengths)
    assert batch.text.shape == (3, L, 1024) and batch.audio.shape == (3, L, 1582)
    assert batch.visual.shape == (3, L, 342)
    assert batch.speakers.shape == batch.labels.shape == batch.pad_mask.shape == (3, L)
    assert batch.dialogue_ids == data.train_ids[:3] and batch.n_utterances == sum(lengths)
    for b, (d, n) in enumerate(zip(dialogues, lengths)):
        assert not batch.pad_mask[b, :n].any() and batch.pad_mask[b, n:].all()
        assert torch.equal(batch.text[b, :n], d.text) and torch.equal(batch.labels[b, :n], d.labels)
        assert (batch.text[b, n:] == 0).all() and (batch.visual[b, n:] == 0).all()
        assert (batch.labels[b, n:] == -1).all() and (batch.speakers[b, n:] == 2).all()


def test_speaker_ids_and_padding_id(iemocap, meld):
    for (_, _, data), pad_id in ((iemocap, 2), (meld, 9)):
        dialogues = data.dialogues(data.test_ids)
        batch = collate(dialogues, n_speakers=pad_id)
        assert set(batch.speakers[~batch.pad_mask].tolist()) <= set(range(pad_id))
        assert (batch.speakers[batch.pad_mask] == pad_id).all()
    assert speaker_names("IEMOCAP") == ["M", "F"]
    assert speaker_names("MELD") == [str(i) for i in range(9)]


# ---------------------------------------------------------------- augmentation
def zeroed_columns(x):
    return (x == 0).all(0)                                               # (D,)


def test_augmentation_zeroes_whole_dims_shared_over_utterances(iemocap):
    data = iemocap[2]
    original = data.records[data.train_ids[0]]
    torch.manual_seed(0)
    seen = DialogueDataset([original], augment=True, drop_prob=0.3)[0]
    masks = []
    for m in ("text", "audio", "visual"):
        x, x0 = getattr(seen, m), getattr(original, m)
        dropped = zeroed_columns(x)
        assert 0.15 < dropped.float().mean() < 0.45                     # about drop_prob of the dims
        assert torch.equal(x[:, ~dropped], x0[:, ~dropped])              # kept dims untouched, not rescaled
        assert not zeroed_columns(x0).any()
        masks.append(dropped[:300])
    assert not torch.equal(masks[0], masks[1])                           # one draw per modality
    assert original.text.abs().sum() > 0 and not zeroed_columns(original.text).any()  # stored data intact


def test_augmentation_follows_torch_seed(iemocap):
    records = iemocap[2].dialogues(iemocap[2].train_ids[:2])
    ds = DialogueDataset(records, augment=True)
    torch.manual_seed(11)
    a = ds[1].audio
    torch.manual_seed(11)
    assert torch.equal(a, ds[1].audio)
    assert not torch.equal(a, ds[1].audio)


def test_train_is_augmented_and_test_never(iemocap):
    data = iemocap[2]
    loaders = make_loaders(data, config())
    torch.manual_seed(0)
    for batch in loaders["test"]:
        assert torch.equal(batch.text, collate(data.dialogues(batch.dialogue_ids), 2).text)
    assert [v for b in loaders["test"] for v in b.dialogue_ids] == data.test_ids
    batch = next(iter(loaders["train"]))
    raw = collate(data.dialogues(batch.dialogue_ids), 2)
    dropped = (batch.text == 0) & (raw.text != 0)
    assert dropped.any()
    assert torch.equal(batch.labels, raw.labels) and torch.equal(batch.pad_mask, raw.pad_mask)


# ---------------------------------------------------------------- loaders and splits
def epoch_orders(loader, epochs=2):
    return [[v for b in loader for v in b.dialogue_ids] for _ in range(epochs)]


def test_train_shuffle_is_seeded_and_changes_every_epoch(iemocap):
    data = iemocap[2]
    first = epoch_orders(make_loaders(data, config(seed=5))["train"])
    again = epoch_orders(make_loaders(data, config(seed=5))["train"])
    other = epoch_orders(make_loaders(data, config(seed=6))["train"])
    assert first == again
    assert first[0] != first[1] and first != other
    assert sorted(first[0]) == sorted(data.train_ids)


def test_batch_size_comes_from_config(iemocap):
    loaders = make_loaders(iemocap[2], config(batch_size=3))
    assert [len(b.dialogue_ids) for b in loaders["test"]] == [3, 1]


def test_valid_loader_takes_its_dialogues_out_of_train(iemocap):
    data = iemocap[2]
    train_ids, valid_ids = split_validation(data.train_ids, 0.3, seed=0)
    loaders = make_loaders(data, config(), valid_ids=valid_ids)
    trained = [v for b in loaders["train"] for v in b.dialogue_ids]
    assert sorted(trained) == sorted(train_ids)
    assert [v for b in loaders["valid"] for v in b.dialogue_ids] == valid_ids
    for batch in loaders["valid"]:
        assert torch.equal(batch.audio, collate(data.dialogues(batch.dialogue_ids), 2).audio)
    assert "valid" not in make_loaders(data, config())
    with pytest.raises(VegaError, match="not a training dialogue"):
        make_loaders(data, config(), valid_ids=[data.test_ids[0]])


def test_split_validation_is_deterministic_and_disjoint():
    ids = [f"d{i}" for i in range(20)]
    train, valid = split_validation(ids, 0.2, seed=3)
    assert (train, valid) == split_validation(ids, 0.2, seed=3)
    assert valid != split_validation(ids, 0.2, seed=4)[1]
    assert len(valid) == 4 and not set(train) & set(valid) and sorted(train + valid) == sorted(ids)
    assert train == [v for v in ids if v in train] and valid == [v for v in ids if v in valid]
    assert len(split_validation(ids, 0.01, seed=0)[1]) == 1             # at least one when ratio > 0
    assert split_validation(ids, 0.0, seed=0) == (ids, [])
    with pytest.raises(VegaError):
        split_validation(ids, 1.0, seed=0)
    with pytest.raises(VegaError, match="no training dialogues"):
        split_validation(["a"], 0.5, seed=0)


# ---------------------------------------------------------------- malformed files
def first_id(blob):
    return blob[5][0]


def _drop_audio(blob):
    del blob[3][first_id(blob)]


def _shorten_visual(blob):
    blob[4][first_id(blob)] = blob[4][first_id(blob)][:-1]


def _narrow_audio(blob):
    blob[3][first_id(blob)] = blob[3][first_id(blob)][:, :100]


def _nan_text(blob):
    blob[2][first_id(blob)][1, 5] = np.nan


def _label_out_of_range(blob):
    blob[1][first_id(blob)][0] = 6


def _label_not_int(blob):
    blob[1][first_id(blob)][0] = 1.5


def _unknown_speaker(blob):
    blob[0][first_id(blob)][0] = "X"


def _meld_speaker_not_one_hot(blob):
    blob[0][first_id(blob)][1] = [1, 1, 0, 0, 0, 0, 0, 0, 0]


def _empty_dialogue(blob):
    vid = first_id(blob)
    for k in range(5):
        blob[k][vid] = [] if k < 2 else np.zeros((0, blob[k][vid].shape[1]), np.float32)


def _empty_train(blob):
    blob[5] = []


def _empty_test(blob):
    blob[6] = []


def _duplicate_train_id(blob):
    blob[5] = blob[5] + blob[5][:1]


def _text_not_a_dict(blob):
    blob[2] = list(blob[2].values())


BAD_CONTENT = [
    # (case, dataset, mutate, fragments the message must hold; "{vid}" is the damaged dialogue's repr)
    ("missing dialogue", "IEMOCAP", _drop_audio, ["{vid}", "missing from the audio dict"]),
    ("length mismatch", "IEMOCAP", _shorten_visual, ["{vid}", "disagree", "visual"]),
    ("wrong dim", "IEMOCAP", _narrow_audio, ["{vid}", "audio", "dim 100", "expected 1582"]),
    ("NaN", "IEMOCAP", _nan_text, ["{vid}", "text", "non-finite"]),
    ("label out of range", "IEMOCAP", _label_out_of_range, ["{vid}", "label 6", "out of range [0, 6)"]),
    ("label not integer", "IEMOCAP", _label_not_int, ["{vid}", "not an integer", "1.5"]),
    ("unknown speaker", "IEMOCAP", _unknown_speaker, ["{vid}", "unknown", "'X'"]),
    ("MELD speaker not one-hot", "MELD", _meld_speaker_not_one_hot, ["{vid}", "not a one-hot vector of 9"]),
    ("empty dialogue", "IEMOCAP", _empty_dialogue, ["{vid}", "empty"]),
    ("empty train list", "IEMOCAP", _empty_train, ["train ids are empty"]),
    ("empty test list", "MELD", _empty_test, ["test ids are empty"]),
    ("duplicate id", "IEMOCAP", _duplicate_train_id, ["{vid}", "listed twice in the train ids"]),
    ("element not a dict", "IEMOCAP", _text_not_a_dict, ["element 2 (text)", "expected a dict"]),
]


@pytest.fixture(scope="module")
def clean_blobs(iemocap, meld):
    return {"IEMOCAP": read_raw(iemocap[0]), "MELD": read_raw(meld[0])}


def assert_rejected(path, dataset, fragments):
    with pytest.raises(VegaError) as caught:
        load_dialogues(path, dataset)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case,dataset,mutate,fragments", BAD_CONTENT, ids=[c[0] for c in BAD_CONTENT])
def test_malformed_content_is_rejected(tmp_path, clean_blobs, case, dataset, mutate, fragments):
    blob = list(copy.deepcopy(clean_blobs[dataset]))
    vid = first_id(blob)
    mutate(blob)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(tuple(blob)))
    assert_rejected(path, dataset, [f.replace("{vid}", repr(vid)) for f in fragments])


def test_dialogue_in_train_and_test_is_allowed(tmp_path, clean_blobs):
    blob = list(copy.deepcopy(clean_blobs["MELD"]))
    blob[6] = blob[6] + blob[5][:1]
    path = tmp_path / "overlap.pkl"
    path.write_bytes(pickle.dumps(tuple(blob)))
    data = load_dialogues(path, "MELD")
    assert data.test_ids[-1] == data.train_ids[0] and len(data.records) == 14


def test_missing_file_is_rejected(tmp_path):
    assert_rejected(tmp_path / "nowhere.pkl", "IEMOCAP", ["not found"])


def test_non_pickle_is_rejected(tmp_path):
    path = tmp_path / "notes.pkl"
    path.write_text("these are not features\n")
    assert_rejected(path, "IEMOCAP", ["not a readable pickle"])


@pytest.mark.parametrize("blob,found", [((1, 2, 3, 4, 5, 6), "tuple of length 6"),
                                        ({"a": 1}, "found a dict")])
def test_wrong_container_is_rejected(tmp_path, blob, found):
    path = tmp_path / "short.pkl"
    path.write_bytes(pickle.dumps(blob))
    assert_rejected(path, "IEMOCAP", ["7-tuple", found])


# ---------------------------------------------------------------- anchor cache
def test_synthetic_anchor_cache_layout(tmp_path):
    path = tmp_path / "anchor.pt"
    make_synthetic_anchor_cache(path, "MELD", clip_dim=32, n_per_class=4, seed=1)
    cache = torch.load(path)
    names = DATASETS["MELD"].class_names
    assert cache["anchor_center"].shape == (7, 32) and set(cache["anchor_img_dict"]) == set(names)
    for c, name in enumerate(names):
        feats = cache["anchor_img_dict"][name]["feature"]
        assert feats.shape == (4, 32)
        assert torch.allclose(feats.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert torch.allclose(cache["anchor_center"][c], feats.mean(0))
    centres = torch.nn.functional.normalize(cache["anchor_center"], dim=-1)
    assert (centres @ centres.T - torch.eye(7)).abs().max() < 0.8        # classes point different ways
    bank = AnchorBank.from_reference_dict(cache, names)
    assert bank.clip_dim == 32 and len(bank.banks) == 7
