"""Utterances per second of each extractor, batched (as extract.py runs it) against one utterance at a time,
side by side in one run, on generated media with tiny-but-not-trivial models built from configs (a 4-layer
BERT of width 256, a CLIP vision tower of 4 layers at 224 px). CPU, and CUDA when available.

    python bench/bench_extract.py
    python bench/bench_extract.py --utterances 48 --batch_size 16
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from anchor_fixtures import make_tiny_clip  # noqa: E402
from extract_fixtures import SENTENCES, make_tiny_text_model, write_mp4  # noqa: E402

from vega_utils.features.audio import AudioExtractor  # noqa: E402
from vega_utils.features.text import TextExtractor  # noqa: E402
from vega_utils.features.utterances import Utterance  # noqa: E402
from vega_utils.features.visual import VisualExtractor  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(device, n, batch_size, jobs, root):
    text = make_tiny_text_model(os.path.join(root, "text"), hidden=256, layers=4)
    clip = make_tiny_clip(os.path.join(root, "clip"), projection_dim=128, image_size=224)
    utts = [Utterance(f"row {i}", f"d{i // 6}", i, "a", " ".join(SENTENCES[i % 12:i % 12 + 4]),
                      video=write_mp4(os.path.join(root, f"clip{i % 8}.mp4"), seconds=1.0, seed=i % 8))
            for i in range(n)]
    rows = []
    batched, single = (TextExtractor(text, "mean", 0, 128, b, device) for b in (batch_size, 1))
    texts = [u.text for u in utts]
    rows.append(("text", timed(lambda: single.features(texts, [""] * n)),
                 timed(lambda: batched.features(texts, [""] * n))))
    batched, single = (VisualExtractor(clip, 4, False, b, device) for b in (batch_size, 1))
    rows.append(("visual", timed(lambda: single.features(utts)), timed(lambda: batched.features(utts))))
    single, pooled = AudioExtractor("is10", 16000, 1, device), AudioExtractor("is10", 16000, jobs, device)
    pooled.features(utts[:jobs])   # start the workers outside the timing
    rows.append((f"audio (is10, {jobs} jobs)", timed(lambda: single.features(utts)),
                 timed(lambda: pooled.features(utts))))
    pooled.close()
    print(f"\n{device}: {n} utterances, batch {batch_size}")
    print(f"{'modality':<22}{'loop utt/s':>12}{'batched utt/s':>15}{'ratio':>8}")
    for name, loop, fast in rows:
        print(f"{name:<22}{n / loop:>12.1f}{n / fast:>15.1f}{loop / fast:>7.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=48, help="utterances per measurement (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="batch of the batched side (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="audio worker processes (default: %(default)s)")
    args = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as root:
        for device in devices:
            bench(torch.device(device), args.utterances, args.batch_size, args.jobs, root)


if __name__ == "__main__":
    main()
