"""Whole-clip evaluation against test-time averaging, on the validation folds of a finished run.

    python -m benchmarks.eval_crops --run resnet18_coarse            # every fold with a best.pt
    python -m benchmarks.eval_crops --run resnet18_fine --crops 10 --folds 5
    python -m benchmarks.eval_crops --run resnet18_fine --pitch 1,2  # + pitch shifts 0, +-1, +-2

main.py evaluates a model trained on short random crops on the whole 5-s clip. The published
raw-audio recipes (EnvNet-v2, ACDNet) instead average the softmax of 10 evenly spaced
training-length crops. For each fold's best checkpoint this scores the fold's validation clips
(never its test clips) both ways, and their average, and prints accuracy per fold, the mean
and the cost of each. The checkpoint was chosen by whole-clip validation accuracy, which
favours that column by a little. With `--pitch`, the whole clip is also scored at the given
pitch shifts (semitones, each up and down, plus 0; the training augmentation's warp, fixed) and
the softmax averaged.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dataset import Augment, WaveformDataset, load_meta, load_waveforms, make_loader, splits
from predict import Predictor
from train import evaluate


class Shifted(torch.nn.Module):
    """A LogMel followed by a fixed pitch shift of its output."""

    def __init__(self, features, augment: Augment, semitones: float):
        super().__init__()
        self.features, self.augment, self.semitones = features, augment, semitones

    def forward(self, wave):
        return self.augment.shift_pitch(self.features(wave), self.semitones)


def probabilities(p: Predictor, waves: np.ndarray, labels, semitones: float = 0.0) -> np.ndarray:
    """Task-label probabilities (N, C), through the same evaluation main.py uses: its batch size and
    precision (bf16 results depend on both); the log-mels shifted by `semitones` unless 0."""
    loader = make_loader(WaveformDataset(waves, labels), 2 * p.cfg["batch_size"])
    mel_range = (p.cfg["f_min"], p.cfg["f_max"] or p.cfg["sample_rate"] / 2)
    features = Shifted(p.features, Augment(1, mel_range=mel_range), semitones) if semitones else p.features
    return evaluate(p.model, features, loader, p.device, group=p.group, amp=p.cfg.get("amp", True))["probs"]


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--run", default="resnet18_coarse", help="run name under --results-dir")
    a.add_argument("--results-dir", default="results")
    a.add_argument("--data-root", default="data", help="folder holding ESC-50/")
    a.add_argument("--folds", default="1,2,3,4,5", help="test folds whose checkpoints to use")
    a.add_argument("--crops", type=int, default=10, help="evenly spaced crops per clip")
    a.add_argument("--pitch", default="", help="pitch shifts in semitones to average, each up and down "
                                                "with 0 (e.g. 1,2); none by default")
    a.add_argument("--device", default="cpu")
    args = a.parse_args(argv)
    try:
        shifts = sorted({0.0, *(s * float(v) for v in args.pitch.split(",") if v.strip() for s in (1, -1))})
    except ValueError:
        raise SystemExit(f"--pitch {args.pitch!r}: give semitones separated by commas, e.g. 1,2")
    run_dir, data_dir = Path(args.results_dir) / args.run, Path(args.data_root) / "ESC-50"
    if not (run_dir / "config.json").exists():
        raise SystemExit(f"no {run_dir / 'config.json'}: train the run first")
    cfg = json.loads((run_dir / "config.json").read_text())
    meta = load_meta(data_dir)
    all_waves, labels = load_waveforms(data_dir, cfg["sample_rate"], meta=meta), meta[cfg["task"]].to_numpy()
    crop = int(cfg["crop_seconds"] * cfg["sample_rate"])
    rows, seconds = [], {"whole clip": 0.0, "crops": 0.0, "pitch": 0.0}
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
        pitched = [whole if s == 0 else probabilities(p, waves, y, s) for s in shifts]
        seconds["whole clip"] += t1 - t0
        seconds["crops"] += t2 - t1
        seconds["pitch"] += time.perf_counter() - t2
        named = [("whole clip", whole), (f"{args.crops} crops", crops), ("both", (whole + crops) / 2)]
        if len(shifts) > 1:
            named.append((f"pitch {','.join(f'{s:+g}' for s in shifts)}", np.mean(pitched, axis=0)))
        acc = {name: float((q.argmax(1) == y).mean()) for name, q in named}
        rows.append({"test_fold": k, "validation_fold": int(meta.fold.iloc[va[0]]), **acc})
        print(f"fold {k} (validation fold {rows[-1]['validation_fold']}): "
              + ", ".join(f"{n} {v:.4f}" for n, v in acc.items()), flush=True)
    if not rows:
        raise SystemExit(f"no checkpoints under {run_dir}: train the run first")
    df = pd.DataFrame(rows).set_index("test_fold")
    print(f"\n{args.run}, validation accuracy, mean of {len(df)} folds:")
    print(df.drop(columns="validation_fold").mean().to_string(float_format="%.4f"))
    pitch = f", pitch shifts / whole clip: {1 + seconds['pitch'] / seconds['whole clip']:.1f}x"
    print(f"evaluation time, crops / whole clip: {seconds['crops'] / seconds['whole clip']:.1f}x"
          + (pitch if len(shifts) > 1 else ""))
    return df


if __name__ == "__main__":
    main()
