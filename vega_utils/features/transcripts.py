"""Transcripts as input: a recording and its subtitles (SRT, WebVTT, ASS/SSA, read by pysubs2) become one
dialogue whose utterances are the cues, each with its start and end in the recording.

    text      the cue's plain text: pysubs2 drops the styling (bold, italics, colours, ASS overrides); what it
              leaves (WebVTT karaoke times, HTML entities) is removed here, line breaks become spaces
    speaker   a WebVTT voice tag (<v Name>), else a leading "Name:" of the cue, else an ASS cue's name field,
              else the shared speaker "unknown" (counted)
    dialogue  the recording's file name without its extension; utterance ids are DIALOGUE_cueN (N counts the
              file's cues from 1, empty ones included, so N points into the file)

Empty cues are dropped and counted. A cue that ends past the end of the recording, a cue that starts before the
previous cue of the same named speaker has ended, and a transcript in no known format each give one line naming
the file and the cue; like every problem of an utterance, it stops the extraction, or with --on_error skip
drops the cue (or the recording) and is listed in the record.
"""
import html
import os
import re
from collections import Counter

from vega_utils.common import VegaError
from vega_utils.features.media import probe
from vega_utils.features.utterances import BadUtterance, Utterance, bad

FORMATS = {"srt": "SRT", "vtt": "WebVTT", "ass": "ASS", "ssa": "SSA"}
EXTENSIONS = tuple(f".{f}" for f in FORMATS)
UNKNOWN_SPEAKER = "unknown"

VOICE = re.compile(r"^\s*<v(?:\.[^\s>]*)?\s+([^>]+)>")        # <v Name> or <v.class Name> opening a cue
NAME_PREFIX = re.compile(r"^\s*([^\W\d_][\w.'-]*(?: [\w.'-]+){0,2}):\s+(?=\S)")   # "Name:" of up to 3 words
LEFT_TAGS = re.compile(r"<[^>]*>")                             # tags pysubs2 keeps (karaoke times, voices)


class Counts(Counter):
    """cues read, empty cues dropped, cues without a speaker, recordings read."""

    def describe(self):
        line = (f"transcripts: {self['recordings']} recording(s), {self['cues']} cues; {self['empty']} empty "
                f"cue(s) dropped")
        if self["unknown_speaker"]:
            line += (f"; {self['unknown_speaker']} cue(s) name no speaker and share the speaker "
                     f"{UNKNOWN_SPEAKER!r}")
        return line


def load_subtitles(path):
    """The pysubs2 file of a transcript; one line naming the file when it is in no known format."""
    import pysubs2
    last = None
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            subs = pysubs2.load(path, encoding=encoding, keep_unknown_html_tags=True)
            break
        except UnicodeDecodeError as e:
            last = e
        except pysubs2.exceptions.FormatAutodetectionError:
            raise VegaError(f"transcript {path}: not in a known format (one of {', '.join(FORMATS.values())})") \
                from None
        except Exception as e:   # pysubs2 raises several types on damaged files
            raise VegaError(f"transcript {path}: cannot read it ({type(e).__name__}: {str(e).strip()[:120]})") \
                from None
    else:
        raise VegaError(f"transcript {path}: cannot read it as UTF-8 or cp1252 ({last})")
    if subs.format not in FORMATS:
        raise VegaError(f"transcript {path}: read as {subs.format}, which is not one of "
                        f"{', '.join(FORMATS.values())}")
    return subs


def cue_speaker_and_text(event):
    """(speaker or None, clean text) of a pysubs2 event."""
    raw = event.plaintext
    speaker = None
    voice = VOICE.match(raw)
    if voice:
        speaker, raw = voice.group(1).strip(), raw[voice.end():]
    text = " ".join(html.unescape(LEFT_TAGS.sub("", raw)).split())
    prefix = NAME_PREFIX.match(text)
    if prefix and speaker is None:
        speaker, text = prefix.group(1).strip(), text[prefix.end():]
    if speaker is None and event.name.strip():
        speaker = event.name.strip()
    return speaker, text


def read_transcript(media, transcript, counts):
    """The utterances of one recording (a video, or an audio file) and its transcript, in the order of their
    start. A transcript in no known format gives one broken utterance, which the checks report."""
    stem = os.path.splitext(os.path.basename(media))[0]
    try:
        subs = load_subtitles(transcript)
    except VegaError as e:
        return [Utterance(row=f"transcript {transcript}", dialogue_id=stem, position=0, speaker="", text="",
                          broken=bad_file(str(e)))]
    counts["recordings"] += 1
    is_audio = not has_video(media)
    utterances = []
    for n, event in enumerate((e for e in subs if not e.is_comment), start=1):
        counts["cues"] += 1
        speaker, text = cue_speaker_and_text(event)
        if not text:
            counts["empty"] += 1
            continue
        if speaker is None:
            counts["unknown_speaker"] += 1
        u = Utterance(row=f"{transcript} cue {n} ({event.start / 1000:.3f}-{event.end / 1000:.3f} s)",
                      dialogue_id=stem, position=0, speaker=speaker or UNKNOWN_SPEAKER,
                      text=text, audio=media if is_audio else None, video=None if is_audio else media,
                      start=event.start / 1000, end=event.end / 1000, utterance_id=f"{stem}_cue{n}")
        utterances.append(u)
    utterances.sort(key=lambda u: u.start)          # stable: cues starting together keep the file's order
    for position, u in enumerate(utterances):
        u.position = position
    check_cues(utterances, media)
    return utterances


def bad_file(line):
    return BadUtterance(line)


def has_video(media):
    try:
        return probe(media)[2]
    except Exception:   # an unreadable file: the media checks name it
        return True


def check_cues(utterances, media):
    """Mark a cue that ends past the recording's end, or overlaps the previous cue of the same named speaker."""
    try:
        duration = probe(media)[0]
    except Exception:   # a missing or unreadable file: the media checks name it, cue by cue
        duration = None
    open_until = {}
    for u in utterances:
        if duration is not None and u.end > duration + 0.05:
            u.broken = bad(u, f"the cue ends at {u.end:.3f} s, past the end of the recording ({duration:.3f} s)",
                           media)
            continue
        if u.speaker != UNKNOWN_SPEAKER:
            previous = open_until.get(u.speaker)
            if previous is not None and u.start < previous[0]:
                u.broken = bad(u, f"the cue starts before the previous cue of {u.speaker!r} ends ({previous[1]} "
                                  f"ends at {previous[0]:.3f} s): one speaker's cues must not overlap")
                continue
            open_until[u.speaker] = (u.end, "cue " + u.utterance_id.rsplit("_cue", 1)[1])


def pair_folders(media_dir, transcript_dir):
    """[(recording, its transcript or the problem's line)] of two folders: every file of media_dir that is not
    a transcript is a recording; its transcript is the file of transcript_dir with the same stem."""
    def listing(folder):
        return sorted(f for f in os.listdir(folder) if not f.startswith(".")
                      and os.path.isfile(os.path.join(folder, f)))
    transcripts = {}
    for f in listing(transcript_dir):
        if f.lower().endswith(EXTENSIONS):
            transcripts.setdefault(os.path.splitext(f)[0], []).append(os.path.join(transcript_dir, f))
    pairs = []
    for f in listing(media_dir):
        if f.lower().endswith(EXTENSIONS):
            continue
        stem, media = os.path.splitext(f)[0], os.path.join(media_dir, f)
        found = transcripts.get(stem, [])
        if len(found) == 1:
            pairs.append((media, found[0]))
        else:
            pairs.append((media, f"recording {media}: " + (
                f"no transcript {stem}.srt, .vtt, .ass or .ssa in {transcript_dir}" if not found else
                f"several transcripts share its name ({', '.join(os.path.basename(p) for p in found)})")))
    if not pairs:
        raise VegaError(f"--media {media_dir}: no recording in the folder")
    return pairs


def read_recordings(media, transcript):
    """(utterances, counts) of --media FILE --transcript FILE, or of two folders matched by file stem."""
    counts = Counts()
    if os.path.isdir(media) != os.path.isdir(transcript):
        raise VegaError("--media and --transcript are two files or two folders")
    if not os.path.isdir(media):
        for path, what in ((media, "recording"), (transcript, "transcript")):
            if not os.path.isfile(path):
                raise VegaError(f"{what} {path} not found")
        return read_transcript(media, transcript, counts), counts
    utterances = []
    for recording, found in pair_folders(media, transcript):
        if found.startswith("recording "):   # no transcript of its own: one broken utterance reports it
            stem = os.path.splitext(os.path.basename(recording))[0]
            utterances.append(Utterance(row=f"recording {recording}", dialogue_id=stem, position=0, speaker="",
                                        text="", broken=bad_file(found)))
            continue
        utterances += read_transcript(recording, found, counts)
    return utterances, counts
