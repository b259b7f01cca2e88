"""Decoding through kept libraries: soundfile for audio files, PyAV for the streams inside video files, soxr
for resampling. Every failure is a BadUtterance naming the utterance's row and the file."""
import os

import numpy as np

from vega_utils.features.utterances import BadUtterance, bad

_PROBED = {}   # path -> (duration in seconds, has audio, has video), or the error text


def probe(path):
    """(duration s, has an audio stream, has a video stream) of a media file; raises OSError/ValueError."""
    if path not in _PROBED:
        _PROBED[path] = _probe(path)
    return _PROBED[path]


def _probe(path):
    import soundfile
    try:
        info = soundfile.info(path)
        return info.frames / info.samplerate, True, False
    except Exception:   # not a file libsndfile reads: try it as a container
        pass
    import av
    with av.open(path) as c:
        audio, video = bool(c.streams.audio), bool(c.streams.video)
        duration = c.duration / 1e6 if c.duration else None
        if duration is None:
            stream = (c.streams.video or c.streams.audio)[0]
            duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
    return duration, audio, video


def check_media(u, path, need):
    """Check that the file exists, opens, has the stream `need` (audio or video) and holds the segment."""
    if os.path.isdir(path):
        raise bad(u, "this is a folder, not a media file", path)
    if not os.path.isfile(path):
        raise bad(u, "file not found", path)
    try:
        duration, has_audio, has_video = probe(path)
    except Exception as e:   # libraries raise many types on damaged files
        raise bad(u, f"cannot open the file ({type(e).__name__}: {str(e).strip()[:120]})", path) from None
    if not (has_audio if need == "audio" else has_video):
        raise bad(u, f"the file has no {need} stream", path)
    start, end = u.segment(need)
    start, end = start or 0.0, duration if end is None else end
    if start < 0 or end > duration + 0.05:
        raise bad(u, f"segment {start:g}-{end:g} s lies outside the file ({duration:.3f} s)", path)
    if end < start:
        raise bad(u, f"segment {start:g}-{end:g} s ends before it starts (start and end swapped?)", path)
    if end == start:
        raise bad(u, f"segment {start:g}-{end:g} s has zero length", path)


def load_audio(u, rate):
    """Mono float32 samples of the utterance's segment at `rate` Hz, from its audio file or its video's track."""
    path = u.audio or u.video
    start, end = u.segment("audio")
    try:
        rate_of_file = _sound_file_rate(path) if u.audio else None
        if rate_of_file:                         # a sound file: only the segment is read
            samples, native = _read_wave(path, rate_of_file, start or 0.0, end)
        else:
            samples, native = _read_track(path)
            lo = int(round((start or 0.0) * native))
            samples = samples[lo:len(samples) if end is None else int(round(end * native))]
    except Exception as e:
        raise bad(u, f"cannot decode the audio ({type(e).__name__}: {str(e).strip()[:120]})", path) from None
    if samples.size == 0:
        raise bad(u, "the audio segment holds no samples", path)
    if native != rate:
        import soxr
        samples = soxr.resample(samples, native, rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _sound_file_rate(path):
    """The sample rate of a file libsndfile reads (WAV, FLAC, ...); None for anything else (a container)."""
    import soundfile
    try:
        return soundfile.info(path).samplerate
    except Exception:
        return None


def _read_wave(path, native, start, end):
    """Mono samples of [start, end) seconds (end None: to the end) of a sound file of rate `native`, and the rate."""
    import soundfile
    lo, hi = int(round(start * native)), None if end is None else int(round(end * native))
    x, native = soundfile.read(path, start=lo, stop=hi, dtype="float32", always_2d=True)   # (T, channels)
    return x.mean(axis=1), native                                                           # (T,) mono


def _read_track(path):
    """The audio track of a container as mono float samples in [-1, 1]: FFmpeg converts every sample format
    (integer PCM included) to planar float, then the channels are averaged."""
    import av
    chunks = []
    with av.open(path) as c:
        stream = c.streams.audio[0]
        native = stream.codec_context.sample_rate
        to_float = av.AudioResampler(format="fltp")                  # the sample format only: rate and layout kept
        for frame in c.decode(stream):
            for out in to_float.resample(frame):
                chunks.append(out.to_ndarray().mean(axis=0))        # (channels, T) -> (T,) mono
        for out in to_float.resample(None):                          # flush
            chunks.append(out.to_ndarray().mean(axis=0))
    if not chunks:
        raise ValueError("no audio frames decoded")
    return np.concatenate(chunks).astype(np.float32), native


HELD_FRAMES = 240   # decoded frames held at once; a longer segment is decoded twice (times first, then picks)


def load_frames(u, n):
    """n RGB frames (H, W, 3) uint8 taken evenly over the utterance's segment of its video: the frames nearest the
    middles of n equal parts. Every frame of the segment is decoded (codecs need it); only the n chosen ones are
    converted to RGB, and turned upright. A segment between two frames gets the last frame before it."""
    try:
        times, held = _segment_frames(u, keep=None)
        if not times:
            raise bad(u, "no video frame in the segment", u.video)
        end = u.end if u.end is not None else times[-1] + 1e-3
        seg_start = u.start or 0.0
        targets = seg_start + (np.arange(n) + 0.5) * (end - seg_start) / n     # the middles of n equal parts
        chosen = [int(np.abs(np.asarray(times) - t).argmin()) for t in targets]
        if held is None:                                                        # too long to hold: decode again
            _, held = _segment_frames(u, keep=set(chosen))
        rgb = {i: upright(held[i]) for i in sorted(set(chosen))}
    except BadUtterance:
        raise
    except Exception as e:
        raise bad(u, f"cannot decode the video ({type(e).__name__}: {str(e).strip()[:120]})", u.video) from None
    return [rgb[i] for i in chosen]


def upright(frame):
    """A decoded frame as RGB (H, W, 3) uint8, turned as its display matrix says (a phone's portrait video is
    stored on its side): PyAV gives the counter-clockwise angle, a multiple of 90 degrees in practice."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _segment_frames(u, keep):
    """(times, frames) of the segment's frames, in order: frames[i] (still YUV) for every i in keep, or for
    every frame when keep is None, unless there are over HELD_FRAMES of them (then frames is None)."""
    import av
    times, held, before = [], {}, None
    with av.open(u.video) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"                     # FFmpeg's own decoding threads
        start = u.start or 0.0
        if start > 0:
            c.seek(int(start / stream.time_base), stream=stream, backward=True)
        for frame in c.decode(stream):
            t = float(frame.pts * stream.time_base) if frame.pts is not None else 0.0
            if u.end is not None and t >= u.end:
                break
            if t + 1e-6 < start:
                before = (t, frame)                     # the last frame before the segment
                continue
            if held is not None and (keep is None or len(times) in keep):
                held[len(times)] = frame
                if keep is None and len(held) > HELD_FRAMES:
                    held = None
            times.append(t)
    if not times and before is not None:                # no frame inside the segment: the one just before it
        times, held = [before[0]], {0: before[1]}
    return times, held
