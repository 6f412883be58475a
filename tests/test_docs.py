"""The documentation holds together: every relative link in a tracked markdown file resolves (the file or
folder exists; for `#anchor`, a heading with that GitHub slug exists in the target), every repository path
the front pages name exists, README.md stays a front page (at most README_MAX_LINES lines) and results/
holds no code. No torch import: this runs on a bare Python."""
import glob
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


# A repository path written in prose or code spans: under one of the tracked top folders, or a bare script name.
# Placeholders (<run>, {lang}, $OUT) end the match, so only concrete paths are checked; '*' is a glob.
REPO_PATH = re.compile(r"(?<![\w./<{$*-])((?:scripts|results|docs|configs|data|tests)/[\w./*-]*[\w/*]"
                       r"|[\w-]+\.(?:py|sh))(?![\w/<{$-])")
# Folders a page names before they exist: what a pre-registered, still running study will write.
NOT_YET_WRITTEN = set()
# Files that are gone (issue 35: the studies became study files) but that history names: docs/LOG.md, the
# pre-registrations and run logs kept verbatim on the results pages.
REMOVED = {"scripts/run_ablations.sh", "run_ablations.sh", "scripts/replication_gemma3.sh",
           "scripts/replication_smollm2.sh", "scripts/compare_seeds.py", "compare_seeds.py", "scripts/ablation_tables.py",
           "ablation_tables.py", "scripts/make_table.py", "make_table.py", "scripts/paper_tables.py", "paper_tables.py"}


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("runs", "node_modules")]
            files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names]
        return files


def front_pages():
    """README.md, the docs pages and the results pages: what a reader follows to find a file."""
    return [f for f in FILES if f == "README.md" or f.startswith("docs/")
            or (f.startswith("results/") and f.endswith("README.md"))]


def missing_paths(rel_path, names):
    with open(os.path.join(ROOT, rel_path), encoding="utf-8") as f:
        text = f.read()
    here = os.path.dirname(rel_path)
    errors = []
    for n, line in enumerate(text.split("\n"), 1):
        for m in REPO_PATH.finditer(line):
            path = m.group(1)
            if path in NOT_YET_WRITTEN or path in REMOVED:
                continue
            if "/" not in path:  # a bare script name: some tracked file has it
                found = path in names
            else:
                found = any(glob.glob(os.path.join(base, path)) for base in (ROOT, os.path.join(ROOT, here)))
            if not found:
                errors.append(f"{rel_path}:{n}: {path}")
    return errors


def test_path_checker_catches_a_moved_file(tmp_path, monkeypatch):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "a.py").write_text("")
    (tmp_path / "README.md").write_text("`scripts/a.py`, `a.py`, `scripts/*.py`, `results/<run>.json`, "
                                        "`$OUT/x.py`\n`results/a.py` and `b.sh` moved.\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    errors = missing_paths("README.md", {"a.py"})
    assert errors == ["README.md:2: results/a.py", "README.md:2: b.sh"], errors


def test_paths_in_front_pages_exist():
    names = {os.path.basename(f) for f in tracked_files()}
    pages = front_pages()
    assert "README.md" in pages and "docs/LOG.md" in pages and "results/README.md" in pages
    errors = [e for page in pages for e in missing_paths(page, names)]
    assert not errors, "paths that do not exist (moved or renamed?):\n" + "\n".join(errors)


def test_results_hold_no_code():
    code = [f for f in tracked_files() if f.startswith("results/")
            and f.endswith((".py", ".sh", ".ipynb", ".bash"))]
    assert not code, f"code under results/ (it belongs in scripts/): {code}"
