"""The documentation holds together: every relative link in a tracked markdown file resolves (the file or
folder exists; for `#anchor`, a heading with that GitHub slug exists in the target), and README.md stays
a front page (at most README_MAX_LINES lines). No torch import: this runs on a bare Python."""
import os
import re
import subprocess
import sys
import urllib.parse

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 200


def vendored(rel_path):
    """Upstream READMEs and licences copied byte-for-byte into data/<set>/ (data/SOURCES*.md): their links
    point into their own repositories, and they are kept verbatim, so they are not checked."""
    parts = rel_path.split("/")
    return parts[0] == "data" and len(parts) > 2

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def tracked_markdown():
    try:
        out = subprocess.run(["git", "ls-files", "-z", "*.md"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("runs", "node_modules")]
            files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names if n.endswith(".md")]
    return sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f)))


def prose_lines(text):
    """(line number, line) outside fenced code blocks, with code spans blanked."""
    fenced = False
    for n, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def github_slug(heading):
    """GitHub's anchor for a heading's text: inline markup dropped, lower case, punctuation other than
    '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)    # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)                            # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)                 # _emphasis_, not snake_case
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor a reader can link to in a markdown file (duplicates numbered as GitHub does)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen, out = {}, set()
    fenced = False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        out.update(a.lower() for a in HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            k = seen.get(slug, 0)
            seen[slug] = k + 1
            out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def relative_links(rel_path):
    with open(os.path.join(ROOT, rel_path), encoding="utf-8") as f:
        text = f.read()
    for n, line in prose_lines(text):
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        m = REF_DEF.match(line)
        if m:
            targets.append(m.group(1))
        for t in targets:
            t = t.strip("<>")
            if re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) or t.startswith("//"):
                continue                                           # http:, https:, mailto:, ...
            yield n, t


def broken_links(rel_path):
    errors = []
    here = os.path.dirname(os.path.join(ROOT, rel_path))
    for n, target in relative_links(rel_path):
        path, _, anchor = target.partition("#")
        path = urllib.parse.unquote(path)
        if path.startswith("/"):
            dest = os.path.join(ROOT, path.lstrip("/"))
        else:
            dest = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, rel_path)
        if not os.path.exists(dest):
            errors.append(f"{rel_path}:{n}: {target}: no such file or folder")
            continue
        if anchor:
            if not dest.endswith(".md") or os.path.isdir(dest):
                errors.append(f"{rel_path}:{n}: {target}: an anchor into something that is not a markdown file")
            elif urllib.parse.unquote(anchor).lower() not in anchors(dest):
                errors.append(f"{rel_path}:{n}: {target}: no heading with slug '{anchor}' in "
                              f"{os.path.relpath(dest, ROOT)}")
    return errors


def test_slug_rule():
    assert github_slug("Stage 2: training (`02_train_dft.py`)") == "stage-2-training-02_train_dftpy"
    assert github_slug("Our choices where the paper is silent (DESIGN **ours**)") == \
        "our-choices-where-the-paper-is-silent-design-ours"
    assert github_slug("1. Data: the parallel 4-tuple") == "1-data-the-parallel-4-tuple"
    assert github_slug("What this does *not* show") == "what-this-does-not-show"
    assert github_slug("Model choice: SmolLM2-135M vs Gemma-3-270M") == "model-choice-smollm2-135m-vs-gemma-3-270m"


def test_link_checker_catches_breakage(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "A.md").write_text("# Title\n\n## Some part\n\n## Some part\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/A.md) [ok](docs/A.md#some-part) [ok](docs/A.md#some-part-1) [ok](#top) [ok](docs/)\n"
        "[bad](docs/B.md) [bad](docs/A.md#nothing)\n`[code](not/checked.md)`\n"
        "```\n[fenced](not/checked.md)\n```\n<a name=\"top\"></a>\n[web](https://example.org/x.md)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    errors = broken_links("README.md")
    assert len(errors) == 2, errors
    assert "docs/B.md" in errors[0] and "nothing" in errors[1]


FILES = [f for f in tracked_markdown() if not vendored(f)]


@pytest.mark.parametrize("rel_path", FILES)
def test_relative_links_resolve(rel_path):
    errors = broken_links(rel_path)
    assert not errors, "broken links:\n" + "\n".join(errors)


def test_main_pages_are_checked():
    assert vendored("data/xcopa/README.md") and not vendored("data/README.md")
    for page in ("README.md", "docs/DESIGN.md", "docs/TRAINING.md", "docs/EVALUATION.md", "docs/SCALING.md",
                 "data/README.md", "results/README.md"):
        assert page in FILES or not os.path.exists(os.path.join(ROOT, page)), page


def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move reference " \
                                  "material into docs/"
