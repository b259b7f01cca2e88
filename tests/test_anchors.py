"""Anchor cache: building from images with a tiny offline CLIP, class assignment, loading and its checks."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from anchor_fixtures import draw_face, make_anchor_setup, make_image_folder  # noqa: E402  (sets offline env)

from vega_utils.anchors import bank as anchor_bank  # noqa: E402
from vega_utils.anchors import build as au  # noqa: E402
from vega_utils.anchors import images as ai  # noqa: E402
from vega_utils.common import VegaError
from vega_utils.data.datasets import DATASETS  # noqa: E402
from vega_utils.runs.config import load_preset, resolve  # noqa: E402

IEMOCAP = list(DATASETS["IEMOCAP"].class_names)
MELD = list(DATASETS["MELD"].class_names)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One tiny CLIP (width 16) and three images per IEMOCAP class in class-named subfolders."""
    root = str(tmp_path_factory.mktemp("anchors"))
    clip_dir, image_dir, made = make_anchor_setup(root, IEMOCAP, per_class=3)
    return clip_dir, image_dir, made


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    clip_dir, image_dir, _ = setup
    out = str(tmp_path_factory.mktemp("cache") / "35_anchor.pt")
    bank = ai.build_anchor_cache(image_dir, IEMOCAP, clip_dir, out, batch_size=2, device="cpu",
                                 progress=False)
    return out, bank


def direct_features(clip_dir, paths):
    """The features the way a user would compute them with transformers, one image at a time."""
    import transformers
    from PIL import Image
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls.from_pretrained(clip_dir)
    rows = []
    for path in paths:
        with Image.open(path) as image:
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
        rows.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return F.normalize(torch.cat(rows), dim=-1)


# ---------------------------------------------------------------------------------------- building
def test_cache_equals_direct_transformers_features(setup, built):
    clip_dir, _, made = setup
    out, bank = built
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert set(saved) == {"anchor_center", "anchor_img_dict"}
    assert list(saved["anchor_img_dict"]) == IEMOCAP
    assert saved["anchor_center"].shape == (len(IEMOCAP), 16)
    for i, c in enumerate(IEMOCAP):
        assert set(saved["anchor_img_dict"][c]) == {"feature"}
        expected = direct_features(clip_dir, made[c])
        got = saved["anchor_img_dict"][c]["feature"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # Centre = plain mean of the normalised features, not re-normalised (docs/method.md, section 4).
        torch.testing.assert_close(saved["anchor_center"][i], expected.mean(dim=0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.banks[i], got)
    loaded = anchor_bank.load_anchor_cache(out, IEMOCAP, expected_dim=16)
    torch.testing.assert_close(loaded.centers, bank.centers)


def test_transformers4_tensor_output_gives_same_cache(setup, built, tmp_path, monkeypatch):
    """transformers 4.x returns a bare tensor from get_image_features; the cache must not change."""
    import transformers
    clip_dir, image_dir, _ = setup
    as_v5 = transformers.CLIPModel.get_image_features

    def as_v4(self, *args, **kwargs):
        out = as_v5(self, *args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    monkeypatch.setattr(transformers.CLIPModel, "get_image_features", as_v4)
    bank = ai.build_anchor_cache(image_dir, IEMOCAP, clip_dir, str(tmp_path / "v4.pt"), batch_size=5,
                                 device="cpu", progress=False)
    torch.testing.assert_close(bank.centers, built[1].centers, rtol=1e-5, atol=1e-6)


def test_cli_prints_counts_and_writes_meld_cache(setup, tmp_path, capsys):
    clip_dir, _, _ = setup
    image_dir = str(tmp_path / "meld_faces")
    make_image_folder(image_dir, MELD, per_class=2, layout="names")
    out = str(tmp_path / "meld_anchor.pt")
    rc = au.main(["--image_dir", image_dir, "--Dataset", "MELD", "--CLIP_Model", clip_dir, "--out", out,
                  "--batch_size", "3", "--device", "cpu", "--no_progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    for c in MELD:
        assert f"  {c:<12}     2" in printed
    assert anchor_bank.load_anchor_cache(out, MELD).clip_dim == 16
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # no temporary left behind


def test_cli_error_exit_code(tmp_path, capsys):
    rc = au.main(["--image_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.pt"),
                  "--CLIP_Model", "unused"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: image folder")
    assert not os.path.exists(tmp_path / "a.pt")


def test_unloadable_clip_model_is_a_clear_error(setup, tmp_path):
    _, image_dir, _ = setup
    with pytest.raises(VegaError, match="could not load CLIP model 'nobody/no-such-clip'"):
        ai.build_anchor_cache(image_dir, IEMOCAP, "nobody/no-such-clip", str(tmp_path / "x.pt"),
                              device="cpu", progress=False)


# ---------------------------------------------------------------------------------- class assignment
@pytest.mark.parametrize("rel, expected", [
    ("happy/img_01.jpg", ["happy"]),
    ("Happy_03.PNG", ["happy"]),
    ("faces/sadness2.png", ["sad"]),
    ("HappyFace.jpg", ["happy"]),
    ("35/anger (1).jpeg", ["anger"]),
    ("unhappy.jpg", []),
    ("img_0001.jpg", []),
    ("happy/sad_01.jpg", ["happy", "sad"]),
])
def test_classes_named_by(rel, expected):
    assert ai.classes_named_by(rel, IEMOCAP) == expected


def test_label_words_above_the_image_folder_are_ignored(tmp_path):
    # Every parent folder names a class; only the path below image_dir may count.
    image_dir = str(tmp_path / "sad_lab" / "happy anger" / "35")
    made = make_image_folder(image_dir, IEMOCAP, per_class=2, layout="names")
    assigned = ai.assign_images(image_dir, IEMOCAP)
    assert assigned == made


def test_ambiguous_refused_and_unmatched_skipped(tmp_path, capsys):
    image_dir = str(tmp_path / "imgs")
    make_image_folder(image_dir, IEMOCAP, per_class=1)
    draw_face(os.path.join(image_dir, "stranger.png"), 1)
    os.makedirs(os.path.join(image_dir, "__MACOSX"))
    draw_face(os.path.join(image_dir, "__MACOSX", "sad_and_happy.png"), 2)  # zip debris: ignored
    assigned = ai.assign_images(image_dir, IEMOCAP)
    assert all(len(paths) == 1 for paths in assigned.values())
    assert "stranger.png" in capsys.readouterr().err
    draw_face(os.path.join(image_dir, "happy", "sad_face.png"), 3)
    with pytest.raises(VegaError, match=r"more than one class(.|\n)*happy/sad_face.png  \(names happy, sad\)"):
        ai.assign_images(image_dir, IEMOCAP)


def test_missing_class_is_named(tmp_path):
    image_dir = str(tmp_path / "imgs")
    make_image_folder(image_dir, [c for c in IEMOCAP if c != "frustration"], per_class=1)
    with pytest.raises(VegaError, match="no image for class\\(es\\) frustration in"):
        ai.build_anchor_cache(image_dir, IEMOCAP, "never-loaded", str(tmp_path / "x.pt"), progress=False)


# -------------------------------------------------------------------------------------- bad images
def test_corrupt_image_is_named_or_skipped(setup, tmp_path, capsys):
    clip_dir, _, _ = setup
    image_dir = str(tmp_path / "imgs")
    make_image_folder(image_dir, IEMOCAP, per_class=2)
    bad = os.path.join(image_dir, "sad", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = str(tmp_path / "x.pt")
    with pytest.raises(VegaError, match="cannot read image .*broken.jpg.*--skip_bad_images"):
        ai.build_anchor_cache(image_dir, IEMOCAP, clip_dir, out, device="cpu", progress=False)
    assert not os.path.exists(out)
    bank = ai.build_anchor_cache(image_dir, IEMOCAP, clip_dir, out, device="cpu", progress=False,
                                 skip_bad_images=True)
    captured = capsys.readouterr()
    assert "skipping unreadable image" in captured.err and "broken.jpg" in captured.err
    assert bank.banks[IEMOCAP.index("sad")].shape[0] == 2
    assert "(1 unreadable, skipped)" in captured.out


def test_class_with_only_bad_images_stops(setup, tmp_path):
    clip_dir, _, _ = setup
    image_dir = str(tmp_path / "imgs")
    make_image_folder(image_dir, [c for c in IEMOCAP if c != "anger"], per_class=1)
    os.makedirs(os.path.join(image_dir, "anger"))
    with open(os.path.join(image_dir, "anger", "a.png"), "wb") as f:
        f.write(b"nope")
    with pytest.raises(VegaError, match="no image for class\\(es\\) anger .*that could be read"):
        ai.build_anchor_cache(image_dir, IEMOCAP, clip_dir, str(tmp_path / "x.pt"), device="cpu",
                              skip_bad_images=True, progress=False)


# -------------------------------------------------------------------------------- loading and checks
def test_dimension_mismatch_is_clear(built):
    out, _ = built
    with pytest.raises(VegaError, match="has CLIP width 16 but --CLIP_Model/clip_dim expects 768"):
        anchor_bank.load_anchor_cache(out, IEMOCAP, expected_dim=768)


def good_dict(n=2, k=4):
    feats = {c: {"feature": F.normalize(torch.randn(n, k), dim=-1)} for c in IEMOCAP}
    return {"anchor_center": torch.stack([feats[c]["feature"].mean(0) for c in IEMOCAP]),
            "anchor_img_dict": feats}


def broken(kind):
    d = good_dict()
    if kind == "not a dict":
        return [1, 2]
    if kind == "missing class":
        del d["anchor_img_dict"]["excited"]
    elif kind == "widths":
        d["anchor_img_dict"]["sad"]["feature"] = torch.randn(2, 5)
    elif kind == "centers":
        d["anchor_center"] = d["anchor_center"][:3]
    elif kind == "nan":
        d["anchor_img_dict"]["happy"]["feature"][0, 0] = float("nan")
    return d


@pytest.mark.parametrize("kind, message", [
    ("not a dict", "expected a dict with keys 'anchor_center' and 'anchor_img_dict'"),
    ("missing class", "no images for class label\\(s\\) 'excited'"),
    ("widths", "feature widths differ between classes"),
    ("centers", "'anchor_center' has shape \\(3, 4\\), expected \\(6, 4\\)"),
    ("nan", "the features of 'happy' hold NaN"),
])
def test_invalid_caches_are_refused(tmp_path, kind, message):
    path = str(tmp_path / "bad.pt")
    torch.save(broken(kind), path)
    with pytest.raises(VegaError, match=f"anchor cache {path} is not a valid anchor cache: {message}"):
        anchor_bank.load_anchor_cache(path, IEMOCAP)


def test_unsafe_missing_and_damaged_files(tmp_path):
    import argparse
    unsafe = str(tmp_path / "unsafe.pt")
    torch.save({"anchor_center": argparse.Namespace(x=1)}, unsafe)
    with pytest.raises(VegaError, match="needs arbitrary unpickling.*argparse.Namespace"):
        anchor_bank.load_anchor_cache(unsafe, IEMOCAP)
    with pytest.raises(VegaError, match="anchor cache .*nothing.pt not found"):
        anchor_bank.load_anchor_cache(str(tmp_path / "nothing.pt"), IEMOCAP)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a torch file")
    with pytest.raises(VegaError, match="damaged or not a torch file"):
        anchor_bank.load_anchor_cache(str(damaged), IEMOCAP)


def test_published_layout_with_extra_precision_loads(tmp_path):
    d = good_dict()
    d["anchor_center"] = d["anchor_center"].double()  # any float dtype is accepted, used as float32
    path = str(tmp_path / "35_anchor.pt")
    torch.save(d, path)
    bank = anchor_bank.load_anchor_cache(path, IEMOCAP, expected_dim=4)
    assert bank.centers.dtype == torch.float32 and len(bank.banks) == 6


# ---------------------------------------------------------------------------- run.py's entry point
def run_config(clip_dir, **overrides):
    return resolve(load_preset("IEMOCAP").replace(CLIP_Model=clip_dir, **overrides))


def test_ensure_builds_from_fallback_folder_then_loads(setup, tmp_path, monkeypatch):
    clip_dir, _, _ = setup
    monkeypatch.chdir(tmp_path)
    cfg = run_config(clip_dir)
    assert cfg.clip_dim == 16 and cfg.anchor_path == os.path.join("anchor", "35_anchor.pt")
    with pytest.raises(VegaError, match="no anchor cache at anchor/35_anchor.pt and no image folder "
                                        "anchor/35/ or anchor/35_anchor/"):
        au.ensure_anchor_cache(cfg, device="cpu")
    make_image_folder(os.path.join("anchor", "35_anchor"), IEMOCAP, per_class=1)
    built_bank = au.ensure_anchor_cache(cfg, device="cpu")
    assert os.path.isfile(cfg.anchor_path)

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cache exists: it must be loaded, not rebuilt")
    monkeypatch.setattr(ai, "build_anchor_cache", must_not_build)
    torch.testing.assert_close(au.ensure_anchor_cache(cfg).centers, built_bank.centers)
    with pytest.raises(VegaError, match="has CLIP width 16 but --CLIP_Model/clip_dim expects 768"):
        au.ensure_anchor_cache(cfg.replace(clip_dim=768))


def test_ensure_refuses_to_build_with_wrong_clip_dim(setup, tmp_path, monkeypatch):
    clip_dir, _, _ = setup
    monkeypatch.chdir(tmp_path)
    make_image_folder(os.path.join("anchor", "35"), IEMOCAP, per_class=1)
    with pytest.raises(VegaError, match="gives features of width 16 but clip_dim expects 512"):
        au.ensure_anchor_cache(run_config(clip_dir, clip_dim=512), device="cpu")
    assert not os.path.exists(os.path.join("anchor", "35_anchor.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(setup, tmp_path, capsys):
    clip_dir, image_dir, _ = setup
    rc = au.main(["--image_dir", image_dir, "--CLIP_Model", clip_dir, "--out", str(tmp_path / "x.pt"),
                  "--device", "cuda"])
    assert rc == 2 and "no CUDA device is available" in capsys.readouterr().err
