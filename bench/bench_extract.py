"""Utterances per second of each extractor, batched (as extract.py runs it) against one utterance at a time,
side by side in one run, on generated media with small models of realistic width built from configs:

    text    a 4-layer BERT of width 384 (6 heads, FFN 1536), mean pooling, --batch_size utterances a batch
    visual  a CLIP vision tower of 4 layers, width 384, patch 32 at the real 224 px input (50 tokens a frame,
            as ViT-B/32), 4 frames of a distinct 1 s 10 fps 96 px H.264 clip per utterance
    audio   the is10 openSMILE set, 1 process against --jobs worker processes

The loop is the same extractor with batch size 1 (same models, decoding and per-utterance work, one utterance
per forward); audio's loop is 1 process. Both sides are warmed up first, then timed alternately --repeats
times, and the best time of each is kept. CPU (named as lscpu names it), and CUDA when available. Last, where
the visual path's time goes: frame decoding, CLIP preprocessing, and the model alone against batched.

    python bench/bench_extract.py
    python bench/bench_extract.py --threads 1
    python bench/bench_extract.py --utterances 48 --batch_size 16 --repeats 3

--full_size measures the real model sizes instead (RoBERTa-large, CLIP ViT-B/32; extract_full_size.py):
utterances/s, hours for MELD, and each model's time against its FLOPs at this CPU's matrix-product rate.

    python bench/bench_extract.py --full_size
"""
import argparse
import os
import platform
import subprocess
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

WIDTH, LAYERS = 384, 4


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def best_times(loop, batched, repeats):
    """(best loop seconds, best batched seconds), each side warmed up once, then timed alternately."""
    loop(), batched()
    times = {loop: [], batched: []}
    for _ in range(repeats):
        for fn in (loop, batched):
            t = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t)
    return min(times[loop]), min(times[batched])


def bench(device, n, batch_size, jobs, repeats, root):
    text = make_tiny_text_model(os.path.join(root, "text"), hidden=WIDTH, layers=LAYERS)
    clip = make_tiny_clip(os.path.join(root, "clip"), projection_dim=256, image_size=224, hidden=WIDTH,
                          layers=LAYERS, patch_size=32)
    utts = [Utterance(f"row {i}", f"d{i // 6}", i, "a", " ".join(SENTENCES[i % 12:i % 12 + 4]),
                      video=write_mp4(os.path.join(root, f"clip{i}.mp4"), seconds=1.0, size=96, seed=i))
            for i in range(n)]
    rows = []
    batched, single = (TextExtractor(text, "mean", 0, 128, b, device) for b in (batch_size, 1))
    texts, none = [u.text for u in utts], [""] * n
    rows.append(("text", *best_times(lambda: single.features(texts, none), lambda: batched.features(texts, none),
                                     repeats)))
    batched, single = (VisualExtractor(clip, 4, False, b, device) for b in (batch_size, 1))
    rows.append(("visual", *best_times(lambda: single.features(utts), lambda: batched.features(utts), repeats)))
    single, pooled = AudioExtractor("is10", 16000, 1, device), AudioExtractor("is10", 16000, jobs, device)
    rows.append((f"audio (is10, {jobs} jobs)", *best_times(lambda: single.features(utts),
                                                           lambda: pooled.features(utts), repeats)))
    pooled.close()
    stages = visual_stages(batched, utts, batch_size, repeats)
    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\n{device} ({where}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}): "
          f"{n} utterances, batch {batch_size}, best of {repeats}")
    print(f"{'modality':<22}{'loop utt/s':>12}{'batched utt/s':>15}{'ratio':>8}")
    for name, loop, fast in rows:
        print(f"{name:<22}{n / loop:>12.1f}{n / fast:>15.1f}{loop / fast:>7.2f}x")
    print("visual, where the time goes (s, best of each): " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))


def visual_stages(extractor, utts, batch_size, repeats):
    """Seconds of the visual path's stages over all utterances: decoding the frames, CLIP preprocessing, and the
    model one utterance at a time against batch_size utterances' frames a forward."""
    from vega_utils.anchors.images import image_features

    def timed(fn):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best
    decoded = [extractor.decode(u) for u in utts]
    per_utt = [extractor.processor(images=d, return_tensors="pt")["pixel_values"] for d in decoded]   # (F, 3, S, S)
    batches = [torch.cat(per_utt[i:i + batch_size]) for i in range(0, len(per_utt), batch_size)]  # (B * F, 3, S, S)
    model, device = extractor.model, extractor.device
    return {"decode": timed(lambda: [extractor.decode(u) for u in utts]),
            "preprocess": timed(lambda: [extractor.processor(images=d, return_tensors="pt") for d in decoded]),
            "model loop": timed(lambda: [image_features(model, x, device) for x in per_utt]),
            "model batched": timed(lambda: [image_features(model, x, device) for x in batches])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=48, help="utterances per measurement (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="batch of the batched side (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="audio worker processes (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--full_size", action="store_true",
                   help="RoBERTa-large and CLIP ViT-B/32 from their configs, on --utterances (default 256 here) "
                        "and --visual_utterances (default: %(default)s)")
    p.add_argument("--visual_utterances", type=int, default=64, help="utterances of the full-size visual "
                   "measurement (default: %(default)s)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full_size:
        from extract_full_size import full_size
        with tempfile.TemporaryDirectory() as root:
            n = args.utterances if "--utterances" in (argv or sys.argv) else 256
            full_size(root, n, args.visual_utterances, args.jobs, cpu_name())
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as root:
        for device in devices:
            bench(torch.device(device), args.utterances, args.batch_size, args.jobs, args.repeats, root)


if __name__ == "__main__":
    main()
