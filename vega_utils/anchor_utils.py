"""VEGA's visual anchors: per-class banks of L2-normalised CLIP image features and their centres."""
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AnchorBank:
    centers: torch.Tensor   # (C, K): mean of each class's normalised features (not re-normalised)
    banks: list             # C tensors (n_c, K): normalised image features of class c

    @property
    def clip_dim(self):
        return self.centers.shape[1]

    def to(self, device):
        return AnchorBank(self.centers.to(device), [b.to(device) for b in self.banks])

    def pick(self, training, rand, rng=random):
        """The (C, K) anchors of one forward pass, L2-normalised (spec 2.2).

        Training: with probability `rand` one uniformly drawn image per class, otherwise the centres.
        Evaluation always uses the centres (the reference also draws there; see README).
        """
        if training and rng.random() < rand:
            chosen = torch.stack([b[rng.randrange(b.shape[0])] for b in self.banks])  # (C, K)
        else:
            chosen = self.centers
        return F.normalize(chosen.float(), dim=-1)

    @classmethod
    def from_reference_dict(cls, d, class_names):
        """From the cache layout {"anchor_center": (C, K), "anchor_img_dict": {label: {"feature": (n, K)}}}."""
        return cls(d["anchor_center"].float().cpu(),
                   [d["anchor_img_dict"][c]["feature"].float().cpu() for c in class_names])

    def to_reference_dict(self, class_names):
        return {"anchor_center": self.centers.clone(),
                "anchor_img_dict": {c: {"feature": b.clone()} for c, b in zip(class_names, self.banks)}}
