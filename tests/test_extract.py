"""extract.py on generated media with tiny models built from configs: the features equal direct calls of the
libraries, the MELD layout trains and predicts end to end, resuming after kill -9 gives the same file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from extract_fixtures import (
    draw_face_like,
    make_iemocap_tree,
    make_manifest,
    make_meld_tree,
    make_models,
    make_tiny_speech_model,
    write_frames_mp4,
    write_wav,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import extract  # noqa: E402
from vega_utils.features.media import load_audio, load_frames  # noqa: E402
from vega_utils.features.utterances import Utterance  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    text_model, clip = make_models(str(root))
    meld = make_meld_tree(str(root / "meld"))
    return {"root": root, "text": text_model, "clip": clip, "meld": meld}


def flags(setup, *more):
    return ["--text_model", setup["text"], "--visual_model", setup["clip"], "--frames", "2", "--batch_size", "4",
            "--shard_size", "4", "--no_progress", *more]


def run_extract(setup, *args):
    assert extract.main(flags(setup, *args)) == 0


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def meld_out(setup):
    out = str(setup["root"] / "out" / "meld.npz")
    run_extract(setup, "--layout", "meld", "--root", setup["meld"], "--out", out)
    return out


def test_meld_layout_columns_and_record(meld_out):
    z = load(meld_out)
    assert set(z["split"]) == {"train", "valid", "test"} and z["audio"].shape[1] == 1582
    assert z["utterance_id"][0] == "dia0_utt0" and "café" in " ".join(z["sentence"])   # cp1252 CSV read
    spec = json.load(open(meld_out[:-4] + ".json"))
    assert spec["classes"] == ["neutral", "surprise", "fear", "sad", "happy", "disgust", "anger"]
    assert json.loads(str(z["extraction"])) == spec["extraction"]
    ex = spec["extraction"]["extractors"]
    assert len(ex["text"]["weights_sha256"]) == 64 and ex["audio"]["set"] == "is10" and ex["visual"]["frames"] == 2
    assert not os.path.exists(meld_out + ".parts")


def test_text_features_equal_a_direct_call(setup, meld_out):
    from transformers import AutoModel, AutoTokenizer
    z = load(meld_out)
    tok, model = AutoTokenizer.from_pretrained(setup["text"]), AutoModel.from_pretrained(setup["text"]).eval()
    with torch.no_grad():
        for i in (0, 5, 11):
            direct = model(**tok(str(z["sentence"][i]), return_tensors="pt")).last_hidden_state[0, 0]
            np.testing.assert_allclose(z["text"][i], direct.numpy(), atol=1e-5)


def test_text_context_mean_pooling_reads_only_the_utterance(setup, tmp_path):
    from transformers import AutoModel, AutoTokenizer
    rows = [{"dialogue_id": "a", "speaker": "x", "text": t, "label": "", "split": "predict"}
            for t in ("excuse me", "do you have your forms", "yeah")]
    out = str(tmp_path / "ctx.npz")
    run_extract(setup, "--manifest", make_manifest(str(tmp_path), rows), "--out", out, "--text_pooling", "mean",
                "--text_context", "2", "--audio", "egemaps")
    tok, model = AutoTokenizer.from_pretrained(setup["text"]), AutoModel.from_pretrained(setup["text"]).eval()
    enc = tok("excuse me do you have your forms", "yeah", return_tensors="pt")
    keep = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
    with torch.no_grad():
        direct = model(**enc).last_hidden_state[0, keep].mean(0)
    np.testing.assert_allclose(load(out)["text"][2], direct.numpy(), atol=1e-5)


def test_is10_audio_equals_opensmile_on_the_decoded_samples(setup, meld_out):
    import opensmile

    from vega_utils.features.audio import smile_config
    z = load(meld_out)
    clip = os.path.join(setup["meld"], "train_splits", "dia0_utt1.mp4")
    samples = load_audio(Utterance("r", "d", 0, "s", "t", video=clip), 16000)
    smile = opensmile.Smile(feature_set=smile_config("is10"), feature_level=opensmile.FeatureLevel.Functionals)
    direct = smile.process_signal(samples, 16000).to_numpy()[0]
    assert direct.shape == (1582,)
    np.testing.assert_array_equal(z["audio"][list(z["utterance_id"]).index("dia0_utt1")], direct.astype(np.float32))


def test_visual_features_equal_clip_on_the_decoded_frames(setup, meld_out):
    from vega_utils.anchors.images import feature_tensor, load_clip
    z = load(meld_out)
    clip = os.path.join(setup["meld"], "train_splits", "dia1_utt2.mp4")
    frames = load_frames(Utterance("r", "d", 0, "s", "t", video=clip), 2)
    model, processor = load_clip(setup["clip"], "cpu")
    with torch.no_grad():
        out = model.get_image_features(pixel_values=processor(images=frames, return_tensors="pt")["pixel_values"])
    direct = F.normalize(feature_tensor(out), dim=-1).mean(0)
    i = [k for k, (d, u) in enumerate(zip(z["dialogue_id"], z["utterance_id"])) if d == "train_dia1"
         and u == "dia1_utt2"][0]
    np.testing.assert_allclose(z["visual"][i], direct.numpy(), atol=1e-5)


def test_meld_run_like_and_inference_end_to_end(setup, meld_out, tmp_path):
    import inference
    import run
    assert run.run(["--Dataset", meld_out[:-4] + ".json", "--epochs", "1", "--hidden_dim", "32", "--no_clip_loss",
                     "--output_dir", str(tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs" / "meld").iterdir())
    config = json.load(open(run_dir / "config.json"))
    assert config["dataset_spec"]["extraction"]["extractors"]["audio"]["set"] == "is10"
    assert "utterance_id" in open(run_dir / "predictions.csv").readline()
    clips = os.path.join(setup["meld"], "train_splits")
    rows = [{"dialogue_id": "new", "speaker": s, "text": t, "video": os.path.join(clips, f"dia0_utt{k}.mp4")}
            for k, (s, t) in enumerate([("Joey", "excuse me"), ("Ross", "yeah")])]
    new = str(tmp_path / "new.npz")
    like = ["--like", meld_out[:-4] + ".json", "--no_progress"]
    assert extract.main([*like, "--manifest", make_manifest(str(tmp_path), rows), "--out", new]) == 0
    best = next(run_dir.glob("BEST*.pth"))
    preds = tmp_path / "preds.csv"
    assert inference.main(["--checkpoint", str(best), "--data_path", new, "--split", "predict",
                           "--predictions_out", str(preds), "--no_progress"]) == 0
    header = open(preds).readline()
    assert "utterance_id" in header and "text" in header and "yeah" in open(preds).read()
    # the same utterances extracted --like the first extraction: the same features
    again = str(tmp_path / "again.npz")
    manifest = make_manifest(str(tmp_path), [{"dialogue_id": "x", "speaker": "Ross", "text": "excuse me",
                                              "video": os.path.join(clips, "dia0_utt0.mp4")}], "one.csv")
    assert extract.main([*like, "--manifest", manifest, "--out", again]) == 0
    z, first = load(again), load(meld_out)
    np.testing.assert_array_equal(z["audio"][0], first["audio"][0])
    for m in ("text", "visual"):   # other batch mates: the same numbers up to float rounding
        np.testing.assert_allclose(z[m][0], first[m][0], atol=1e-6)
    # the whole release again --like the first extraction (same batching): the same file, byte for byte
    whole = str(tmp_path / "whole.npz")
    assert extract.main([*like, "--layout", "meld", "--root", setup["meld"], "--batch_size", "4", "--shard_size", "4",
                         "--out", whole]) == 0
    assert open(whole, "rb").read() == open(meld_out, "rb").read()
    # features of another extraction are refused by inference
    other = str(tmp_path / "other.npz")
    assert extract.main([*flags(setup, "--manifest", manifest, "--out", other, "--frames", "1")]) == 0
    code = inference.main(["--checkpoint", str(best), "--data_path", other, "--split", "predict",
                           "--predictions_out", str(tmp_path / "p2.csv"), "--no_progress"])
    assert code == 2


def test_killed_extraction_resumes_to_the_same_file(setup, tmp_path):
    clips = os.path.join(setup["meld"], "train_splits")
    texts = ["excuse me", "yeah", "you did", "oh god no", "okay"]
    rows = [{"dialogue_id": f"d{k // 3}", "speaker": "a", "text": t, "label": "x", "split": "train",
             "video": os.path.join(clips, f"dia0_utt{k % 4}.mp4")} for k, t in enumerate(texts)]
    manifest = make_manifest(str(tmp_path), rows)
    whole, resumed = str(tmp_path / "whole.npz"), str(tmp_path / "resumed.npz")
    args = flags(setup, "--manifest", manifest, "--shard_size", "2", "--audio", "egemaps")
    run_extract(setup, *args[len(flags(setup)):], "--out", whole)
    command = [sys.executable, os.path.join(ROOT, "extract.py"), *args, "--out", resumed]
    env = {**os.environ, "VEGA_EXTRACT_KILL_AFTER_SHARDS": "2"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert killed.returncode == -9 and not os.path.exists(resumed) and os.path.isdir(resumed + ".parts")
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "resuming" in again.stdout
    a, b = load(whole), load(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert open(whole, "rb").read() == open(resumed, "rb").read()      # the same file, byte for byte


def test_iemocap_layout(setup, tmp_path):
    root = make_iemocap_tree(str(tmp_path / "iemocap"))
    out = str(tmp_path / "iem.npz")
    run_extract(setup, "--layout", "iemocap", "--root", root, "--out", out, "--audio", "egemaps")
    z = load(out)
    assert list(z["speaker"][:3]) == ["F", "M", "M"] and set(z["split"]) == {"train", "test"}
    assert "happy" in set(z["label"]) and len(z["label"]) == 12          # xxx dropped in both sessions
    assert json.loads(str(z["extraction"]))["counts"]["dropped_labels"] == {"xxx": 2}


def test_missing_modalities_and_fallbacks_are_always_counted(meld_out):
    counts = json.load(open(meld_out[:-4] + ".json"))["extraction"]["counts"]
    assert counts["missing_audio"] == 0 and counts["missing_visual"] == 0 and counts["visual_fallbacks"] == 0


def test_training_with_the_vega_branch_on_extracted_data(setup, meld_out, tmp_path):
    """Anchors of the extracted dataset's classes built with the same tiny CLIP; run.py with the clip loss on."""
    from anchor_fixtures import make_image_folder

    import run
    from vega_utils.anchors.images import build_anchor_cache
    spec = json.load(open(meld_out[:-4] + ".json"))
    images, anchor = str(tmp_path / "images"), str(tmp_path / "anchor.pt")
    make_image_folder(images, spec["classes"], per_class=2)
    build_anchor_cache(images, spec["classes"], setup["clip"], anchor, device="cpu", progress=False)
    assert run.run(["--Dataset", meld_out[:-4] + ".json", "--anchor_path", anchor, "--CLIP_Model", setup["clip"],
                    "--epochs", "1", "--hidden_dim", "32", "--device", "cpu", "--no_progress",
                    "--output_dir", str(tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs" / "meld").iterdir())
    config = json.load(open(run_dir / "config.json"))
    assert config["clip_loss"] is True and config["clip_dim"] == 16 and config["anchor_path"] == anchor
    assert next(run_dir.glob("BEST*.pth"))


@pytest.fixture(scope="module")
def cv2_with_cascades():
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip(f"OpenCV {cv2.__version__} ships no Haar cascades (OpenCV 5); --faces needs OpenCV 4")
    return cv2


def test_faces_crop_to_the_face_and_fall_back_to_the_whole_frame(setup, tmp_path, cv2_with_cascades):
    from vega_utils.anchors.images import feature_tensor, load_clip
    from vega_utils.features.visual import CASCADE
    cv2 = cv2_with_cascades
    blank = np.full((160, 160, 3), 90, np.uint8)
    blank[40:120, 40:120] = (30, 120, 200)                           # a square: no face
    video = write_frames_mp4(str(tmp_path / "face.mp4"), [draw_face_like(160)] * 5 + [blank] * 5)
    rows = [{"dialogue_id": "a", "speaker": "x", "text": "yeah", "video": video}]
    out = str(tmp_path / "faces.npz")
    run_extract(setup, "--manifest", make_manifest(str(tmp_path), rows), "--out", out, "--faces",
                "--audio", "egemaps")
    z = load(out)
    counts = json.loads(str(z["extraction"]))["counts"]
    assert counts["visual_fallbacks"] == 1 and counts["missing_audio"] == 1
    frames = load_frames(Utterance("r", "d", 0, "s", "t", video=video), 2)       # a face, then no face
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, CASCADE))
    found = [cascade.detectMultiScale(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), scaleFactor=1.1, minNeighbors=5)
             for f in frames]
    assert len(found[0]) >= 1 and len(found[1]) == 0
    x, y, w, h = max(found[0], key=lambda f: f[2] * f[3])
    assert w < 160 and h < 160
    model, processor = load_clip(setup["clip"], "cpu")
    with torch.no_grad():
        pixels = processor(images=[frames[0][y:y + h, x:x + w], frames[1]], return_tensors="pt")["pixel_values"]
        direct = F.normalize(feature_tensor(model.get_image_features(pixel_values=pixels)), dim=-1).mean(0)
    np.testing.assert_allclose(z["visual"][0], direct.numpy(), atol=1e-5)


def test_hf_audio_is_batched_and_equals_a_direct_call(setup, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from vega_utils.features.audio import AudioExtractor
    speech = make_tiny_speech_model(str(tmp_path / "speech"))
    seconds = (0.5, 1.1, 0.8)
    rows = [{"dialogue_id": "a", "speaker": "x", "text": t, "audio": write_wav(str(tmp_path / f"u{k}.wav"), s, seed=k)}
            for k, (t, s) in enumerate(zip(("excuse me", "yeah", "you did"), seconds))]
    out = str(tmp_path / "hf.npz")
    run_extract(setup, "--manifest", make_manifest(str(tmp_path), rows), "--out", out, "--audio", f"hf:{speech}")
    z = load(out)
    extractor = AudioExtractor(f"hf:{speech}", 16000, 1, "cpu", batch_size=4)
    assert extractor.batches() and z["audio"].shape == (3, 32)
    fe, model = Wav2Vec2FeatureExtractor.from_pretrained(speech), Wav2Vec2Model.from_pretrained(speech).eval()
    for k in range(3):
        samples = load_audio(Utterance("r", "d", 0, "s", "t", audio=rows[k]["audio"]), 16000)
        with torch.no_grad():
            direct = model(**fe(samples, sampling_rate=16000, return_tensors="pt")).last_hidden_state[0].mean(0)
        np.testing.assert_allclose(z["audio"][k], direct.numpy(), atol=1e-4)
    assert json.loads(str(z["extraction"]))["extractors"]["audio"]["pooling"] == "mean over time"


def test_class_absent_from_train_gets_no_balanced_weights(setup, tmp_path, capsys):
    import run
    rows = [{"dialogue_id": f"d{k // 2}", "speaker": "x", "text": t, "label": lab, "split": split}
            for k, (t, lab, split) in enumerate([("excuse me", "a", "train"), ("yeah", "b", "train"),
                                                  ("you did", "a", "train"), ("oh god no", "b", "train"),
                                                  ("okay", "c", "test"), ("is there a problem", "a", "test")])]
    out = str(tmp_path / "absent.npz")
    run_extract(setup, "--manifest", make_manifest(str(tmp_path), rows), "--out", out, "--audio", "egemaps",
                "--classes", "a,b,c")
    assert "note: class(es) c have no training utterance" in capsys.readouterr().out
    spec = json.load(open(out[:-4] + ".json"))
    assert spec["class_weights"] == "none" and spec["extraction"]["classes_without_training_utterance"] == ["c"]
    assert run.run(["--Dataset", out[:-4] + ".json", "--epochs", "1", "--hidden_dim", "32", "--no_clip_loss",
                    "--device", "cpu", "--no_progress", "--output_dir", str(tmp_path / "runs")]) == 0
    every = str(tmp_path / "every.npz")
    run_extract(setup, "--manifest", make_manifest(str(tmp_path), rows[:4], "every.csv"), "--out", every,
                "--audio", "egemaps")
    assert json.load(open(every[:-4] + ".json"))["class_weights"] == "balanced"


def test_faces_without_haar_cascades_is_one_line(setup, tmp_path, monkeypatch, capsys):
    cv2 = pytest.importorskip("cv2")
    monkeypatch.delattr(cv2, "CascadeClassifier", raising=False)      # as in OpenCV 5
    rows = [{"dialogue_id": "a", "speaker": "x", "text": "yeah", "video": os.path.join(setup["meld"], "train_splits",
                                                                                     "dia0_utt0.mp4")}]
    args = flags(setup, "--manifest", make_manifest(str(tmp_path), rows), "--out", str(tmp_path / "f.npz"), "--faces")
    assert extract.main(args) == 2
    assert "--faces needs OpenCV's Haar cascades" in capsys.readouterr().err


def write_pcm_avi(path, samples, rate=16000):
    """An AVI holding one stereo track of 16-bit integer PCM (both channels the given samples)."""
    import av
    with av.open(path, "w") as c:
        stream = c.add_stream("pcm_s16le", rate=rate, layout="stereo")
        pcm = (np.stack([samples, samples]).T.reshape(1, -1) * 32767).astype(np.int16)   # (1, T * 2) interleaved
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            c.mux(packet)
    return path


def test_integer_pcm_in_a_container_is_read_in_the_range_of_a_wav(tmp_path):
    import soundfile
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    avi = write_pcm_avi(str(tmp_path / "pcm.avi"), tone)
    wav = str(tmp_path / "pcm.wav")
    soundfile.write(wav, (tone * 32767).astype(np.int16), 16000, subtype="PCM_16")
    from_avi = load_audio(Utterance("r", "d", 0, "s", "t", video=avi), 16000)
    from_wav = load_audio(Utterance("r", "d", 0, "s", "t", audio=wav), 16000)
    assert abs(np.abs(from_avi).max() - 0.5) < 1e-3
    np.testing.assert_array_equal(from_avi, from_wav)


def test_a_long_segment_decoded_twice_gives_the_same_frames(setup, monkeypatch):
    from vega_utils.features import media
    clip = Utterance("r", "d", 0, "s", "t", video=os.path.join(setup["meld"], "train_splits", "dia0_utt1.mp4"))
    held = load_frames(clip, 3)
    monkeypatch.setattr(media, "HELD_FRAMES", 2)      # every clip is now too long to hold: times first, then picks
    again = load_frames(clip, 3)
    assert len(again) == 3 and all(np.array_equal(a, b) for a, b in zip(held, again))


def test_a_segment_between_two_frames_gets_the_frame_before_it(tmp_path):
    grey = [np.full((64, 64, 3), 25 * k, dtype=np.uint8) for k in range(10)]   # frame k at k/10 s, value 25k
    video = write_frames_mp4(str(tmp_path / "steps.mp4"), grey)
    inside = load_frames(Utterance("r", "d", 0, "s", "t", video=video, start=0.3, end=0.35), 1)[0]
    between = load_frames(Utterance("r", "d", 0, "s", "t", video=video, start=0.51, end=0.55), 1)[0]
    assert abs(inside.mean() - 75) < 8 and abs(between.mean() - 125) < 8


def test_hf_segment_shorter_than_one_frame_is_a_problem_line(setup, tmp_path, capsys):
    speech = make_tiny_speech_model(str(tmp_path / "speech"))
    rows = [{"dialogue_id": "a", "speaker": "x", "text": t, "audio": write_wav(str(tmp_path / f"u{k}.wav"), s)}
            for k, (t, s) in enumerate([("excuse me", 0.5), ("yeah", 0.01)])]
    capsys.readouterr()                                   # what building the model printed
    out = str(tmp_path / "short.npz")
    args = flags(setup, "--manifest", make_manifest(str(tmp_path), rows), "--out", out, "--audio", f"hf:{speech}")
    assert extract.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 3" in err[0] and "shorter than one frame" in err[0] and "u1.wav" in err[0]
    assert not os.path.exists(out)


def test_a_wav_segment_is_the_slice_of_the_whole_file(tmp_path):
    import soundfile
    wav = write_wav(str(tmp_path / "long.wav"), 2.0)
    whole, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    part = load_audio(Utterance("r", "d", 0, "s", "t", audio=wav, start=0.5, end=1.25), rate)
    np.testing.assert_array_equal(part, whole.mean(axis=1)[int(0.5 * rate):int(1.25 * rate)])


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_rotated_video_is_read_upright_as_opencv_shows_it(tmp_path, rotation):
    """A phone's portrait video carries a display rotation; OpenCV's reader applies it: the frames must agree."""
    import av
    import cv2
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32], image[:8] = 255, 128                          # white left half, grey top band: no symmetry
    path = str(tmp_path / "turned.mp4")
    with av.open(path, "w") as c:
        stream = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        stream.height, stream.width, stream.pix_fmt = 32, 64, "yuv420p"
        stream.set_display_rotation(rotation)
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")), *stream.encode()]:
            c.mux(packet)
    (ours,) = load_frames(Utterance("r", "d", 0, "s", "t", video=path), 1)
    ok, theirs = cv2.VideoCapture(path).read()                     # BGR, turned by OpenCV's FFmpeg backend
    assert ok and ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs[..., ::-1].astype(int)).mean() < 8


@pytest.mark.parametrize("classification", [False, True])
def test_any_vision_model_as_visual_model(setup, tmp_path, classification):
    """A tiny ViT: its pooled output, or, saved as an image classifier (no pooler weights, which transformers
    would fill at random), the mean of its last hidden state; the same on every load."""
    from extract_fixtures import make_tiny_vit
    from transformers import AutoImageProcessor, ViTModel
    vit = make_tiny_vit(str(tmp_path / "vit"), classification)
    clip = os.path.join(setup["meld"], "train_splits", "dia0_utt1.mp4")
    rows = [{"dialogue_id": "a", "speaker": "x", "text": "yeah", "video": clip}]
    manifest = make_manifest(str(tmp_path), rows)
    outs = [str(tmp_path / f"v{k}.npz") for k in (0, 1)]
    for out in outs:
        run_extract(setup, "--manifest", manifest, "--out", out, "--visual_model", vit, "--audio", "egemaps")
    frames = load_frames(Utterance("r", "d", 0, "s", "t", video=clip), 2)
    model = ViTModel.from_pretrained(vit, add_pooling_layer=not classification).eval()
    with torch.no_grad():
        out = model(**AutoImageProcessor.from_pretrained(vit)(images=frames, return_tensors="pt"))
    direct = (out.last_hidden_state.mean(1) if classification else out.pooler_output).mean(0)
    z = load(outs[0])
    assert z["visual"].shape == (1, 32)
    np.testing.assert_allclose(z["visual"][0], direct.numpy(), atol=1e-5)
    np.testing.assert_array_equal(z["visual"], load(outs[1])["visual"])
    pooling = json.load(open(outs[0][:-4] + ".json"))["extraction"]["extractors"]["visual"]["pooling"]
    assert ("last hidden state" in pooling) == classification
