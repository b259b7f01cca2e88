"""A transcript made by a speech-recognition model, for a recording that has none (--transcribe MODEL): a
transformers Whisper (a local folder saved with save_pretrained, or a hub name in the local cache) reads the
recording ten minutes at a time (a progress bar counts them; Whisper itself moves through each in its 30-second
windows), each segment with its start and end, and the segments are written as a WebVTT file that is then read
like any transcript. A word that a ten-minute boundary cuts may be lost or split. Whisper does not tell
speakers apart: every cue gets the one shared speaker "unknown".

Segment times are cut to the recording: a segment that starts past its end (a model may place timestamps in
the silence padding its last window) is dropped and counted; one that ends past it ends at the recording's end.
"""
import os

import torch

from vega_utils.common import VegaError
from vega_utils.features.media import load_audio, probe
from vega_utils.features.utterances import BadUtterance, Utterance


def load_speech_model(name, device):
    from transformers import AutoProcessor, WhisperForConditionalGeneration
    try:
        processor = AutoProcessor.from_pretrained(name)
        model = WhisperForConditionalGeneration.from_pretrained(name)
    except Exception as e:   # offline and not cached, not a model folder, not a Whisper
        raise VegaError(f"could not load speech-recognition model {name!r} ({type(e).__name__}: "
                        f"{str(e).strip()[:160]}); give a Whisper folder saved with save_pretrained or a hub name "
                        f"in the local cache") from None
    return processor, model.float().to(device).eval()


def recognise(samples, rate, processor, model, device):
    """[(start s, end s, text)] of the segments Whisper finds in mono samples at `rate` Hz."""
    fe = processor.feature_extractor
    inputs = fe(samples, sampling_rate=rate, return_tensors="pt", truncation=False, padding="longest",
                return_attention_mask=True)
    if inputs.input_features.shape[-1] < fe.nb_max_frames:       # under 30 s: one window, padded to it
        inputs = fe(samples, sampling_rate=rate, return_tensors="pt", return_attention_mask=True)
    with torch.inference_mode():
        out = model.generate(inputs.input_features.to(device), attention_mask=inputs.attention_mask.to(device),
                             return_timestamps=True, return_segments=True)
    segments = []
    for s in out["segments"][0]:
        text = processor.tokenizer.decode(s["tokens"], skip_special_tokens=True)
        segments.append((float(s["start"]), float(s["end"]), " ".join(text.split())))
    return segments


STRETCH_S = 600   # seconds of a recording given to Whisper at once (memory stays small, progress shows)


def transcribe(media, name, device, out_vtt, progress=True, log=print):
    """Write the WebVTT transcript of a recording made by the model `name`; returns the number of cues."""
    import pysubs2
    from tqdm import tqdm
    video = probe_video(media)
    u = Utterance(row=f"recording {media}", dialogue_id="", position=0, speaker="", text="",
                  audio=None if video else media, video=media if video else None)
    processor, model = load_speech_model(name, device)
    rate = processor.feature_extractor.sampling_rate
    try:
        samples = load_audio(u, rate)
    except BadUtterance as e:
        raise VegaError(str(e)) from None
    duration = min(samples.size / rate, probe(media)[0] or samples.size / rate)   # the container's length
    log(f"transcribing {media} ({duration:.1f} s) with {name}")
    subs, past = pysubs2.SSAFile(), 0
    found = []
    for lo in tqdm(range(0, samples.size, STRETCH_S * rate), desc="transcribing", unit="10 min", disable=not progress):
        found += [(a + lo / rate, b + lo / rate, text)
                  for a, b, text in recognise(samples[lo:lo + STRETCH_S * rate], rate, processor, model, device)]
    for start, end, text in found:
        if start >= duration or not text:
            past += start >= duration
            continue
        subs.append(pysubs2.SSAEvent(start=int(round(start * 1000)),
                                     end=int(round(min(max(end, start), duration) * 1000)), text=text))
    if past:
        log(f"transcribing {media}: {past} segment(s) placed past the end of the recording were dropped")
    if not len(subs):
        raise VegaError(f"recording {media}: the speech-recognition model {name!r} found no speech in it")
    os.makedirs(os.path.dirname(os.path.abspath(out_vtt)), exist_ok=True)
    subs.save(out_vtt, format_="vtt")
    return len(subs)


def probe_video(media):
    """True when the file has a video stream (its audio is then its track); one line if it cannot be read."""
    if not os.path.isfile(media):
        raise VegaError(f"recording {media} not found")
    try:
        return probe(media)[2]
    except Exception as e:
        raise VegaError(f"recording {media}: cannot open it ({type(e).__name__}: {str(e).strip()[:120]})") from None



def transcribe_all(media, name, folder, device, progress=True, log=print):
    """Transcribe a recording, or every recording of a folder, into folder/NAME.vtt; a transcript already there
    is kept (an earlier run's, perhaps corrected by hand). Returns what --transcript would be: the file, or the
    folder."""
    from vega_utils.features.transcripts import EXTENSIONS
    paths = [media] if not os.path.isdir(media) else [
        os.path.join(media, f) for f in sorted(os.listdir(media)) if not f.startswith(".")
        and os.path.isfile(os.path.join(media, f)) and not f.lower().endswith(EXTENSIONS)]
    for path in paths:
        vtt = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + ".vtt")
        if os.path.isfile(vtt):
            log(f"transcript {vtt} is there already: it is used as it is")
        else:
            transcribe(path, name, device, vtt, progress, log)
    return folder if os.path.isdir(media) else vtt
