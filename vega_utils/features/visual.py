"""Visual features of --frames frames taken evenly over the utterance's segment, averaged per utterance, from
--visual_model:
    a CLIP model   its image features, L2-normalised: the anchors' encoder (anchors/images.py: load_clip and
                   image_features, one function for both);
    any other transformers vision model (AutoImageProcessor + AutoModel; a ViT fine-tuned on facial
                   expressions, say)   its pooled output, or the mean of its last hidden state where it has no
                   pooler or its checkpoint holds no pooler weights (a classification checkpoint: transformers
                   would fill that pooler with random weights).

With --faces, each frame is cropped to its largest face found by OpenCV's bundled frontal-face Haar cascade
(offline, cv2.data.haarcascades; OpenCV 4 only: OpenCV 5 ships no Haar cascades, and --faces then stops with
a line saying so); a frame without a face is used whole, and counted.
"""
import os

import numpy as np
import torch
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


def model_type(name):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name).model_type
    except Exception as e:   # offline and not cached, not a model folder, ...
        raise VegaError(f"could not load visual model {name!r} ({type(e).__name__}: {str(e).strip()[:160]}); give "
                        f"a local folder saved with save_pretrained or a hub name in the local cache") from None


def load_vision_model(name, device):
    """(AutoModel in eval mode, its AutoImageProcessor, whether its pooled output is read)."""
    from transformers import AutoImageProcessor, AutoModel
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the missing pooler of a classification checkpoint is handled below
    try:
        model, info = AutoModel.from_pretrained(name, output_loading_info=True)
        processor = AutoImageProcessor.from_pretrained(name)
    except Exception as e:
        raise VegaError(f"could not load visual model {name!r} with its image processor ({type(e).__name__}: "
                        f"{str(e).strip()[:160]})") from None
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if missing:
        raise VegaError(f"visual model {name!r}: its checkpoint lacks weights of the model ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}), which would be random")
    pooled = not any(k.startswith("pooler.") for k in info["missing_keys"])
    return model.float().to(device).eval(), processor, pooled


class VisualExtractor:
    def __init__(self, name, frames, faces, batch_size, device):
        self.name, self.frames, self.batch_size, self.device = name, frames, batch_size, device
        self.clip = model_type(name) == "clip"
        if self.clip:
            self.model, self.processor = load_clip(name, device)
            self.dim = int(self.model.config.projection_dim)
        else:
            self.model, self.processor, self.pooled = load_vision_model(name, device)
            out = self.forward([Image.new("RGB", (64, 64))])
            self.pooled = self.pooled and getattr(out, "pooler_output", None) is not None
            self.dim = int(self.encode([Image.new("RGB", (64, 64))]).shape[1])
        self.faces = FaceCropper() if faces else None

    def describe(self):
        pooling = ("mean of L2-normalised frame features" if self.clip else
                   f"mean over frames of its {'pooled output' if self.pooled else 'last hidden state averaged'}")
        return {"model": self.name, "weights_sha256": weights_sha256(self.name), "frames": self.frames,
                "faces": self.faces is not None, "pooling": pooling, "dim": self.dim}

    def encode(self, frames):
        """(n_frames, K) features of PIL frames."""
        if self.clip:
            return image_features(self.model, self.processor(images=frames, return_tensors="pt")["pixel_values"],
                                  self.device)
        out = self.forward(frames)
        if self.pooled:
            return out.pooler_output.flatten(1).float().cpu()               # (n, K, 1, 1) of a CNN -> (n, K)
        hidden = out.last_hidden_state                                       # (n, L, K), or (n, K, H, W) of a CNN
        return (hidden.mean(1) if hidden.dim() == 3 else hidden.mean((2, 3))).float().cpu()

    def forward(self, frames):
        pixels = self.processor(images=frames, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return self.model(pixel_values=pixels.to(self.device))

    def features(self, utterances):
        """[(features or None, problem or None)] per utterance; batch_size utterances' frames per forward."""
        out = []
        for lo in range(0, len(utterances), self.batch_size):
            decoded = [self.decode(u) for u in utterances[lo:lo + self.batch_size]]
            frames = [f for d in decoded if isinstance(d, list) for f in d]
            if frames:
                feats = self.encode(frames).numpy()                                     # (n_frames, K)
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
