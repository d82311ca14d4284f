"""Whole-clip evaluation against averaged crops, on the validation folds of a finished run.

    python -m benchmarks.eval_crops --run resnet18_coarse            # every fold with a best.pt
    python -m benchmarks.eval_crops --run resnet18_fine --crops 10 --folds 5

main.py evaluates a model trained on short random crops on the whole 5-s clip. The published
raw-audio recipes (EnvNet-v2, ACDNet) instead average the softmax of 10 evenly spaced
training-length crops. For each fold's best checkpoint this scores the fold's validation clips
(never its test clips) both ways, and their average, and prints accuracy per fold, the mean
and the cost of each. The checkpoint was chosen by whole-clip validation accuracy, which
favours that column by a little.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dataset import WaveformDataset, load_meta, load_waveforms, make_loader, splits
from predict import Predictor
from train import evaluate


def probabilities(p: Predictor, waves: np.ndarray, labels) -> np.ndarray:
    """Task-label probabilities (N, C), through the same evaluation main.py uses: its batch size and
    precision (bf16 results depend on both)."""
    loader = make_loader(WaveformDataset(waves, labels), 2 * p.cfg["batch_size"])
    return evaluate(p.model, p.features, loader, p.device, group=p.group, amp=p.cfg.get("amp", True))["probs"]


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--run", default="resnet18_coarse", help="run name under --results-dir")
    a.add_argument("--results-dir", default="results")
    a.add_argument("--data-root", default="data", help="folder holding ESC-50/")
    a.add_argument("--folds", default="1,2,3,4,5", help="test folds whose checkpoints to use")
    a.add_argument("--crops", type=int, default=10, help="evenly spaced crops per clip")
    a.add_argument("--device", default="cpu")
    args = a.parse_args(argv)
    run_dir, data_dir = Path(args.results_dir) / args.run, Path(args.data_root) / "ESC-50"
    if not (run_dir / "config.json").exists():
        raise SystemExit(f"no {run_dir / 'config.json'}: train the run first")
    cfg = json.loads((run_dir / "config.json").read_text())
    meta = load_meta(data_dir)
    all_waves, labels = load_waveforms(data_dir, cfg["sample_rate"], meta=meta), meta[cfg["task"]].to_numpy()
    crop = int(cfg["crop_seconds"] * cfg["sample_rate"])
    rows, seconds = [], {"whole clip": 0.0, "crops": 0.0}
    for k in [int(f) for f in args.folds.split(",")]:
        path = run_dir / f"fold{k}" / "best.pt"
        if not path.exists():
            print(f"fold {k}: no {path}, skipped")
            continue
        p = Predictor(path, args.device, expect=cfg)
        va = splits(meta, k)[1]
        waves, y = np.asarray(all_waves[va]), labels[va]
        t0 = time.perf_counter()
        whole = probabilities(p, waves, y)
        t1 = time.perf_counter()
        crops = np.mean([probabilities(p, waves[:, o:o + crop], y)
                         for o in np.linspace(0, waves.shape[1] - crop, args.crops).astype(int)], axis=0)
        t2 = time.perf_counter()
        seconds["whole clip"] += t1 - t0
        seconds["crops"] += t2 - t1
        acc = {name: float((q.argmax(1) == y).mean())
               for name, q in (("whole clip", whole), (f"{args.crops} crops", crops), ("both", (whole + crops) / 2))}
        rows.append({"test_fold": k, "validation_fold": int(meta.fold.iloc[va[0]]), **acc})
        print(f"fold {k} (validation fold {rows[-1]['validation_fold']}): "
              + ", ".join(f"{n} {v:.4f}" for n, v in acc.items()), flush=True)
    if not rows:
        raise SystemExit(f"no checkpoints under {run_dir}: train the run first")
    df = pd.DataFrame(rows).set_index("test_fold")
    print(f"\n{args.run}, validation accuracy, mean of {len(df)} folds:")
    print(df.drop(columns="validation_fold").mean().to_string(float_format="%.4f"))
    print(f"evaluation time, crops / whole clip: {seconds['crops'] / seconds['whole clip']:.1f}x")
    return df


if __name__ == "__main__":
    main()
