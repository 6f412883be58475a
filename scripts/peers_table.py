"""The inference-time peers' measure as JSON and a markdown table: fitting time, held-out residual per block (the
intervention folders' own records) and held-out NLL per alpha (the run JSONs of 03_evaluate.py).

    python scripts/peers_table.py --runs runs/peers_smollm2 --out results/peers_smollm2
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="the folder with incline/, diffmean/ and eval/")
    p.add_argument("--out", required=True, help="where peers.json and peers.md go")
    args = p.parse_args()
    fits = {}
    for method in ("incline", "diffmean"):
        cfg = common.read_json(os.path.join(args.runs, method, common.INTERVENTION_CONFIG))
        fits[method] = {k: cfg[k] for k in ("base_model", "base_weights_sha256", "layers", "layers_why", "positions",
                                            "pool", "ridge", "formula", "pairs_sha256", "n_pairs_used", "n_eval_pairs",
                                            "fit_seconds", "heldout_residual", "dtype", "versions")}
    runs = {}
    for path in sorted(glob.glob(os.path.join(args.runs, "eval", "*.json"))):
        run = common.read_json(path)
        if run.get("format") != "dft-eval-run/1":
            continue
        steer = run.get("intervention") or {}
        runs[run["run"]] = dict(method=steer.get("method"), alpha=steer.get("alpha"),
                                nll={lang: dict(score=e["score"], stderr=e["stderr"], n=e["n"])
                                     for lang, e in run["results"]["nll"].items()})
    os.makedirs(args.out, exist_ok=True)
    common.write_json(os.path.join(args.out, "peers.json"), dict(fits=fits, runs=runs))
    lines = ["# Inference-time peers on SmolLM2-135M-Instruct (exploratory)", "",
             "Held-out NLL (nats/token, ± SE over pairs; lower is better) on the dev pairs, float32.", "",
             "| run | method | alpha | NLL zh | NLL en |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        cells = [f"{r['nll'][l]['score']:.4f} ± {r['nll'][l]['stderr']:.4f}" if l in r["nll"] else "" for l in ("zh", "en")]
        lines.append(f"| {name} | {r['method'] or 'none'} | {r['alpha'] if r['alpha'] is not None else ''} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| fit | blocks | positions | fitting time (s) | held-out residual / no map, per block |",
              "|---|---|---|---|---|"]
    for method, f in fits.items():
        ratios = ", ".join(f"{k}: {v['ratio']:.3f}" for k, v in (f["heldout_residual"] or {}).items())
        lines.append(f"| {method} | {f['layers'] if len(f['layers']) < 4 else 'all ' + str(len(f['layers']))} | "
                     f"{f['positions']} | {f['fit_seconds']:.0f} | {ratios} |")
    with common.atomic_open(os.path.join(args.out, "peers.md")) as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
