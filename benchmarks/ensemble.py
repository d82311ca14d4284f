"""Test accuracy of an ensemble of finished cross-validations: their softmax outputs averaged.

    python -m benchmarks.ensemble resnet18_fine_meanmax_mels96_e230_gpu resnet18_fine_wd05
    python -m benchmarks.ensemble --top 4          # the 4 fine CVs with the best validation means

Reads each run's committed `fold*/predictions.csv` (the test fold's class probabilities, from the
checkpoint its validation fold chose), so nothing is trained or evaluated again. Members are
named, or with `--top N` picked by their mean best validation accuracy (`history.csv`), never
by a test score. Prints, per test fold, each member's accuracy and the ensemble's prefixes (the
first member, the first two, ...), on the classes and on the 5 categories (class probabilities
summed), then the means.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

FOLDS = range(1, 6)


def validation_mean(run_dir: Path) -> float:
    """Mean over the five folds of the best validation accuracy in each `history.csv`."""
    return float(np.mean([pd.read_csv(run_dir / f"fold{k}" / "history.csv").val_accuracy.max() for k in FOLDS]))


def finished_cvs(results: Path, task: str = "fine") -> list:
    """Run folders of `task` with all five folds' predictions, best validation mean first."""
    runs = [d for d in results.iterdir() if (d / "config.json").exists()
            and json.loads((d / "config.json").read_text())["task"] == task
            and all((d / f"fold{k}" / "predictions.csv").exists() for k in FOLDS)]
    return sorted(runs, key=validation_mean, reverse=True)


def read_probs(run_dir: Path, k: int):
    """(filenames, true labels, class names, probabilities) of one fold's test predictions."""
    path = run_dir / f"fold{k}" / "predictions.csv"
    if not path.exists():
        raise SystemExit(f"no {path}: the ensemble needs finished runs with all five folds")
    df = pd.read_csv(path).sort_values("filename", kind="stable")
    cols = [c for c in df.columns if c.startswith("p_")]
    return df.filename.to_numpy(), df.true.to_numpy(), [c[2:] for c in cols], df[cols].to_numpy()


def accuracies(true, classes, probs) -> tuple:
    """Class and category accuracy; categories are ten consecutive classes (target // 10)."""
    target = np.array([classes.index(t) for t in true])
    return ((probs.argmax(1) == target).mean(),
            (probs.reshape(len(probs), -1, 10).sum(2).argmax(1) == target // 10).mean())


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("runs", nargs="*", help="run names under --results-dir (fine CVs)")
    a.add_argument("--top", type=int, default=0, help="instead of names: the N fine CVs with the best "
                                                    "validation means")
    a.add_argument("--results-dir", default="results")
    args = a.parse_args(argv)
    results = Path(args.results_dir)
    dirs = [results / r for r in args.runs] or finished_cvs(results)[:args.top]
    if len(dirs) < 1 or (args.runs and args.top):
        raise SystemExit("name the runs to ensemble, or give --top N (not both)")
    for d in dirs:
        if not (d / "config.json").exists() or json.loads((d / "config.json").read_text())["task"] != "fine":
            raise SystemExit(f"{d}: not a fine-task run (no config.json, or another task); ensembles average "
                             "the 50 class probabilities")
    print("members, validation mean:", ", ".join(f"{d.name} {validation_mean(d):.4f}" for d in dirs))
    rows = []
    for k in FOLDS:
        folds = [read_probs(d, k) for d in dirs]
        files, true, classes, _ = folds[0]
        for d, (f, _, c, _) in zip(dirs, folds):
            if not (len(f) == len(files) and (f == files).all() and c == classes):
                raise SystemExit(f"{d.name} fold {k}: other test clips or classes than {dirs[0].name}")
        row = {"test_fold": k}
        for i, (d, (_, _, _, p)) in enumerate(zip(dirs, folds)):
            row[d.name], _ = accuracies(true, classes, p)
            row[f"first {i + 1} averaged"], row[f"first {i + 1} averaged, categories"] = accuracies(
                true, classes, np.mean([q for *_, q in folds[:i + 1]], axis=0))
        rows.append(row)
    df = pd.DataFrame(rows).set_index("test_fold")
    summary = pd.concat([df, df.agg(["mean", "std"])])
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(summary.T.to_string(float_format="%.4f"))
    return df


if __name__ == "__main__":
    main()
