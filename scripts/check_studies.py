#!/usr/bin/env python
"""Do the study files reproduce the committed tables? Every number of each committed table against its regenerated
version (scripts/study_tables.py on the study file, written to a temporary folder); exit 0 only if all are equal.

    python scripts/check_studies.py                      # every run study (minutes: 10,000 resamples each)
    python scripts/check_studies.py gemma3 --keep /tmp/x # one study; keep the regenerated tables there

Layout may differ (other columns, other order, more numbers); the numbers may not. A committed markdown table
gives the cells of its body rows that hold numbers (a value, value ± SE, an interval, `+0.17 (p=0.0001)`; label
cells are skipped) and of its `Read against` / `Items per cell` lines; a committed JSON gives every number in it.
A cell is reproduced when one regenerated record (a markdown row, a JSON object) holds all its numbers, each
printing the same at its decimals, as it is, x 100 (a fraction printed in %) or / 60 (seconds in minutes); a
committed JSON number when some regenerated number equals it to 1e-9 (relative). A cell of one small number
(a p of 0.0001, a count) can be found by chance: the check is as strong as the cells are distinctive.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

from study_file import ROOT, load_study  # (it puts the repository root on sys.path)
import common  # noqa: E402

# study file -> the committed tables it reproduces (relative to the repository root)
STUDIES = {
    "smollm2": ["results/table.md"] + [f"results/eval/compare_{a}_vs_{b}.{ext}" for a, b in (
        ("tft", "dft-logits"), ("tft", "dft-feature"), ("base", "sft"), ("base", "tft"), ("base", "dft-logits"),
        ("base", "dft-feature")) for ext in ("md", "json")],
    "gemma3": ["results/gemma3/tables.md", "results/gemma3/compare.json"],
    "gemma3_ablations": ["results/gemma3/ablations/tables.md", "results/gemma3/ablations/compare.json",
                         "results/gemma3/ablations/base_check.md"],
    "gemma3_readout": ["results/gemma3_readout/tables.md", "results/gemma3_readout/tables.json"],
    "peers_smollm2": ["results/peers_smollm2/peers.md"],
}
NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
NUMERIC_CELL = re.compile(r"^(?:[\s\d.,+\-±\[\]()≤<=/e]|p=|steps)*\d(?:[\s\d.,+\-±\[\]()≤<=/e]|p=|steps)*$")
NUMBER_LINES = ("Read against", "Items per cell")
UNITS = (1.0, 100.0, 1 / 60)


def md_cells(text):
    """[(line number, [printed numbers of one cell])] of a markdown file's table body rows and number lines."""
    out, lines = [], text.replace("−", "-").splitlines()
    for k, line in enumerate(lines):
        s = line.strip()
        header = k + 1 < len(lines) and re.match(r"^\|(\s*:?-+:?\s*\|)+$", lines[k + 1].strip())
        if s.startswith("|") and not header and not re.match(r"^\|(\s*:?-+:?\s*\|)+$", s):
            cells = [c.strip() for c in s.strip("|").split("|")]
            out += [(k + 1, NUMBER.findall(c)) for c in cells if NUMERIC_CELL.match(c)]
        elif s.startswith(NUMBER_LINES):
            body = re.sub(r"[A-Za-z][\w-]*\d[\w-]*", " ", s)  # names that carry digits (tft-s1, zh-en) are labels
            out += [(k + 1, NUMBER.findall(part)) for part in re.split(r"[;,](?![^\[]*\])", body)]
    return [(k, nums) for k, nums in out if nums]


def json_numbers(obj):
    """Every int and float in a JSON object (booleans are not numbers here)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj
    return [x for v in items for x in json_numbers(v)]


def json_records(obj):
    """The numbers of each JSON object, one list per dict (its own values and lists; nested dicts apart)."""
    if isinstance(obj, list):
        return [r for v in obj for r in json_records(v)]
    if not isinstance(obj, dict):
        return []
    flat = lambda v: not isinstance(v, (dict, list)) or isinstance(v, list) and all(map(flat, v))  # noqa: E731
    own = [float(x) for v in obj.values() if flat(v) for x in json_numbers(v)]
    return [own] + [r for v in obj.values() if isinstance(v, (dict, list)) for r in json_records(v)]


def decimals(printed):
    return len(printed.split(".")[1]) if "." in printed and "e" not in printed.lower() else 0


def prints_as(value, d, units=UNITS):
    """How value prints at d decimals in each unit; a value within 1e-12 of a rounding boundary prints both ways
    (sums taken in another order differ in the last bits)."""
    return {norm(f"{value * u * (1 + e) + e:.{d}f}") for u in units for e in (-1e-12, 0.0, 1e-12)}


class Index:
    """The regenerated tables: their records (a markdown row's printed numbers, a JSON object's numbers) for
    lookups of a committed cell (its numbers in one record) or of a JSON number (anywhere)."""

    def __init__(self, records_json, records_md):
        import numpy as np
        self.records_json, self.records_md = records_json, records_md
        self.values = np.array(sorted({v for r in records_json for v in r}), dtype=np.float64)
        self.cache = {}

    def printed(self, d):
        """Per record, the set of its numbers printed at d decimals (as they are or x 100, / 60)."""
        if d not in self.cache:
            self.cache[d] = [{t for v in r for t in prints_as(v, d)} for r in self.records_json] + \
                [{norm(t) for t in r if decimals(t) == d} for r in self.records_md]
            self.cache[d].append(set().union(*self.cache[d]))  # the last: every record together
        return self.cache[d]

    def has_cell(self, numbers):
        """One number: anywhere; several (an interval, value ± SE, delta and p): together in one record."""
        wanted = [(decimals(n), norm(n)) for n in numbers]
        if len(wanted) == 1:
            d, t = wanted[0]
            return t in self.printed(d)[-1]
        return any(all(t in self.printed(d)[i] for d, t in wanted)
                   for i in range(len(self.records_json) + len(self.records_md)))

    def has_value(self, x):
        import numpy as np
        for u in UNITS:
            i = np.searchsorted(self.values, x * u)
            near = self.values[max(i - 1, 0):i + 1]
            if near.size and np.min(np.abs(near - x * u)) <= 1e-9 * abs(x * u) + 1e-12:
                return True
        return False


def norm(printed):
    t = printed.lstrip("+")
    return t[1:] if t.startswith("-") and float(t) == 0 else t


def regenerated(folder):
    """Index of every JSON and markdown file under folder."""
    records_json, records_md = [], []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if name.endswith(".json"):
                records_json += json_records(common.read_json(path))
            elif name.endswith(".md"):
                rows = {}
                for k, nums in md_cells(open(path, encoding="utf-8").read()):
                    rows.setdefault(k, []).extend(nums)
                records_md += list(rows.values())
    return Index(records_json, records_md)


def check_file(path, index):
    """(cells of the committed file (a JSON: numbers), [(line or 'json', cell)] of those the regenerated lack)."""
    if path.endswith(".json"):
        numbers = json_numbers(common.read_json(path))
        return len(numbers), [("json", x) for x in numbers if not index.has_value(float(x))]
    cells = md_cells(open(path, encoding="utf-8").read())
    return len(cells), [(k, " ".join(nums)) for k, nums in cells if not index.has_cell(nums)]


def regenerate(study, out):
    """scripts/study_tables.py on the study file, into out (which links to the results folder's eval/ and train/:
    the tables read the committed results and write beside them); its stderr on failure."""
    script = os.path.join(ROOT, "scripts", "study_tables.py")
    path = os.path.join(ROOT, "studies", study + ".toml")
    results = os.path.join(ROOT, load_study(path, check_flags=False)["study"]["results"])
    os.makedirs(out, exist_ok=True)
    for name in ("eval", "train", "layers"):
        if os.path.isdir(os.path.join(results, name)) and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.join(results, name), os.path.join(out, name))
    proc = subprocess.run([sys.executable, script, path, "--out", out],
                          cwd=ROOT, capture_output=True, text=True)
    return None if proc.returncode == 0 else proc.stderr.strip()[-2000:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="*", default=list(STUDIES), help=f"which studies (default: {', '.join(STUDIES)})")
    p.add_argument("--keep", help="write the regenerated tables to KEEP/STUDY (default: a temporary folder)")
    p.add_argument("--tables", help="check the tables already regenerated in TABLES/STUDY (e.g. an earlier --keep) "
                   "instead of running study_tables.py")
    p.add_argument("--show", type=int, default=20, help="numbers listed per file that differ")
    args = p.parse_args(argv)
    for s in args.studies:
        if s not in STUDIES:
            raise common.UserError(f"unknown study '{s}': choose from {', '.join(STUDIES)}")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for study in args.studies:
            out = os.path.join(args.tables or args.keep or tmp, study)
            error = None if args.tables else regenerate(study, out)
            if error:
                print(f"{study}: the tables could not be regenerated: {error}")
                failed += 1
                continue
            index = regenerated(out)
            for rel in STUDIES[study]:
                total, missing = check_file(os.path.join(ROOT, rel), index)
                print(f"{study}: {rel}: {len(missing)} of its {total} {'numbers' if rel.endswith('.json') else 'cells'} "
                      "not reproduced")
                for where, n in missing[:args.show]:
                    print(f"   not in the regenerated tables: {n} ({rel}{'' if where == 'json' else f':{where}'})")
                if len(missing) > args.show:
                    print(f"   ... and {len(missing) - args.show} more")
                failed += bool(missing)
    print("check_studies: " + ("every committed number reproduced" if not failed else f"{failed} file(s) differ"))
    return 1 if failed else 0


if __name__ == "__main__":
    common.run_main(lambda: sys.exit(main()))
