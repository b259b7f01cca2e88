"""Raw conversations to try extract.py on, made here: a MELD release in miniature (the three CSVs and an MP4 clip
with video and audio per utterance), a manifest of new conversations, a new conversation recorded as one MP4
with its WebVTT transcript, and tiny random models to extract with.

    python -m vega_utils.features.samples demo      # demo/MELD.Raw, demo/new.csv, demo/talk.mp4 + talk.vtt,
                                                    # demo/text_model, demo/clip

WAV files are written with soundfile, MP4 files with PyAV; the models are built from configs (nothing comes from a
model hub), so their features mean nothing: the files exist to run every step of the walk-through in
the README ("From raw conversations"), and the tests.
"""
import argparse
import csv
import os
import sys

import numpy as np

from vega_utils.common import OneLineParser, exit_on_error
from vega_utils.data.toy_models import SENTENCES, save_tiny_clip, save_tiny_text_model


def tone(seconds, rate=16000, freq=220.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def write_wav(path, seconds=1.0, rate=16000, seed=0):
    import soundfile
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, tone(seconds, rate, 180.0 + 40 * (seed % 7), seed), rate)
    return path


def write_mp4(path, seconds=1.0, fps=10, size=64, rate=16000, seed=0, height=None):
    """An MP4 with an H.264 video stream (moving coloured squares; size x size pixels, or size wide and height
    high) and an AAC audio stream."""
    import av
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    height = height or size
    with av.open(path, "w") as c:
        video = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        video.width, video.height = size, height
        video.pix_fmt = "yuv420p"
        audio = c.add_stream("aac", rate=rate)
        audio.layout = "mono"
        base = rng.integers(0, 255, 3)
        for i in range(int(seconds * fps)):
            img = np.full((height, size, 3), base, dtype=np.uint8)
            x = (i * 5) % (min(size, height) - 16)
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


TALK = [("Ross", "excuse me"), ("Rachel", "yeah"), ("Ross", "do you have your forms"), ("Monica", "you did"),
        ("Rachel", "let me see them"), ("Ross", "is there a problem"), ("Monica", "oh god no"),
        ("Rachel", "okay but i got here first"), ("Ross", "who told you to get in this line"),
        ("Monica", "i am so happy for you"), ("Rachel", "that is terrible news"), ("Ross", "you were standing at "
                                                                                        "the beginning")]


def make_talk(root, turns=TALK, seconds=1.2, gap=0.3):
    """One conversation recorded as one MP4 (root/talk.mp4) and its WebVTT transcript (root/talk.vtt), a voice
    tag naming each cue's speaker; returns the two paths."""
    import pysubs2
    mp4 = write_mp4(os.path.join(root, "talk.mp4"), seconds=len(turns) * (seconds + gap) + gap, seed=200)
    subs = pysubs2.SSAFile()
    for k, (speaker, text) in enumerate(turns):
        start = gap + k * (seconds + gap) + 0.1 * (k % 3)
        subs.append(pysubs2.SSAEvent(start=int(start * 1000), end=int((start + seconds - 0.1 * (k % 2)) * 1000),
                                     text=f"<v {speaker}>{text}"))
    vtt = os.path.join(root, "talk.vtt")
    subs.save(vtt, format_="vtt")
    return mp4, vtt


def make_samples(root, dialogues=(12, 3, 4), per_dialogue=4, new_dialogues=2):
    """The walk-through's material under root: MELD.Raw/, new.csv with its clips in new/, text_model/, clip/."""
    make_meld_tree(os.path.join(root, "MELD.Raw"), dialogues=dialogues, per_dialogue=per_dialogue)
    rows = []
    for d in range(new_dialogues):
        for u in range(per_dialogue):
            clip = write_mp4(os.path.join(root, "new", f"talk{d}_{u}.mp4"), seconds=0.6, seed=100 + d * 10 + u)
            rows.append({"dialogue_id": f"talk{d}", "position": u, "speaker": ["Ross", "Rachel", "Monica"][u % 3],
                         "text": SENTENCES[(d + u) % len(SENTENCES)], "video": os.path.relpath(clip, root)})
    make_manifest(root, rows, "new.csv")
    make_talk(root)
    save_tiny_text_model(os.path.join(root, "text_model"))
    save_tiny_clip(os.path.join(root, "clip"))
    return root


def parser():
    p = OneLineParser(prog="python -m vega_utils.features.samples", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="where to write the samples (created)")
    p.add_argument("--dialogues", type=int, nargs=3, default=[12, 3, 4], metavar=("TRAIN", "DEV", "TEST"),
                   help="dialogues of each MELD split (default: %(default)s)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    def make():
        make_samples(args.folder, dialogues=tuple(args.dialogues))
        print(f"{args.folder}: MELD.Raw/ (a MELD release in miniature), new.csv (new conversations), talk.mp4 and "
              f"talk.vtt (a conversation and its transcript), text_model/ and clip/ (tiny random models)")
    return exit_on_error(make)


if __name__ == "__main__":
    sys.exit(main())
