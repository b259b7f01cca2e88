"""Resumable work: every finished shard (one modality, one chunk of utterances) is written atomically under
OUT.npz.parts/, beside a plan.json saying which extraction they belong to. Run the same command again after
an interruption (Ctrl-C, kill -9) and the shards already there are read, not computed again; the folder is
removed once OUT.npz is written.
"""
import json
import os
import shutil
import signal

import numpy as np

from vega_utils.common import VegaError, _atomic_write, atomic_write_text

# For tests of resuming: kill this process (SIGKILL, nothing cleaned up) once this many shards are written.
KILL_AFTER = "VEGA_EXTRACT_KILL_AFTER_SHARDS"


class Parts:
    def __init__(self, out_path, plan):
        self.folder = f"{out_path}.parts"
        self.saved = 0
        plan_path = os.path.join(self.folder, "plan.json")
        text = json.dumps(plan, sort_keys=True, indent=1)
        if os.path.exists(plan_path):
            with open(plan_path) as f:
                if f.read() != text:
                    raise VegaError(f"{self.folder} holds the shards of another extraction (other models, "
                                    f"settings, utterances or media files); remove that folder, or "
                                    f"write to another --out")
            print(f"resuming: the finished shards in {self.folder} are kept")
        else:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write_text(plan_path, text)

    def path(self, modality, k):
        return os.path.join(self.folder, f"{modality}-{k:05d}.npz")

    def done(self, modality, k):
        return os.path.exists(self.path(modality, k))

    def save(self, modality, k, features, problems, count):
        """features (n, D) float32, problems (n,) str ('' = fine), count: the shard's truncations / fallbacks."""
        arrays = {"features": features.astype(np.float32), "problems": np.asarray(problems, dtype=str),
                  "count": np.asarray(count, dtype=np.int64)}
        _atomic_write(self.path(modality, k), lambda f: np.savez(f, **arrays), "wb")
        self.saved += 1
        if os.environ.get(KILL_AFTER) and self.saved >= int(os.environ[KILL_AFTER]):
            os.kill(os.getpid(), signal.SIGKILL)

    def load(self, modality, k):
        with np.load(self.path(modality, k), allow_pickle=False) as z:
            return z["features"], z["problems"].tolist(), int(z["count"])

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)
