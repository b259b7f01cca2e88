"""Offline material for the extraction tests: tiny text and CLIP models built from configs and saved with
save_pretrained, WAV files (soundfile), MP4 files with a video and an audio stream (PyAV), and small trees in
the MELD and IEMOCAP release layouts. Nothing comes from the hub."""
import csv
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from anchor_fixtures import make_tiny_clip  # noqa: E402

SENTENCES = ["excuse me", "do you have your forms", "yeah", "let me see them", "is there a problem",
             "who told you to get in this line", "you did", "you were standing at the beginning",
             "okay but i got here first", "oh god no", "i am so happy for you", "that is terrible news"]


def make_tiny_text_model(folder, hidden=32, layers=2, seed=0):
    """A BERT of a few layers and a word-piece tokenizer trained on SENTENCES, both saved in folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(SENTENCES * 3, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return str(folder)


def make_models(root):
    """(text model folder, CLIP folder) under root."""
    return (make_tiny_text_model(os.path.join(root, "text_model")),
            make_tiny_clip(os.path.join(root, "clip"), projection_dim=16, image_size=32))


def tone(seconds, rate=16000, freq=220.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def write_wav(path, seconds=1.0, rate=16000, seed=0):
    import soundfile
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, tone(seconds, rate, 180.0 + 40 * (seed % 7), seed), rate)
    return path


def write_mp4(path, seconds=1.0, fps=10, size=64, rate=16000, seed=0):
    """An MP4 with an H.264 video stream (moving coloured squares) and an AAC audio stream."""
    import av
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(path, "w") as c:
        video = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = c.add_stream("aac", rate=rate)
        audio.layout = "mono"
        base = rng.integers(0, 255, 3)
        for i in range(int(seconds * fps)):
            img = np.full((size, size, 3), base, dtype=np.uint8)
            x = (i * 5) % (size - 16)
            img[x:x + 16, x:x + 16] = 255 - base
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in video.encode():
            c.mux(packet)
        samples = tone(seconds, rate, 200.0 + 30 * (seed % 5), seed)
        for lo in range(0, samples.size, 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, lo:lo + 1024], format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = lo
            for packet in audio.encode(frame):
                c.mux(packet)
        for packet in audio.encode():
            c.mux(packet)
    return path


MELD_EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]


def make_meld_tree(root, dialogues=(2, 1, 1), per_dialogue=4, seconds=0.6):
    """A MELD release in miniature: the three CSVs (the test one in cp1252) and their clips."""
    folders = {"train": ("train_sent_emo.csv", "train_splits"), "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
               "test": ("test_sent_emo.csv", "output_repeated_splits_test")}
    n = 0
    for (split, (name, clips)), count in zip(folders.items(), dialogues):
        rows = []
        for d in range(count):
            for u in range(per_dialogue):
                text = SENTENCES[n % len(SENTENCES)] + (" café" if split == "test" else "")
                rows.append([n + 1, text, ["Ross", "Rachel", "Monica"][u % 3], MELD_EMOTIONS[n % 7], "neutral", d, u,
                             1, 1, "00:00:01,000", "00:00:02,000"])
                write_mp4(os.path.join(root, clips, f"dia{d}_utt{u}.mp4"), seconds=seconds, seed=n)
                n += 1
        with open(os.path.join(root, name), "w", newline="", encoding="cp1252" if split == "test" else "utf-8") as f:
            csv.writer(f).writerows([MELD_HEADER] + rows)
    return str(root)


def make_manifest(root, rows, name="talks.csv"):
    """Write a manifest of rows (dicts) under root; returns its path."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    path = os.path.join(root, name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    return path


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
