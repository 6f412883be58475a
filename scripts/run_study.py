#!/usr/bin/env python
"""Run a study: one TOML file (studies/README.md) -> pairs, trainings, evaluations, in its results folder.

    python scripts/run_study.py studies/tiny.toml --dry-run      # the plan: parts, tokens, a time estimate
    python scripts/run_study.py studies/tiny.toml                # run it; a rerun skips every finished part
    python scripts/run_study.py studies/tiny.toml --only tft     # just these runs (a group name means its seeds)

The stages stay what users run by hand: each part is one subprocess of 01_build_pairs.py, 02_train_dft.py or
03_evaluate.py, logged to WORK/logs/<part>.log (the driver's: WORK/logs/driver.log). A finished part leaves a marker
in WORK/done/ holding its command (a part the study now gives other flags is refused) and its small outputs (run
JSONs, gzipped per-item outcomes, training logs) in the results folder, which also counts as finished (a fresh
checkout). A stopped training resumes from its checkpoint; a killed part is tried again (compute.retries), one its
stage refuses (exit 2: bad input) is not. Never commits to git.
"""
import argparse
import fcntl
import glob
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_file import (PRECISIONS, ROOT, argparse_raises, command_change, command_of, fill,  # noqa: E402,F401
                        load_stage, load_study, part_cells)  # (load_study: the study scripts import it from here)
import common  # noqa: E402  (study_file put the repository root on sys.path)
from common import UserError  # noqa: E402


# A per-item row's copy of its benchmark text, the same in every run of a cell: published rows keep the item's id and
# outcome (the run JSON names the data file and its sha256; the work folder keeps full rows), a fifth of the size.
ITEM_TEXT = ("context", "choices", "prompt", "target")


def gzip_copy(path, dest, drop=()):
    """path gzipped to dest atomically, as `gzip -n -9` (no name, no time: same bytes anywhere); drop: these keys."""
    with open(path, "rb") as src, common.atomic_open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as dst:
            if not drop:
                return shutil.copyfileobj(src, dst)  # the file as it is, and done
            for line in src:  # bytes split at b"\n" only (str.splitlines would also split inside JSON strings)
                row = {k: v for k, v in json.loads(line).items() if k not in drop}
                dst.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def copy(path, folder):
    """shutil.copy into folder, if the file exists and is not already there (results and work may be one folder)."""
    dest = os.path.join(folder, os.path.basename(path))
    if os.path.exists(path) and (not os.path.exists(dest) or not os.path.samefile(path, dest)):
        shutil.copy(path, folder)


def item_files(folder, run, ext):  # RUN.TASK.LANG.EXT of this run only: a glob for incline-a0 finds incline-a0.5's
    return [f for f in glob.glob(os.path.join(folder, glob.escape(run) + ".*" + ext))
            if os.path.basename(f)[len(run) + 1:-len(ext)].count(".") == 1]


def has_checkpoint(folder):
    return load_stage("02_train_dft").latest_checkpoint(folder)[0] is not None


class Runner:
    def __init__(self, study, results, work, only=()):
        self.study, self.results, self.work = study, os.path.normpath(results), os.path.normpath(work)
        self.values = dict(work=self.work, results=self.results)
        self.folders = (("work", self.work), ("results", self.results), ("root", ROOT))  # as markers write them
        chosen = {n for n, r in study.runs_expanded.items() if not only or n in only or r["group"] in only}
        for r in reversed(list(study.runs_expanded.values())):  # and the runs they come after (defined above them)
            chosen |= set(r["after"]) if r["name"] in chosen else set()
        self.runs = [r for n, r in study.runs_expanded.items() if n in chosen and not r["reuse"]]
        self.cond, self.log_lock, self.stopping = threading.Condition(), threading.Lock(), threading.Event()
        self.busy = 0  # parts being run (with their copying): what an interrupt waits for

    def say(self, text):
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
        with self.log_lock:
            print(line, flush=True)
            with open(os.path.join(self.work, "logs", "driver.log"), "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def done(self, name):
        return os.path.exists(os.path.join(self.work, "done", name))

    def part(self, name, argv):
        """One part: up to compute.retries attempts of argv, logged to WORK/logs/NAME.log; its marker WORK/done/NAME."""
        compute = self.study["compute"]
        env = dict(os.environ, OMP_NUM_THREADS=str(compute["threads"]), MKL_NUM_THREADS=str(compute["threads"]),
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **{k: str(v) for k, v in compute["env"].items()})
        log = os.path.join(self.work, "logs", name + ".log")
        for attempt in range(1, compute["retries"] + 1):
            if self.stopping.is_set():  # Ctrl-C: no new attempt (the stage got the signal too)
                return False
            argv_now = argv() if callable(argv) else argv
            self.say(f"{name}: start" + (f" (attempt {attempt})" if attempt > 1 else ""))
            t0 = time.time()
            with open(log, "a", encoding="utf-8") as f:
                print(f"\n$ {' '.join(argv_now)}", file=f, flush=True)
                code = subprocess.run(argv_now, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if code == 0:
                with open(os.path.join(self.work, "done", name), "w", encoding="utf-8") as f:
                    f.write(command_of(argv_now, self.folders))  # what changed_parts compares with the study's now
                self.say(f"{name}: done ({time.time() - t0:.0f} s)")
                return True
            # exit 2 (a launcher exits 1, naming it) and an error line: the stage refused its input, as it would again
            text = open(log, errors="replace").read().rsplit("\n$ ", 1)[-1]  # this attempt's lines
            launched = argv_now[1:2] == ["-m"] and re.search(r"exitcode\s*: 2 |non-zero exit status 2\.", text)
            refused = (code == 2 or launched) and [line.strip() for line in text.splitlines() if "error:" in line]
            self.say(f"{name}: " + ("stopped by the interrupt" if self.stopping.is_set() else f"REFUSED, not tried "
                                    f"again: {refused[-1]}" if refused else f"FAILED with exit code {code}")
                     + f" ({log})")
            if refused or self.stopping.is_set():
                return False
        return False

    def stage(self, script, processes=1, launcher="torchrun"):
        """python, or with several processes accelerate launch (02; compute.launch_flags) or torchrun (03)."""
        if processes > 1 and launcher == "accelerate":
            return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                    *fill(self.study["compute"]["launch_flags"], self.values), script]
        if processes > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), script]
        return [sys.executable, script]

    # ---- pairs
    def pairs_files(self, name):
        p = self.study["pairs"][name]
        train = (os.path.join(ROOT, fill([p["file"]], self.values)[0]) if p["file"]  # relative to the repository root
                 else os.path.join(self.work, f"pairs_{name}.jsonl"))
        return train, train[:-len(".jsonl")] + ".dev.jsonl"

    def pairs_argv(self, name):
        flags = fill(self.study["pairs"][name]["flags"] or [], self.values)
        return [sys.executable, "01_build_pairs.py", *flags, "--out", self.pairs_files(name)[0]]

    def build_pairs(self, name):
        p, (train, dev) = self.study["pairs"][name], self.pairs_files(name)
        if p["flags"] is not None and not self.done(f"pairs_{name}"):
            if not self.part(f"pairs_{name}", self.pairs_argv(name)):
                raise UserError(f"pairs {name} could not be built (see {self.work}/logs/pairs_{name}.log)")
        for path, want in ((train, p["sha256"]), (dev, p["dev_sha256"])):
            if want and common.sha256_file(path) != want:
                raise UserError(f"{path} has sha256 {common.sha256_file(path)}, not the study's {want}: the pairs "
                                "differ from the ones the study was registered with; rebuild them or fix the hash")
        copy(train[:-len(".jsonl")] + ".stats.json", self.results)
        with open(os.path.join(self.results, "pairs.sha256"), "a+", encoding="utf-8") as f:  # what the runs saw
            f.seek(0)
            known = f.read()
            f.write("".join(f"{common.sha256_file(x)}  {os.path.basename(x)}\n" for x in (train, dev)
                            if os.path.exists(x) and f"  {os.path.basename(x)}\n" not in known))

    def missing_pairs(self):
        """Given pairs files (pairs.NAME.file; its .dev.jsonl where a run's flags read {dev}) a part needs, missing."""
        wanted = [f for r in self.runs if r["pairs"] and self.study["pairs"][r["pairs"]]["file"] and self.pending(r)
                  for f in self.pairs_files(r["pairs"])[:1 + r["reads_dev"]]]
        return list(dict.fromkeys(f for f in wanted if not common.existing_path(f)))  # a train file before its dev

    # ---- what is finished (also on a fresh checkout: the results folder)
    def model_of(self, run):
        """The model a run is evaluated with: its training's folder, else its model (e.g. {work}/train/tft-s{seed})."""
        if not run["train"]:
            return fill([run["model"]], dict(self.values, seed=run["seed"], run=run["name"]))[0]
        return os.path.join(self.work, "train", run["name"])

    def parts_of(self, run):
        return [p for p in self.study["evaluation.parts"]
                if p["runs"] is None or run["name"] in p["runs"] or run["group"] in p["runs"]]

    def part_published(self, run, part):
        """The results folder already holds this part's output (its marker may be gone: a fresh checkout)."""
        if self.done(f"eval_{run['name']}_{part['name']}"):
            return True
        if part["analysis"]:
            pattern = os.path.join(self.results, "layers", f"{run['name']}.layers.*.json")
            return bool(glob.glob(pattern) + glob.glob(pattern + ".gz"))
        path = common.existing_path(os.path.join(self.results, "eval", run["name"] + ".json"))
        if not path:
            return False
        stage3 = load_stage("03_evaluate")
        with argparse_raises():
            args = stage3.parse_args(["--model", "M", "--out", "O"] + self.eval_flags(run, part))
        have = common.read_json(path)["results"]  # every cell of the part, at the part's --limit
        cells = [have.get(key, {}).get(cell) for key, cell in part_cells(stage3, args)]
        return all(c is not None and c["settings"]["limit"] == args.limit for c in cells)

    def eval_argv(self, run, part):
        out = os.path.join(self.work, "layers", run["name"]) if part["analysis"] else os.path.join(self.work, "eval")
        return self.stage("03_evaluate.py", self.study["compute"]["processes"]) + [
            "--model", self.model_of(run), "--run-name", run["name"], "--out", out] + self.eval_flags(run, part)

    def changed_parts(self):
        """Finished parts whose marker records another command than the study gives them now: 'NAME (what changed)'."""
        parts = [(f"pairs_{n}", self.pairs_argv(n)) for n, p in self.study["pairs"].items() if p["flags"] is not None]
        parts += [(f"train_{r['name']}", self.train_argv(r, dry=True)) for r in self.runs if r["train"]]
        parts += [(f"eval_{r['name']}_{p['name']}", self.eval_argv(r, p)) for r in self.runs for p in self.parts_of(r)]
        made = {n: open(os.path.join(self.work, "done", n), encoding="utf-8").read() for n, _ in parts if self.done(n)}
        now = {n: command_of(argv, self.folders) for n, argv in parts}  # an empty marker (older ones): no verdict
        return [f"{n} ({command_change(made[n], now[n])})" for n in now if made.get(n, "") not in ("", now[n])]

    def eval_flags(self, run, part):
        values = dict(self.values, model=self.model_of(run), run=run["name"], seed=run["seed"])
        if run["pairs"]:
            values["pairs"], values["dev"] = self.pairs_files(run["pairs"])
        flags = self.study["evaluation"]["flags"] + part["flags"]
        return fill(flags + ["--analysis", "layers"] * (part["analysis"] and "--analysis" not in flags), values)

    def pending_evals(self, run):
        return [p for p in self.parts_of(run) if not self.part_published(run, p)]

    def pending(self, run):
        return self.needs_training(run) or bool(self.pending_evals(run))

    def needs_training(self, run):
        """Not trained here (marker, model folder) and needed: an evaluation of it or of a run after it is pending."""
        trained = self.done(f"train_{run['name']}") and os.path.isdir(self.model_of(run))
        return run["train"] and not trained and self.needed(run)

    def wanted(self, run):
        """Some evaluation part names the run, or a run of this invocation comes after it."""
        return bool(self.parts_of(run)) or any(run["name"] in r["after"] for r in self.runs)

    def needed(self, run):
        after_it = [r for r in self.study.runs_expanded.values() if run["name"] in r["after"] and not r["reuse"]]
        return bool(self.pending_evals(run)) or any(self.needed(r) for r in after_it)

    # ---- training
    def train_argv(self, run, dry=False):
        compute, folder = self.study["compute"], self.model_of(run)
        if os.path.isdir(folder) and not has_checkpoint(folder) and not dry:
            shutil.rmtree(folder)  # killed before its first checkpoint: start again
        train, dev = self.pairs_files(run["pairs"])
        values = dict(self.values, pairs=train, dev=dev, run=run["name"], seed=run["seed"])
        flags = fill(self.study["train"]["flags"] + run["flags"], values)
        argv = self.stage("02_train_dft.py", compute["processes"], "accelerate") + [
            "--pairs", train, "--out", folder, "--model", fill([run["model"]], values)[0]]
        if run["seed"] is not None:
            argv += ["--seed", str(run["seed"])]
        if "--mixed-precision" not in flags:
            argv += ["--mixed-precision", PRECISIONS[compute["precision"]]]
        if compute["save_every"] and "--save-every" not in flags:
            argv += ["--save-every", str(compute["save_every"])]
        return argv + flags + (["--resume"] if has_checkpoint(folder) else [])

    def train(self, run):
        name, folder = run["name"], self.model_of(run)
        if has_checkpoint(folder):
            self.say(f"train_{name}: resuming from its checkpoint")
        if not self.part(f"train_{name}", lambda: self.train_argv(run)):
            return False
        for n in ("checkpoint", "checkpoint.old", "checkpoint.tmp") * (not self.study["compute"]["keep_checkpoints"]):
            shutil.rmtree(os.path.join(folder, n), ignore_errors=True)  # the final model is saved
        out = os.path.join(self.results, "train", name)
        os.makedirs(out, exist_ok=True)
        for f in ("train_config.json", "intervention_config.json", "provenance.json"):  # a training's or a fit's
            copy(os.path.join(folder, f), out)
        if os.path.exists(os.path.join(folder, "train_log.jsonl")) and not os.path.samefile(folder, out):  # gzipped
            gzip_copy(os.path.join(folder, "train_log.jsonl"), os.path.join(out, "train_log.jsonl.gz"))
        return True

    # ---- evaluation
    def evaluate(self, run):
        name, ok = run["name"], True
        work_eval, res_eval = os.path.join(self.work, "eval"), os.path.join(self.results, "eval")  # made by run()
        for part in self.pending_evals(run):
            if os.path.exists(os.path.join(res_eval, name + ".json")) and not os.path.exists(
                    os.path.join(work_eval, name + ".json")):
                self.seed_work_eval(name, work_eval, res_eval)  # 03 adds cells to the run JSON it finds
            if not self.part(f"eval_{name}_{part['name']}", self.eval_argv(run, part)):
                ok = False
                continue
            if part["analysis"]:
                for f in glob.glob(os.path.join(self.work, "layers", name, f"{name}.layers.*.json")):  # gzipped
                    gzip_copy(f, os.path.join(self.results, "layers", os.path.basename(f) + ".gz"))
                continue
            if not os.path.samefile(work_eval, res_eval):  # results and work may be one folder (run_paper.sh's OUT)
                self.publish_eval(run, work_eval, res_eval)
        return ok

    def publish_eval(self, run, work_eval, res_eval):
        """Per-item files gzipped less ITEM_TEXT, then the run JSON (the part's proof), atomically; logs as RUN.log."""
        name = run["name"]
        for f in item_files(work_eval, name, ".jsonl"):
            gzip_copy(f, os.path.join(res_eval, os.path.basename(f) + ".gz"), drop=ITEM_TEXT)
        with open(os.path.join(work_eval, name + ".json"), "rb") as src, common.atomic_open(
                os.path.join(res_eval, name + ".json"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        logs = [os.path.join(self.work, "logs", f"eval_{name}.earlier.log")] + [
            os.path.join(self.work, "logs", f"eval_{name}_{p['name']}.log") for p in self.parts_of(run)]
        text = "".join(open(p, encoding="utf-8", errors="replace").read() for p in logs if os.path.exists(p))
        with common.atomic_open(os.path.join(res_eval, name + ".log")) as f:
            f.writelines(line + "\n" for line in text.replace("\r", "\n").splitlines()
                         if line.strip() and "it/s]" not in line and "s/it]" not in line)

    def seed_work_eval(self, name, work_eval, res_eval):
        shutil.copy(os.path.join(res_eval, name + ".json"), work_eval)
        log = os.path.join(res_eval, name + ".log")
        if os.path.exists(log):  # the lines of parts run on another machine: publish_eval puts them first
            shutil.copy(log, os.path.join(self.work, "logs", f"eval_{name}.earlier.log"))
        for f in item_files(res_eval, name, ".jsonl.gz"):
            with gzip.open(f, "rb") as src, open(os.path.join(work_eval, os.path.basename(f)[:-3]), "wb") as dst:
                shutil.copyfileobj(src, dst)

    # ---- the schedule
    def guarded(self, kind, run, step):
        """step(run), or False after saying why it raised: a broken part must not leave the queues waiting for it."""
        try:
            return step(run)
        except Exception as e:
            self.say(f"{kind}_{run['name']}: FAILED ({type(e).__name__}: {e})")
            return False

    def run(self):
        for folder in [os.path.join(self.work, f) for f in ("logs", "done", "eval")] + [os.path.join(self.results, "eval")]:
            os.makedirs(folder, exist_ok=True)
        self.lock = open(os.path.join(self.work, ".driver.lock"), "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another run_study.py drives {self.work} (its .driver.lock): wait for it, or stop it") from None
        to_train = [r for r in self.runs if self.needs_training(r)]
        to_eval = [r for r in self.runs if self.pending_evals(r)]
        for setup in self.study["setup"] if to_eval else []:
            if not self.done(f"setup_{setup['name']}") and not self.part(
                    f"setup_{setup['name']}", [sys.executable] + fill(setup["command"], self.values)):
                raise UserError(f"setup {setup['name']} failed (see {self.work}/logs/setup_{setup['name']}.log)")
        for name in dict.fromkeys(r["pairs"] for r in to_train + to_eval if r["pairs"]):
            self.build_pairs(name)
        idle = [r for r in self.runs if r not in to_eval and r not in to_train]
        unneeded = [r["name"] for r in idle if r["train"] and not self.wanted(r)]
        finished = [r["name"] for r in idle if r["name"] not in unneeded]
        for text, names in (("finished before, skipped", finished), ("not needed yet", unneeded)):
            if names:
                self.say(f"{text}: {', '.join(names)}")
        ready = set(self.study.runs_expanded) - {r["name"] for r in to_train}
        failed, claimed, results = set(), set(), {}

        def usable(run):  # None: wait; False: a run it comes after failed
            return False if failed & set(run["after"]) else True if ready >= set(run["after"]) else None

        def lane():
            while True:
                with self.cond:
                    while to_train and all(usable(r) is None for r in to_train):
                        self.cond.wait()
                    if not to_train:
                        break
                    run = next(r for r in to_train if usable(r) is not None)
                    to_train.remove(run)
                    if not usable(run):
                        failed.add(run["name"])
                        self.cond.notify_all()
                        continue
                    self.busy += 1
                ok = self.guarded("train", run, self.train)
                with self.cond:
                    (ready if ok else failed).add(run["name"])
                    results[f"train_{run['name']}"] = ok
                    self.busy -= 1
                    self.cond.notify_all()
            queue()  # nothing left to train: the lane's share of the machine evaluates

        def queue():
            while True:
                with self.cond:
                    while True:
                        failed.update(r["name"] for r in to_eval if usable(r) is False)
                        waiting = [r for r in to_eval if r["name"] not in claimed and r["name"] not in failed]
                        run = next((r for r in waiting if r["name"] in ready and usable(r)), None)
                        if run or not waiting:
                            break
                        self.cond.wait()
                    if run is None:
                        return
                    claimed.add(run["name"])
                    self.busy += 1
                results[f"eval_{run['name']}"] = self.guarded("eval", run, self.evaluate)
                with self.cond:
                    self.busy -= 1
                    self.cond.notify_all()

        threads = [threading.Thread(target=lane) for _ in range(self.study["compute"]["lanes"])]
        threads += [threading.Thread(target=queue) for _ in range(self.study["compute"]["eval_queues"])]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self.stopping.set()
            self.say("interrupted: no new part starts; a rerun resumes (stopped trainings from their checkpoints)")
            with self.cond:
                to_train.clear()
                failed.update(r["name"] for r in to_eval)
                self.cond.notify_all()
                # not Thread.join: an interrupted join can report a thread finished that still waits on a stage
                while self.busy:
                    self.cond.wait()
            raise SystemExit(130) from None
        bad = sorted(k for k, ok in results.items() if not ok)
        self.say("study: " + (f"{len(bad)} part(s) failed: {', '.join(bad)}; rerun (after fixing what was "
                              "REFUSED)" if bad else "every part finished"))
        return not bad

    # ---- the plan (--dry-run): parts, tokens, a time estimate
    def plan(self):
        stage2 = load_stage("02_train_dft")
        lines, tokens, steps_left = [f"== study {self.study['study']['name']}: results {self.results}, work "
                                     f"{self.work}"], 0, 0
        for setup in self.study["setup"] if any(self.pending_evals(r) for r in self.runs) else []:
            lines.append(f"   setup {setup['name']:18s} {'done' if self.done('setup_' + setup['name']) else 'run'}: "
                         + " ".join(fill(setup["command"], self.values)))
        for name in dict.fromkeys(r["pairs"] for r in self.runs if r["pairs"] and self.pending(r)):
            built = self.study["pairs"][name]["file"] or self.done(f"pairs_{name}")
            lines.append(f"   pairs {name:18s} {'built' if built else 'build'}: {self.pairs_files(name)[0]}")
        for run in self.runs:
            pending = [p["name"] for p in self.pending_evals(run)]
            evals = (f"evaluate {', '.join(pending)}" if pending else "evaluated" if self.parts_of(run)
                     else "no evaluation part")
            if self.needs_training(run):
                with argparse_raises():
                    argv = self.train_argv(run, dry=True)
                    args = stage2.parse_args(argv[argv.index("02_train_dft.py") + 1:])
                if args.fit or args.fit_tuned_lens:  # a forward pass over the pairs, no optimizer steps
                    what = f"fit ({args.fit or 'tuned lens'}; not in the training time)"
                else:
                    cfg = stage2.resolve_config(args)
                    pairs = self.pairs_files(run["pairs"])[0]
                    per_step = cfg["batch_size"] * (cfg["grad_accum"] or 1)
                    steps = cfg["max_steps"] or (math.ceil(cfg["epochs"] * len(common.read_jsonl(pairs)) / per_step)
                                                 if os.path.exists(pairs) else None)
                    step_tokens = per_step * cfg["max_length"] * self.study["compute"]["processes"]
                    tokens += (steps or 0) * step_tokens
                    steps_left += steps if steps is not None else math.nan  # pairs not built yet
                    what = (f"train ({steps} steps, <= {steps * step_tokens:,} tokens)" if steps is not None
                            else "train (? steps: its pairs are not built yet)")
            else:
                what = "no training" if not run["train"] else "trained" if self.wanted(run) else "not needed yet"
            lines.append(f"   {run['name']:24s} {what}; {evals}")
        rate = self.study["compute"]["tokens_per_s"]  # else the seconds per step of the runs trained here so far
        logs = [common.read_jsonl(f) for f in glob.glob(os.path.join(self.results, "train", "*", "train_log.jsonl*"))]
        per_run = [sum(r.get("seconds", 0) for r in rows) / len(rows) for rows in logs if rows and not rate]
        seconds = tokens / rate if rate else steps_left * (sum(per_run) / len(per_run) if per_run else float("nan"))
        total = f"<= {tokens:,} tokens (padded to --max-length); about " + (
            f"{seconds / 3600:.2f} h ({seconds / 60:.1f} min) of training" if not math.isnan(seconds) else
            "? h of training (set compute.tokens_per_s, or finish one run here to time it)")
        return "\n".join(lines + ["== to train: " + ("? (a run's steps are unknown until its pairs are built)" if
                                                    math.isnan(steps_left) else total if steps_left else
                                                    "nothing (no optimizer steps left)")])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("study", help="the study file, e.g. studies/tiny.toml")
    p.add_argument("--out", help="results folder (default: the study's study.results, e.g. results/NAME)")
    p.add_argument("--work", help="work folder for models, checkpoints, markers, logs (default: study.work)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--only", nargs="+", metavar="RUN", help="only these runs (a group name means all its seeds)")
    args = p.parse_args(argv)
    study = load_study(args.study)
    results = os.path.abspath(args.out) if args.out else os.path.join(ROOT, study["study"]["results"])  # or absolute
    work = os.path.abspath(args.work) if args.work else os.path.join(ROOT, study["study"]["work"])
    unknown = [r for r in args.only or [] if r not in study.runs_expanded and r not in study.groups]
    if unknown:
        raise UserError(f"--only names {', '.join(unknown)}, not runs of {args.study}; use one of "
                        f"{', '.join(dict.fromkeys(list(study.groups) + list(study.runs_expanded)))}")
    runner = Runner(study, results, work, set(args.only or []))
    changed = runner.changed_parts()
    if changed:
        raise UserError(f"{', '.join(changed)} ran with other flags than {args.study} gives now ({work}/done/PART): "
                        "give what changed a new name (new parts), or use a new --work/--out (run_paper.sh: OUT)")
    for path in runner.missing_pairs():
        raise UserError(f"{args.study}: no pairs file {path} (a [pairs] file = ..., or the .dev.jsonl beside it that "
                        "{dev} reads); build it with 01_build_pairs.py, or fix the path (relative: to the repository)")
    if study["compute"]["planner"]:  # e.g. scripts/paper_plan.py: the paper study's checks, GPU-hours and FSDP config
        argv = [sys.executable] + fill(study["compute"]["planner"], runner.values) + (["--dry-run"] if args.dry_run else [])
        if subprocess.run(argv, cwd=ROOT).returncode != 0:
            raise UserError(f"the study's planner refused it: {' '.join(argv)}")
    if args.dry_run:
        print(runner.plan())
        return
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (study["compute"]["precision"] == "bf16" and not study["compute"]["allow_emulated"]
            and any(runner.pending(r) for r in runner.runs) and not common.native_bf16(device)):
        raise UserError(f"this machine ({device}) does not compute bf16 natively (no CUDA Ampere+, no AMX / "
                        "AVX512-BF16 CPU): the study's bf16 recipe would be emulated; run it where bf16 is native, "
                        "or set allow_emulated = true in [compute]")
    if not runner.run():
        sys.exit(1)


if __name__ == "__main__":
    common.run_main(main)
