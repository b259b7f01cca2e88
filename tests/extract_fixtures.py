"""Offline material for the extraction tests: tiny text and CLIP models built from configs and saved with
save_pretrained, WAV files (soundfile), MP4 files with a video and an audio stream (PyAV), and small trees in
the MELD and IEMOCAP release layouts. Nothing comes from the hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from anchor_fixtures import make_tiny_clip  # noqa: E402

from vega_utils.data.toy_models import SENTENCES  # noqa: E402,F401
from vega_utils.data.toy_models import save_tiny_text_model as make_tiny_text_model  # noqa: E402
from vega_utils.features.samples import (  # noqa: E402,F401
    MELD_EMOTIONS,
    make_manifest,
    make_meld_tree,
    tone,
    write_mp4,
    write_wav,
)


def make_models(root):
    """(text model folder, CLIP folder) under root."""
    return (make_tiny_text_model(os.path.join(root, "text_model")),
            make_tiny_clip(os.path.join(root, "clip"), projection_dim=16, image_size=32))


def make_iemocap_tree(root, seconds=0.5):
    """Two sessions (1 train, 5 test), one dialogue each: transcriptions, labels, sentence WAVs, the AVI."""
    labels = ["neu", "hap", "xxx", "sad", "ang", "exc", "fru"]
    for session in (1, 5):
        dialog = f"Ses0{session}F_impro01"
        base = os.path.join(root, f"Session{session}")
        trans, evals = [], []
        for k, label in enumerate(labels):
            utt = f"{dialog}_{'FM'[k % 2]}{k:03d}"
            start, end = 0.1 + k * 0.6, 0.1 + k * 0.6 + seconds
            trans.append(f"{utt} [{start:08.4f}-{end:08.4f}]: {SENTENCES[k]}")
            evals.append(f"[{start:.4f} - {end:.4f}]\t{utt}\t{label}\t[2.5000, 2.5000, 2.5000]")
            write_wav(os.path.join(base, "sentences", "wav", dialog, f"{utt}.wav"), seconds, seed=k)
        trans.insert(2, "M: (breathing)")
        for sub, lines in (("transcriptions", trans), ("EmoEvaluation", ["% header"] + evals)):
            os.makedirs(os.path.join(base, "dialog", sub), exist_ok=True)
            with open(os.path.join(base, "dialog", sub, f"{dialog}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
        write_mp4(os.path.join(base, "dialog", "avi", "DivX", f"{dialog}.avi"), seconds=0.2 + len(labels) * 0.6)
    return str(root)


def draw_face_like(size=160, shift=0):
    """An RGB (size, size, 3) uint8 cartoon face (skin ellipse, brows, eyes, nose, mouth on grey) that OpenCV's
    frontal-face Haar cascade finds; anchor_fixtures.draw_face draws noise, which holds no face."""
    import cv2
    img = np.full((size, size, 3), 90, np.uint8)
    c, s = (size // 2 + shift, size // 2), size / 160

    def at(dx, dy):
        return c[0] + int(dx * s), c[1] + int(dy * s)
    cv2.ellipse(img, c, (int(42 * s), int(55 * s)), 0, 0, 360, (200, 170, 150), -1)
    for dx in (-17, 17):
        cv2.ellipse(img, at(dx, -12), (int(9 * s), int(5 * s)), 0, 0, 360, (30, 30, 30), -1)
        cv2.line(img, at(dx - 10, -24), at(dx + 10, -24), (60, 40, 30), 3)
    cv2.line(img, at(0, -5), at(0, 12), (150, 120, 100), 3)
    cv2.ellipse(img, at(0, 28), (int(16 * s), int(5 * s)), 0, 0, 360, (90, 40, 40), -1)
    return img


def write_frames_mp4(path, images, fps=10):
    """An MP4 (H.264, no audio) of the given RGB images, one frame each."""
    import av
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as c:
        video = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        video.height, video.width = images[0].shape[:2]
        video.pix_fmt = "yuv420p"
        for img in images:
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in video.encode():
            c.mux(packet)
    return path


def make_tiny_speech_model(folder, attention_mask=True, seed=0):
    """A wav2vec2 of 2 layers (width 32) with a layer-norm feature encoder, and its feature extractor (returning
    attention masks, so extract.py batches it), saved in folder."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
                            feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2)
    torch.manual_seed(seed)
    Wav2Vec2Model(config).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=attention_mask).save_pretrained(folder)
    return str(folder)


FILLERS = ("we went to the market then talked about the weather and a train that was late on monday while "
           "my friend read his paper near an old window").split()
KEYWORDS = {"joy": ("glad", "thrilled"), "anger": ("furious", "annoyed"), "sad": ("gloomy", "upset")}


def keyword_rows(n_dialogues, per_dialogue=6, seed=0, predict=0):
    """Manifest rows whose label is the class of one keyword hidden among eight random filler words: the
    label is in one token, which a frozen random encoder's first token mixes with all the others. 60% of the
    dialogues train, 15% valid, the rest test; then `predict` more dialogues of the split predict, labelled."""
    rng = np.random.default_rng(seed)
    classes, rows = sorted(KEYWORDS), []
    for d in range(n_dialogues + predict):
        split = ("train" if d < n_dialogues * 0.6 else "valid" if d < n_dialogues * 0.75 else
                 "test" if d < n_dialogues else "predict")
        for k in range(per_dialogue):
            label = classes[rng.integers(len(classes))]
            words = list(rng.choice(FILLERS, 8))
            words.insert(int(rng.integers(9)), str(rng.choice(KEYWORDS[label])))
            rows.append({"dialogue_id": f"d{d}", "speaker": "ab"[k % 2], "text": " ".join(words), "label": label,
                         "split": split})
    return rows


def keyword_sentences():
    return [" ".join(FILLERS)] + [w for pair in KEYWORDS.values() for w in pair]


def make_tiny_vit(folder, classification=False, seed=0):
    """A ViT of 2 layers (width 32, 32 px, patch 8) and its image processor; classification: saved as an image
    classifier (a facial-expression ViT's kind), whose checkpoint holds no pooler weights."""
    import torch
    import transformers
    from transformers import ViTConfig, ViTForImageClassification, ViTModel
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=7)
    torch.manual_seed(seed)
    (ViTForImageClassification if classification else ViTModel)(config).save_pretrained(folder)
    processor_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor_cls(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)
