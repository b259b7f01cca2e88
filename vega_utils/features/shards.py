"""Resumable work: every finished shard (one modality, one chunk of utterances) is written atomically under
OUT.npz.parts/, beside a plan.json saying which extraction they belong to and what each shard read (a hash of its
utterances and the size and time of their media files). Run the same command again after an interruption
(Ctrl-C, kill -9) and the shards already there are read, not computed again; a shard whose utterances or files
changed since (a damaged file repaired) is computed again, alone. The folder is removed once OUT.npz is written.
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
        """plan: {"extractors": ..., "shard_size": n, "shards": {modality: [what shard k reads, a hash]}}."""
        self.folder = f"{out_path}.parts"
        self.saved = 0
        plan_path = os.path.join(self.folder, "plan.json")
        if os.path.exists(plan_path):
            with open(plan_path) as f:
                old = json.load(f)
            if {k: v for k, v in old.items() if k != "shards"} != {k: v for k, v in plan.items() if k != "shards"} \
                    or not isinstance(old.get("shards"), dict):
                raise VegaError(f"{self.folder} holds the shards of another extraction (other models, settings "
                                f"or shard size); remove that folder, or write to another --out")
            kept, redone = self.keep_matching(old["shards"], plan["shards"])
            print(f"resuming: {kept} finished shard(s) in {self.folder} are kept"
                  + (f", {redone} whose utterances or media files changed are computed again" if redone else ""))
        else:
            os.makedirs(self.folder, exist_ok=True)
        atomic_write_text(plan_path, json.dumps(plan, sort_keys=True, indent=1))

    def keep_matching(self, old, new):
        """Remove the shards that read other utterances or files than the plan's; (kept, removed) counts."""
        kept = redone = 0
        for modality, hashes in new.items():
            for k, h in enumerate(hashes):
                if not self.done(modality, k):
                    continue
                if k < len(old.get(modality, [])) and old[modality][k] == h:
                    kept += 1
                else:
                    os.remove(self.path(modality, k))
                    redone += 1
        return kept, redone

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
