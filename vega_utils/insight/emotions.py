"""A recording's emotions as files (inference.py --media): `predictions.csv` (one row per utterance with its
times, speaker, text, predicted emotion and every class probability) and the transcript again as subtitles
(`emotions.vtt`, `emotions.srt`) with each cue's predicted emotion and its probability before its text, so
the recording plays in a video player with its emotions on screen."""
import csv
import io

from vega_utils.common import atomic_write_text


def emotion_rows(cues, utterance_ids, probs, class_names):
    """One dict per predicted utterance, in recording and time order. cues: {utterance_id: Utterance} as the
    transcript gave them; probs: (n, C) class probabilities in the order of utterance_ids."""
    rows = []
    for uid, p in zip(utterance_ids, probs):
        u = cues[uid]
        best = int(p.argmax())
        rows.append({"dialogue_id": u.dialogue_id, "utterance_id": uid, "start": u.start, "end": u.end,
                     "speaker": u.speaker, "text": u.text, "emotion": class_names[best],
                     "probability": float(p[best]), "probs": [float(x) for x in p]})
    rows.sort(key=lambda r: (r["dialogue_id"], r["start"], r["end"]))
    return rows


def write_predictions(path, rows, class_names):
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["dialogue_id", "utterance_id", "start", "end", "speaker", "text", "emotion"]
               + [f"p_{c}" for c in class_names])
    for r in rows:
        w.writerow([r["dialogue_id"], r["utterance_id"], f"{r['start']:.3f}", f"{r['end']:.3f}", r["speaker"],
                    r["text"], r["emotion"]] + [f"{x:.6f}" for x in r["probs"]])
    atomic_write_text(path, out.getvalue())


def cue_text(r, unknown="unknown"):
    """`[joy 82%] Ann: the text` (the speaker left out when the transcript named none)."""
    who = "" if r["speaker"] == unknown else f"{r['speaker']}: "
    return f"[{r['emotion']} {100 * r['probability']:.0f}%] {who}{r['text']}"


def write_subtitles(path, rows, format_):
    """The rows as a subtitle file (format_ 'vtt' or 'srt'), one cue per utterance at its original times."""
    import pysubs2
    subs = pysubs2.SSAFile()
    for r in rows:
        text = cue_text(r).replace("{", "(").replace("}", ")")   # braces would read as styling codes
        subs.append(pysubs2.SSAEvent(start=int(round(r["start"] * 1000)), end=int(round(r["end"] * 1000)),
                                     text=text))
    atomic_write_text(path, subs.to_string(format_))


def write_recording(out, cues, utterance_ids, probs, class_names, folder=False):
    """predictions.csv, and per recording its subtitles and timeline: emotions.vtt, emotions.srt, timeline.png
    for one recording, NAME.emotions.vtt, NAME.emotions.srt, NAME.timeline.png for each of a folder of them
    (folder True). Returns the paths written."""
    import os

    from vega_utils.insight.timeline import draw_timeline
    rows = emotion_rows(cues, utterance_ids, probs, class_names)
    written = [os.path.join(out, "predictions.csv")]
    write_predictions(written[0], rows, class_names)
    recordings = list(dict.fromkeys(r["dialogue_id"] for r in rows))
    for name in recordings:
        mine = [r for r in rows if r["dialogue_id"] == name]
        prefix = os.path.join(out, f"{name}." if folder else "")
        for format_ in ("vtt", "srt"):
            written.append(f"{prefix}emotions.{format_}")
            write_subtitles(written[-1], mine, format_)
        written.append(f"{prefix}timeline.png")
        draw_timeline(written[-1], mine, class_names, name)
    return written
