"""Visual features: the CLIP image encoder of the anchors (anchors/images.py: load_clip and image_features, one
function for both), on --frames frames taken evenly over the utterance's segment, averaged per utterance.

With --faces, each frame is cropped to its largest face found by OpenCV's bundled frontal-face Haar cascade
(offline, cv2.data.haarcascades; OpenCV 4 only: OpenCV 5 ships no Haar cascades, and --faces then stops with
a line saying so); a frame without a face is used whole, and counted.
"""
import os

import numpy as np
from PIL import Image

from vega_utils.anchors.images import image_features, load_clip
from vega_utils.common import VegaError
from vega_utils.features.media import load_frames
from vega_utils.features.record import weights_sha256
from vega_utils.features.utterances import BadUtterance

CASCADE = "haarcascade_frontalface_default.xml"


class FaceCropper:
    def __init__(self):
        import cv2
        self.cv2 = cv2
        path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), CASCADE)
        if not hasattr(cv2, "CascadeClassifier") or not os.path.isfile(path):
            raise VegaError(f"--faces needs OpenCV's Haar cascades, which OpenCV {cv2.__version__} does not ship "
                            f"(they left the main package in OpenCV 5): install opencv-python-headless>=4.8,<5 "
                            f"(requirements.txt), or leave out --faces")
        self.cascade = cv2.CascadeClassifier(path)
        self.fallbacks = 0

    def __call__(self, frame):
        gray = self.cv2.cvtColor(frame, self.cv2.COLOR_RGB2GRAY)
        faces = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5)
        if len(faces) == 0:
            self.fallbacks += 1
            return frame
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
        return frame[y:y + h, x:x + w]


class VisualExtractor:
    def __init__(self, name, frames, faces, batch_size, device):
        self.name, self.frames, self.batch_size, self.device = name, frames, batch_size, device
        self.model, self.processor = load_clip(name, device)
        self.dim = int(self.model.config.projection_dim)
        self.faces = FaceCropper() if faces else None

    def describe(self):
        return {"model": self.name, "weights_sha256": weights_sha256(self.name), "frames": self.frames,
                "faces": self.faces is not None, "pooling": "mean of L2-normalised frame features",
                "dim": self.dim}

    def features(self, utterances):
        """[(features or None, problem or None)] per utterance; batch_size utterances' frames per forward."""
        out = []
        for lo in range(0, len(utterances), self.batch_size):
            decoded = [self.decode(u) for u in utterances[lo:lo + self.batch_size]]
            frames = [f for d in decoded if isinstance(d, list) for f in d]
            if frames:
                pixels = self.processor(images=frames, return_tensors="pt")["pixel_values"]
                feats = image_features(self.model, pixels, self.device).numpy()         # (n_frames, K)
            k = 0
            for d in decoded:
                if isinstance(d, str):
                    out.append((None, d))
                    continue
                out.append((feats[k:k + len(d)].mean(axis=0), None))                  # (frames, K) -> (K,)
                k += len(d)
        return out

    def decode(self, u):
        """The utterance's frames as PIL images, or the problem's line."""
        try:
            frames = load_frames(u, self.frames)
        except BadUtterance as e:
            return str(e)
        if self.faces is not None:
            frames = [self.faces(f) for f in frames]
        return [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
