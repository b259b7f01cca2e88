"""Audio features of an utterance's segment, decoded and resampled by media.py.

    is10      the 1582 INTERSPEECH 2010 paralinguistic functionals (openSMILE's IS10_paraling_compat.conf,
              shipped inside the opensmile wheel; the feature set of the published IEMOCAP audio features)
    egemaps   the 88 eGeMAPS v02 functionals
    compare   the 6373 ComParE 2016 functionals
    hf:MODEL  a transformers speech encoder (wav2vec2, HuBERT, WavLM: a hub name or a local folder), its last
              hidden layer averaged over the utterance's own frames (no padding enters the average). Batched
              (--batch_size, longest first, zero-padded with an attention mask) when its feature extractor
              returns attention masks; otherwise one utterance at a time, as padding would change the features
openSMILE sets run in --jobs worker processes (decoding too); an hf encoder runs in this process. The workers
ignore Ctrl-C (the process that started them answers it and ends them), so an interrupt prints no trace per
worker and leaves none behind.
"""
import os
import signal
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import active_children, get_context

import numpy as np
import torch

from vega_utils.common import VegaError
from vega_utils.features.hub import reason
from vega_utils.features.media import load_audio
from vega_utils.features.record import weights_sha256
from vega_utils.features.utterances import BadUtterance, bad

SETS = ("is10", "egemaps", "compare")
# Memory openSMILE holds while it computes one utterance's functionals, in MB per second of audio at 16 kHz
# (measured: peak resident memory over 30 s and 120 s of noise, openSMILE 2.5 on x86-64). A set's functionals
# are taken over the whole segment at once: cutting it into windows would give other features.
MB_PER_SECOND = {"is10": 3.3, "egemaps": 0.6, "compare": 0.75}
ANNOUNCED_MB = 1024


def smile_config(name):
    """The opensmile feature_set argument of a set name: an enum member or a config file in the wheel."""
    import opensmile
    if name == "is10":
        return os.path.join(os.path.dirname(opensmile.__file__), "core", "config", "is09-13",
                            "IS10_paraling_compat.conf")
    return {"egemaps": opensmile.FeatureSet.eGeMAPSv02, "compare": opensmile.FeatureSet.ComParE_2016}[name]


def make_smile(name):
    import opensmile
    return opensmile.Smile(feature_set=smile_config(name), feature_level=opensmile.FeatureLevel.Functionals)


def memory_note(utterances, kind, rate, jobs, duration_of):
    """A `note:` line when an utterance's audio is long enough for openSMILE to hold over ANNOUNCED_MB MB at once,
    naming the longest; '' otherwise. duration_of(u): seconds of the utterance's audio segment."""
    if kind not in MB_PER_SECOND:
        return ""
    per_second = MB_PER_SECOND[kind] * rate / 16000
    seconds = [(duration_of(u), u) for u in utterances]
    long = [(s, u) for s, u in seconds if s * per_second > ANNOUNCED_MB]
    if not long:
        return ""
    s, u = max(long, key=lambda x: x[0])
    path = u.audio or u.video
    return (f"note: {len(long)} utterance(s) hold long audio, the longest {u.where(path)} with {s / 60:.1f} min; "
            f"openSMILE's {kind} holds about {per_second:.1f} MB per second of an utterance in memory, so about "
            f"{s * per_second / 1024:.1f} GB for it (--jobs {jobs}: up to {jobs} at once); to use less, cut long "
            f"recordings into utterances (start, end)")


_WORKER = {}   # the Smile of this worker process


def _ignore_interrupts():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _smile_job(job):
    """(features or None, the problem or None) of one utterance, in a worker process."""
    u, name, rate = job
    if name not in _WORKER:
        _WORKER[name] = make_smile(name)
    try:
        x = load_audio(u, rate)
    except BadUtterance as e:
        return None, str(e)
    with warnings.catch_warnings():   # "segment too short": the NaN it gives is reported as the row's problem
        warnings.simplefilter("ignore", UserWarning)
        return _WORKER[name].process_signal(x, rate).to_numpy()[0].astype(np.float32), None


class AudioExtractor:
    def __init__(self, kind, rate, jobs, device, batch_size=1):
        self.kind, self.rate, self.jobs, self.device, self.batch_size = kind, rate, jobs, device, batch_size
        if kind.startswith("hf:"):
            self.model_name = kind[3:]
            self.processor, self.model = load_speech_model(self.model_name, device)
            self.dim = int(self.model.config.hidden_size)
        elif kind in SETS:
            self.dim = make_smile(kind).process_signal(np.zeros(rate, dtype=np.float32), rate).shape[1]
        else:
            raise VegaError(f"unknown --audio {kind!r}: one of {', '.join(SETS)} or hf:MODEL")
        self.pool = None

    def describe(self):
        if self.kind.startswith("hf:"):
            return {"model": self.model_name, "weights_sha256": weights_sha256(self.model_name),
                    "pooling": "mean over time", "sample_rate": self.rate, "dim": self.dim}
        return {"set": self.kind, "config": os.path.basename(str(smile_config(self.kind))),
                "sample_rate": self.rate, "dim": self.dim}

    def features(self, utterances):
        """[(features or None, problem or None)] per utterance."""
        if self.kind.startswith("hf:"):
            return self.hf_features(utterances)
        jobs = [(u, self.kind, self.rate) for u in utterances]
        if self.jobs <= 1:
            return [_smile_job(j) for j in jobs]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=_ignore_interrupts)
        # Workers start while Ctrl-C is ignored here, so they ignore it from their first instruction (Python keeps
        # an inherited 'ignore'); the map submits every job, and so starts the workers, before it returns.
        main = threading.current_thread() is threading.main_thread()   # only it may set a signal's handler
        answer = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            results = self.pool.map(_smile_job, jobs)
        finally:
            if main:
                signal.signal(signal.SIGINT, answer)
        return list(results)

    def batches(self):
        """True when the encoder takes zero-padded batches with an attention mask without changing the frames
        that hold the utterance (the feature extractor returns attention masks, as for wav2vec2-lv60, HuBERT
        and WavLM); models whose feature encoder normalises over time (wav2vec2-base) run one at a time."""
        return (bool(getattr(self.processor, "return_attention_mask", False)) and self.batch_size > 1
                and hasattr(self.model, "_get_feat_extract_output_lengths"))

    def hf_features(self, utterances):
        out, decoded = [None] * len(utterances), []
        for i, u in enumerate(utterances):
            try:
                x = load_audio(u, self.rate)
                if self.frames_of(x.size) < 1:
                    raise bad(u, f"the audio segment ({x.size} samples at {self.rate} Hz) is shorter than one frame "
                                 f"of {self.model_name}", u.audio or u.video)
                decoded.append((i, x))
            except BadUtterance as e:
                out[i] = (None, str(e))
        size = self.batch_size if self.batches() else 1
        decoded.sort(key=lambda d: -d[1].size)                              # longest first: little padding
        for lo in range(0, len(decoded), size):
            chunk = decoded[lo:lo + size]
            for (i, _), x in zip(chunk, self.hf_batch([x for _, x in chunk])):
                out[i] = (x, None)
        return out

    def frames_of(self, n):
        """Frames the encoder makes of n samples (its convolutions' output length); n when it does not say."""
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            return n
        return int(self.model._get_feat_extract_output_lengths(torch.tensor([n]))[0])

    def hf_batch(self, samples):
        """Mean of the last hidden layer over each utterance's own frames, for a batch of sample arrays."""
        if len(samples) == 1:
            inputs = self.processor(samples[0], sampling_rate=self.rate, return_tensors="pt")
        else:
            inputs = self.processor(samples, sampling_rate=self.rate, padding=True, return_attention_mask=True,
                                    return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).last_hidden_state.float().cpu()
        if len(samples) == 1:
            return [hidden[0].mean(0).numpy()]                                  # (1, T, D) -> (D,)
        frames = self.model._get_feat_extract_output_lengths(torch.tensor([x.size for x in samples]))
        return [hidden[b, :int(n)].mean(0).numpy() for b, n in enumerate(frames)]   # (B, T, D) -> B x (D,)

    def close(self, now=False):
        """Wait for the workers to finish; now=True (an interrupt, an error): drop the queued jobs and end them."""
        if self.pool is None:
            return
        if not now:
            self.pool.shutdown()
            return
        self.pool.shutdown(wait=False, cancel_futures=True)
        for worker in active_children():
            worker.terminate()
        for worker in active_children():
            worker.join(5)
            if worker.is_alive():
                worker.kill()
                worker.join(5)


def load_speech_model(name, device):
    from transformers import AutoFeatureExtractor, AutoModel
    try:
        return AutoFeatureExtractor.from_pretrained(name), AutoModel.from_pretrained(name).float().to(device).eval()
    except Exception as e:
        raise VegaError(f"could not load speech model {name!r} ({reason(e)}); "
                        f"give a local folder saved with save_pretrained (model and feature extractor)") from None
