"""Every place a page or a message sends the reader exists in a clone of the project: files named in the docs and
in the code's strings (messages, help texts, docstrings), the sections they name ("docs/anchors.md, 'CLIP
offline'", "docs/method.md, section 2.3"), and the targets and anchors of the docs' links. Nothing points outside
the project (`../shared`)."""
import ast
import os
import re

import pytest
from conftest import ROOT

SKIP_DIRS = {".git", ".venv", "output", "demo", "mydata", "__pycache__", ".pytest_cache", "fixtures", "node_modules"}
FILE = r"(?:[\w.-]+/)*[\w.-]+\.(?:md|py)"
SECTION = re.compile(r"(" + FILE + r"|README)(?:,)?\s+(?:section\s+)?[\"'“]([^\"'”\n]{2,60})[\"'”]")
NUMBERED = re.compile(r"(" + FILE + r"),? section (\d+(?:\.\d+)?)")
PATH = re.compile(r"(?<![\w./-])((?:docs|bench|configs|tests|vega_utils|fast|data|anchor)/(?:[\w.-]+/)*[\w.-]+"
                  r"\.(?:md|py))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def project_files(suffix):
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for f in files:
            if f.endswith(suffix):
                yield os.path.relpath(os.path.join(folder, f), ROOT)


def strings_of(path):
    """The string constants of a Python file; an f-string's literal parts joined, '{}' for each value."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    inner = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner:
            yield node.value


def texts():
    """(where, text) of every page, and of every string in the code outside tests/."""
    for path in project_files(".md"):
        yield path, open(os.path.join(ROOT, path)).read()
    for path in project_files(".py"):
        if not path.startswith("tests" + os.sep):
            for s in strings_of(path):
                yield path, s


def headings(path):
    return [re.sub(r"^#+\s*", "", line).strip() for line in open(os.path.join(ROOT, path))
            if re.match(r"^#{1,6}\s", line)]


def plain(text):
    return re.sub(r"[`*_]", "", text).strip().lower()


def slug(heading):
    """The anchor a heading gets on GitHub (and most renderers): lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", plain(heading)).replace(" ", "-")


TEXTS = list(texts())


def cited(pattern):
    return sorted({(where, *m.groups()) for where, text in TEXTS for m in pattern.finditer(text)})


@pytest.mark.parametrize("where,path,section", cited(SECTION))
def test_a_cited_section_exists(where, path, section):
    path = "README.md" if path == "README" else path
    assert os.path.isfile(os.path.join(ROOT, path)), f"{where} cites {path}, which is not in the project"
    assert plain(section) in [plain(h) for h in headings(path)], \
        f"{where} cites {path}, '{section}': no such section (its sections: {', '.join(headings(path))})"


@pytest.mark.parametrize("where,path,number", cited(NUMBERED))
def test_a_cited_numbered_section_exists(where, path, number):
    assert os.path.isfile(os.path.join(ROOT, path)), f"{where} cites {path}, which is not in the project"
    assert any(re.match(rf"{re.escape(number)}[.\s]", h) for h in headings(path)), \
        f"{where} cites {path}, section {number}: no heading numbered so"


@pytest.mark.parametrize("where,path", cited(PATH))
def test_a_cited_file_exists(where, path):
    assert os.path.exists(os.path.join(ROOT, path)), f"{where} names {path}, which is not in the project"


def links():
    found = []
    for path in project_files(".md"):
        for m in LINK.finditer(open(os.path.join(ROOT, path)).read()):
            target = m.group(1)
            if not re.match(r"^(https?|mailto):", target):
                found.append((path, target))
    return sorted(set(found))


@pytest.mark.parametrize("where,target", links())
def test_a_link_reaches_its_file_and_heading(where, target):
    file, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(where), file)) if file else \
        os.path.join(ROOT, where)
    assert os.path.commonpath([resolved, ROOT]) == ROOT, f"{where} links {target}, outside the project"
    assert os.path.exists(resolved), f"{where} links {target}: no such file in the project"
    if anchor and resolved.endswith(".md"):
        assert anchor in [slug(h) for h in headings(os.path.relpath(resolved, ROOT))], \
            f"{where} links {target}: no such heading"


def test_nothing_points_outside_the_project():
    outside = sorted({where for where, text in TEXTS if "../shared" in text})
    assert not outside, f"these send the reader to ../shared, which a clone does not have: {', '.join(outside)}"


def test_the_checks_find_what_they_check():
    """The patterns find the kinds of citation the project uses (a renamed pattern would pass vacuously)."""
    assert ("vega_utils/anchors/images.py", "docs/anchors.md", "CLIP offline") in cited(SECTION)
    assert any(path == "docs/method.md" for _, path, _ in cited(NUMBERED))
    assert ("README.md", "docs/method.md") in links()
    (path, section), = SECTION.findall("see README.md, 'A section that is not there'")
    assert path == "README.md" and plain(section) not in [plain(h) for h in headings(path)]


def test_the_docs_speak_plainly_of_the_code_layout():
    """Packages and modules are called that; words of an in-house metaphor ("rooms", "the house") are not."""
    jargon = re.compile(r"\brooms\b|\bthe house\b|\broom by job\b", re.IGNORECASE)
    found = sorted({where for where, text in TEXTS if jargon.search(text)})
    assert not found, f"jargon for the code's layout in: {', '.join(found)}"
