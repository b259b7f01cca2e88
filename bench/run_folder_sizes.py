"""The size of every file a run folder holds at a preset's model size: one epoch on a small generated set (the
weights do not depend on the data's size), last.pth measured twice: as written after an epoch (with the optimizer
state, what --resume needs) and as left by the finished run (without it). Prints a markdown table.

    python bench/run_folder_sizes.py --out output/run_folder_sizes            # the IEMOCAP preset, hidden 768
    python bench/run_folder_sizes.py --out output/run_folder_sizes_meld --Dataset MELD
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset  # noqa: E402
from vega_utils.runs import threads  # noqa: E402
from vega_utils.runs.config import load_preset, resolve  # noqa: E402


def sizes(folder):
    return {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def main_(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the generated data and the run (created)")
    p.add_argument("--Dataset", default="IEMOCAP", help="the preset whose sizes are measured (default IEMOCAP)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data, anchors = os.path.join(args.out, "data.pkl"), os.path.join(args.out, "anchor.pt")
    make_synthetic_dataset(data, dataset=args.Dataset, n_train=12, n_test=4, max_len=20, seed=0)
    make_synthetic_anchor_cache(anchors, dataset=args.Dataset, clip_dim=512, seed=0)
    threads.apply_threads(args.threads)
    cfg = resolve(load_preset(args.Dataset).replace(data_path=data, anchor_path=anchors, epochs=1, device="cpu",
                                                   output_dir=os.path.join(args.out, "runs"), threads=args.threads))
    during = {}

    def after_epoch(epoch, f1):   # last.pth as --save_last every writes it after each epoch
        during.update(sizes(summary_dir[0]))
    summary_dir = [os.path.join(cfg.output_dir, "run")]
    summary = main.train_run(cfg, progress=False, run_dir=summary_dir[0], on_epoch=after_epoch)
    end = sizes(summary["run_dir"])
    print(f"\n{cfg.Dataset} preset: hidden_dim {cfg.hidden_dim}, n_head {cfg.n_head}, clip_dim {cfg.clip_dim}; "
          f"run folder {summary['run_dir']}\n")
    print("| file | bytes | MB |\n|---|---|---|")
    for name, size in end.items():
        shown = "events.out.tfevents.*" if name.startswith("events.out") else name
        print(f"| `{shown}` | {size} | {size / 1e6:.1f} |")
        if name == "last.pth" and during.get(name):
            print(f"| `last.pth` after an epoch (with the optimizer state) | {during[name]} | "
                  f"{during[name] / 1e6:.1f} |")


if __name__ == "__main__":
    main_()
