"""One utterance to extract, and the checks every source shares (split, label, text, duplicate positions, and
duplicate utterance ids inside a split: a split's predictions are matched back to the rows by them).

A problem is one line naming the source row and, where there is one, the file. With on_error="skip" the
utterance is dropped and its line kept for the extraction record instead.
"""
from dataclasses import dataclass
from typing import Optional

from vega_utils.common import VegaError
from vega_utils.data.openformat import SPLITS


@dataclass
class Utterance:
    row: str                     # where it came from, for messages ("new.csv row 3")
    dialogue_id: str
    position: float              # order inside the dialogue (renumbered 0..n-1 once checked)
    speaker: str
    text: str
    audio: Optional[str] = None  # an audio file; None: the video's audio track, if any
    video: Optional[str] = None
    start: Optional[float] = None   # seconds inside the media file(s); None: from the beginning / to the end
    end: Optional[float] = None
    label: str = ""              # class name; "" = no label
    split: str = "predict"
    utterance_id: str = ""
    audio_segment: bool = True   # False: the audio file is the utterance itself (start/end are the video's)
    broken: Optional[Exception] = None   # a problem found while reading the row

    def segment(self, need):
        """(start, end) inside the file that gives the `need` (audio or video) stream."""
        whole = need == "audio" and self.audio and not self.audio_segment
        return (None, None) if whole else (self.start, self.end)

    def where(self, path=None):
        return f"{self.row}" + (f" ({path})" if path else "")


class BadUtterance(VegaError):
    """A problem of one utterance; `skip` mode drops it instead of stopping."""


def bad(u, problem, path=None):
    return BadUtterance(f"{u.where(path)}: {problem}")


class Problems:
    """Collects the dropped utterances' lines in skip mode; raises the first one otherwise."""

    def __init__(self, on_error):
        self.skip, self.lines = on_error == "skip", []

    def report(self, error):
        if not self.skip:
            raise error
        self.lines.append(str(error))


def check_fields(utterances, classes, speakers, problems):
    """The utterances whose fields are sound, in dialogue order with positions 0..n-1."""
    seen, ids, kept = set(), {}, []
    for u in utterances:
        try:
            if u.broken is not None:
                raise u.broken
            if not u.text.strip():
                raise bad(u, "empty text")
            if u.split not in SPLITS:
                raise bad(u, f"unknown split {u.split!r} (one of {', '.join(SPLITS)})")
            if u.label and classes is not None and u.label not in classes:
                raise bad(u, f"label {u.label!r} is not one of the classes ({', '.join(classes)})")
            if speakers is not None and u.speaker not in speakers:
                raise bad(u, f"speaker {u.speaker!r} is not one of the extraction's ({', '.join(speakers)})")
            key = (u.dialogue_id, u.position)
            if key in seen:
                raise bad(u, f"duplicate position {u.position:g} in dialogue {u.dialogue_id!r}")
            if u.utterance_id and (u.split, u.utterance_id) in ids:   # predictions are matched back by it
                raise bad(u, f"utterance_id {u.utterance_id!r} is also that of {ids[u.split, u.utterance_id]} "
                             f"(both in the {u.split} split); give each utterance its own id")
            seen.add(key)
            if u.utterance_id:
                ids[u.split, u.utterance_id] = u.row
        except BadUtterance as e:
            problems.report(e)
            continue
        kept.append(u)
    return renumber(kept)


def renumber(utterances):
    """Dialogues in order of first appearance, utterances by position, positions made 0..n-1."""
    by_dialogue = {}
    for u in utterances:
        by_dialogue.setdefault(u.dialogue_id, []).append(u)
    out = []
    for group in by_dialogue.values():
        group.sort(key=lambda u: u.position)
        for i, u in enumerate(group):
            u.position = i
        splits = {u.split for u in group}
        if len(splits) > 1:
            raise VegaError(f"{group[0].row}: dialogue {group[0].dialogue_id!r} has rows in several splits "
                            f"({', '.join(sorted(splits))}); a dialogue belongs to one split")
        out += group
    return out
