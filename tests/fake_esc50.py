"""A small ESC-50-shaped archive for tests: same csv columns and file naming, 50 classes,
5 folds, short clips at a low sample rate.

Each class is a tone whose pitch is set by its target, so the 5 categories occupy 5
separate frequency bands (and the 50 classes 50 pitches): a pipeline that works learns
them quickly, a broken one stays at chance.
"""
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from download import CLASSES

SAMPLE_RATE = 8000
SECONDS = 1.0


def tone_hz(target: int) -> float:
    """Class pitch: categories 600 Hz apart, classes 60 Hz apart inside a category."""
    return 300.0 + 60.0 * target


def make_clip(target: int, rng: np.random.Generator, sr: int = SAMPLE_RATE,
              seconds: float = SECONDS) -> np.ndarray:
    n = int(sr * seconds)
    t = np.arange(n) / sr
    env = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t + rng.uniform(0, 2 * np.pi))
    f = tone_hz(target) * (1 + 0.005 * rng.standard_normal())
    x = env * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    x = rng.uniform(0.2, 0.8) * x + 0.01 * rng.standard_normal(n)
    return x.astype(np.float32)


def make_fake_esc50(root, clips_per_fold: int = 2, fmt: str = "wav", sr: int = SAMPLE_RATE,
                    seconds: float = SECONDS, seed: int = 0) -> Path:
    """Write `root/ESC-50-master/{meta/esc50.csv, audio/*}` and return that directory.

    Per class and fold, `clips_per_fold` takes (A, B, ...) of one source recording, so
    clips that share a `src_file` always share a fold. `fmt` is the audio file format
    (wav, flac or ogg); the csv names `.wav` files as the real one does.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "ESC-50-master"
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for fold in range(1, 6):
        for target, name in enumerate(CLASSES):
            src = f"{100000 + 1000 * fold + target}"
            for take in "ABCDEFGH"[:clips_per_fold]:
                stem = f"{fold}-{src}-{take}-{target}"
                sf.write(base / "audio" / f"{stem}.{fmt}", make_clip(target, rng, sr, seconds), sr)
                rows.append(dict(filename=f"{stem}.wav", fold=fold, target=target, category=name,
                                 esc10=target < 10, src_file=src, take=take))
    pd.DataFrame(rows).to_csv(base / "meta" / "esc50.csv", index=False)
    return base


def zip_dir(directory, zip_path) -> Path:
    """Zip `directory` as GitHub's archive does: everything under one top-level folder."""
    directory, zip_path = Path(directory), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(directory.rglob("*")):
            z.write(p, Path(directory.name) / p.relative_to(directory))
    return zip_path
