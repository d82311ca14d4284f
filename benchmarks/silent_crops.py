"""How many random training crops miss their clip's sound, with and without `--crop-min-energy`.

    python -m benchmarks.silent_crops                  # training folds of test fold 5, 2.5-s crops
    python -m benchmarks.silent_crops --min-energy 0.5 --crops 20000

Many ESC-50 clips hold a short event padded with silence, so a random crop can be silent and
still carry the clip's label. Draws crops from the training folds as training does and prints,
for crops at any offset (`--crop-min-energy 0`) and at the given setting side by side: the
share of crops holding under 5% of their clip's energy, the five worst classes, and the time
to fetch a batch (median of interleaved batches).
"""
import argparse
import time

import numpy as np
import pandas as pd
import torch

from dataset import WaveformDataset, block_energy, load_meta, load_waveforms, splits
from main import Config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-energy", type=float, default=0.25, help="the setting compared with 0 (any offset)")
    p.add_argument("--crops", type=int, default=20000, help="crops drawn per setting")
    p.add_argument("--test-fold", type=int, default=5)
    p.add_argument("--data-root", default="data", help="folder holding ESC-50/")
    args = p.parse_args(argv)
    cfg = Config()
    meta = load_meta(f"{args.data_root}/ESC-50")
    tr = splits(meta, args.test_fold)[0]
    waves = np.asarray(load_waveforms(f"{args.data_root}/ESC-50", cfg.sample_rate, meta=meta)[tr])
    energy = block_energy(waves, waves.shape[1])[:, 0]  # of each whole clip
    crop, batch = int(cfg.crop_seconds * cfg.sample_rate), cfg.batch_size
    settings = {"any offset (0)": 0.0, f"--crop-min-energy {args.min_energy}": args.min_energy}
    data = {k: WaveformDataset(waves, np.arange(len(waves)), crop=crop, min_energy=v) for k, v in settings.items()}
    torch.manual_seed(0)
    order = torch.randint(0, len(waves), (args.crops // batch, batch)).numpy()
    share, ms = {k: [] for k in settings}, {k: [] for k in settings}
    for idx in order:  # interleaved, so both settings see the same clips and the same machine state
        for k, ds in data.items():
            t0 = time.perf_counter()
            x, _ = ds.__getitems__(list(idx))
            ms[k].append(1000 * (time.perf_counter() - t0))
            share[k].append((x.float().numpy() ** 2).sum(1) / np.maximum(energy[idx], 1e-12))
    print(f"{len(waves)} training clips (test fold {args.test_fold}), {cfg.crop_seconds} s crops, "
          f"{len(order) * batch} crops per setting, batches of {batch}")
    rows = meta.iloc[tr]["category"].to_numpy()[order.ravel()]
    per_class = {}
    for k in settings:
        silent = np.concatenate(share[k]) < 0.05
        per_class[k] = pd.Series(silent).groupby(rows).mean().sort_values(ascending=False)
        print(f"  {k:24s} crops under 5% of the clip's energy {silent.mean():6.1%}; fetch {np.median(ms[k]):.1f} "
              f"ms/batch; worst classes: " + ", ".join(f"{c} {v:.0%}" for c, v in per_class[k].head(5).items()))
    return per_class  # setting -> share of silent crops per class


if __name__ == "__main__":
    main()
