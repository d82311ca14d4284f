"""Data: ESC-50 metadata, the waveform cache, leak-free fold splits, batches of waveforms,
and the two batched feature modules that run on the training device: `LogMel` and `Augment`.

    meta = load_meta("data/ESC-50")                  # one row per clip, `coarse` and `fine` labels
    waves = load_waveforms("data/ESC-50", 16000)     # (2000, 80000) float16, decoded once, cached
    train, val, test = splits(meta, test_fold=5)     # val fold 4, train folds 1-3
    loader = make_loader(WaveformDataset(waves, meta.loc[train, "coarse"], crop=40000), 32, shuffle=True)

`python dataset.py --root data` builds (or checks) the cache and prints the fold sizes.
"""
import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from tqdm import tqdm

from download import CATEGORIES, CLASSES, CLASSES_PER_CATEGORY, find_clip
from train import atomic_write

CACHE_VERSION = 1  # bump when the cache format changes


def load_meta(data_dir) -> pd.DataFrame:
    """esc50.csv with two label columns added: `fine` (target, 0-49) and `coarse` (category, 0-4)."""
    meta = pd.read_csv(Path(data_dir) / "meta" / "esc50.csv")
    meta["fine"] = meta["target"]
    meta["coarse"] = meta["target"] // CLASSES_PER_CATEGORY
    return meta


def class_names(task: str) -> list:
    """Label names of a task, in label order."""
    return {"coarse": CATEGORIES, "fine": CLASSES}[task]


# ---------------------------------------------------------------- waveform cache

def _audio_key(data_dir: Path, meta: pd.DataFrame, sample_rate: int) -> str:
    """Changes when the csv, any audio file (size or mtime) or the rate changes; costs one stat per file."""
    h = hashlib.sha256((Path(data_dir) / "meta" / "esc50.csv").read_bytes())
    for name in meta["filename"]:
        st = find_clip(Path(data_dir) / "audio", name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(f"sr={sample_rate};v={CACHE_VERSION}".encode())
    return h.hexdigest()


def read_audio(path, sample_rate: int) -> torch.Tensor:
    """Decode any soundfile-readable file to a mono float32 tensor at `sample_rate`: (T,)."""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for truncated or non-audio files
        raise ValueError(f"could not decode audio file {path}: {e}. Re-install the data "
                         "(python download.py --force) or remove the file.") from None
    x = torch.from_numpy(x.mean(axis=1))
    if sr != sample_rate:
        x = torchaudio.functional.resample(x, sr, sample_rate)
    return x


def fit_length(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad or trim the last axis to `n` samples."""
    return F.pad(x, (0, n - x.shape[-1])) if x.shape[-1] < n else x[..., :n]


def load_waveforms(data_dir, sample_rate: int = 16000, cache_dir=None, meta=None) -> np.ndarray:
    """All clips as one (N, samples) float16 array in csv order, from the cache when valid.
    Every clip is padded or trimmed to the length of the first (5 s in ESC-50).

    The first call decodes and resamples every clip and writes `cache_dir/esc50_{rate}.npy`
    (default cache_dir: `<data_dir>/../cache`); later calls memory-map it. The cache is rebuilt
    when the csv, any audio file or the rate changes.
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir) if meta is None else meta
    cache_dir = Path(cache_dir) if cache_dir else data_dir.parent / "cache"
    path = cache_dir / f"esc50_{sample_rate}.npy"
    key_path = path.with_suffix(".json")
    key = _audio_key(data_dir, meta, sample_rate)
    if path.exists() and key_path.exists() and json.loads(key_path.read_text()).get("key") == key:
        return np.load(path, mmap_mode="r")

    first = sf.info(str(find_clip(data_dir / "audio", meta["filename"].iloc[0])))
    n = round(first.duration * sample_rate)  # 5 s in ESC-50; shorter in the tests' archive
    waves = np.zeros((len(meta), n), dtype=np.float16)
    t0 = time.time()
    for i, name in enumerate(tqdm(meta["filename"], desc=f"decoding ESC-50 at {sample_rate} Hz",
                                  unit="clip", leave=False)):
        waves[i] = fit_length(read_audio(find_clip(data_dir / "audio", name), sample_rate), n).numpy()
    cache_dir.mkdir(parents=True, exist_ok=True)

    def save(tmp):
        with open(tmp, "wb") as f:  # np.save on a path would append .npy to the temporary name
            np.save(f, waves)

    atomic_write(path, save)
    atomic_write(key_path, lambda tmp: tmp.write_text(
        json.dumps({"key": key, "sample_rate": sample_rate, "clips": len(meta)})))
    print(f"cached {len(meta)} clips at {sample_rate} Hz in {time.time() - t0:.0f} s -> {path}")
    return np.load(path, mmap_mode="r")


def cache_key(data_dir, sample_rate: int, cache_dir=None) -> str:
    """The key stored beside the waveform cache (a fingerprint of the audio and the rate)."""
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else data_dir.parent / "cache"
    return json.loads((cache_dir / f"esc50_{sample_rate}.json").read_text())["key"]


# ---------------------------------------------------------------- splits and batches

def fold_roles(test_fold: int, num_folds: int = 5) -> tuple:
    """(train folds, validation fold, test fold): validation is the fold before the test fold."""
    val_fold = (test_fold - 2) % num_folds + 1
    train = tuple(f for f in range(1, num_folds + 1) if f not in (test_fold, val_fold))
    return train, val_fold, test_fold


def splits(meta: pd.DataFrame, test_fold: int = 5) -> tuple:
    """Row indices (train, val, test) by official fold. Raises if clips of one source recording
    and class fall into two splits."""
    if test_fold not in set(meta["fold"]):
        raise ValueError(f"test_fold={test_fold} is not a fold of the metadata {sorted(set(meta['fold']))}")
    train_folds, val_fold, _ = fold_roles(test_fold, meta["fold"].nunique())
    parts = (np.flatnonzero(meta["fold"].isin(train_folds)), np.flatnonzero(meta["fold"] == val_fold),
             np.flatnonzero(meta["fold"] == test_fold))
    # A recording's clips of one class share a fold. The official folds split 4 recordings
    # across folds under two different classes (hen/rooster, clock_tick/clock_alarm); those
    # are kept as they are, so the check is per (recording, class).
    sources = [set(zip(meta["src_file"].iloc[p], meta["target"].iloc[p])) for p in parts]
    shared = (sources[0] & sources[1]) | (sources[0] & sources[2]) | (sources[1] & sources[2])
    if shared:
        raise ValueError(f"clips of one recording and class in more than one split: {sorted(shared)[:5]}; "
                         "esc50.csv's folds are not the official ones")
    return parts


def block_energy(waves: np.ndarray, block: int) -> np.ndarray:
    """Energy (sum of squares, float32) of each whole `block` of samples: (clips, T // block).
    Works through 256 clips at a time, so a float16 cache is never copied whole."""
    n = waves.shape[1] // block
    return np.concatenate([(np.asarray(waves[i:i + 256, :n * block], dtype=np.float32).reshape(-1, n, block) ** 2)
                           .sum(-1) for i in range(0, len(waves), 256)])


class WaveformDataset(torch.utils.data.Dataset):
    """Cached waveforms and labels. `crop`: samples per training example, taken at a random
    offset (None: the whole clip). With `min_energy` > 0 the offset is drawn only among crops
    holding at least that fraction of the clip's loudest crop's energy (measured in blocks of
    crop / 25 samples), so a short event padded with silence does not yield silent crops that
    carry its label. Fetches whole batches at once through `__getitems__`, so a batch costs one
    fancy-index of the array, not a Python call per clip."""

    def __init__(self, waves: np.ndarray, labels, crop: int = None, min_energy: float = 0.0):
        self.waves, self.labels = waves, torch.tensor(np.asarray(labels), dtype=torch.long)
        self.crop = crop if crop and crop < waves.shape[1] else None
        self.allowed = None  # (clips, block offsets): crops that may be drawn
        if self.crop is not None and min_energy > 0:
            self.block = max(1, self.crop // 25)
            energy = block_energy(waves, self.block)
            k = self.crop // self.block
            total = np.cumsum(np.pad(energy, ((0, 0), (1, 0))), axis=1)
            window = total[:, k:] - total[:, :-k]  # energy of the crop starting at each block
            self.allowed = torch.from_numpy(window >= min_energy * window.max(axis=1, keepdims=True))

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, idx: list) -> tuple:
        """Waveforms (B, T) in the array's dtype (float16 from the cache, half the bytes to copy; the
        training loop converts them to float32 on its device) and labels (B,)."""
        idx = np.asarray(idx)
        if self.crop is None:
            x = self.waves[idx]
        else:
            last = self.waves.shape[1] - self.crop
            if self.allowed is None:
                start = torch.randint(0, last + 1, (len(idx),))
            else:
                block = torch.multinomial(self.allowed[idx].float(), 1)[:, 0]
                start = (block * self.block + torch.randint(0, self.block, (len(idx),))).clamp_max(last)
            x = np.stack([self.waves[i, s:s + self.crop] for i, s in zip(idx, start.tolist())])  # the crops alone
        return torch.from_numpy(x), self.labels[idx]  # both branches made a fresh contiguous copy

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]


def make_loader(dataset, batch_size: int, shuffle: bool = False, sampler=None, drop_last: bool = False):
    """A DataLoader that hands whole index lists to `__getitems__` (no per-item collate)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, drop_last=drop_last, collate_fn=_whole_batch)


def _whole_batch(batch):
    return batch


# ---------------------------------------------------------------- features and augmentation

class LogMel(nn.Module):
    """Waveforms (B, T) -> normalised log-mel (B, 1, n_mels, T // hop + 1), in float32 on the
    batch's device (also under autocast). Values in dB are floored `top_db` below each clip's
    peak, then standardised with a mean and std measured on training clips (`fit_stats`)."""

    def __init__(self, sample_rate=16000, n_fft=1024, hop_length=160, n_mels=64, f_min=0.0,
                 f_max=None, top_db=80.0):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop_length,
                                                        n_mels=n_mels, f_min=f_min, f_max=f_max, power=2.0)
        self.top_db = top_db
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0))

    def db(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):
            x = 10 * torch.log10(self.mel(wave.float()).clamp_min(1e-10))  # (B, n_mels, frames)
        return torch.maximum(x, x.amax(dim=(-2, -1), keepdim=True) - self.top_db)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return ((self.db(wave) - self.mean) / self.std).unsqueeze(1)  # (B, 1, n_mels, frames)

    @torch.no_grad()
    def fit_stats(self, loader):
        """Set mean and std from the batches of `loader` (training clips only)."""
        s = s2 = n = 0.0
        for wave, _ in loader:
            x = self.db(wave.to(self.mean.device)).double()
            s, s2, n = s + x.sum().item(), s2 + (x * x).sum().item(), n + x.numel()
        self.mean.fill_(s / n)
        self.std.fill_(math.sqrt(max(s2 / n - (s / n) ** 2, 1e-12)))
        return self


class Augment(nn.Module):
    """Training-time augmentation of a normalised log-mel batch (B, 1, F, T), on its device.

    Each piece is off when its strength is 0: gain (+-dB, a shift of the whole log-mel),
    time stretch (rate in [1/s, s], resampled along time with `grid_sample`), pitch shift (up to
    +-`pitch` semitones: each mel bin reads the frequency 2^(-semitones/12) times its own, on the
    HTK mel scale of `mel_range`, in the same `grid_sample`), circular time
    shift (fraction of the frames), SpecAugment time and frequency masks (count and maximum
    width), and mixup (Beta(alpha, alpha) blend of the batch with a permutation of itself).
    `forward(x, y)` returns the batch and soft targets (B, num_classes); `y` holds labels (B,)
    or soft targets from `mix`. In eval mode it returns its input and targets unchanged.

    With `mixup_domain="wave"`, mixup blends the waveforms before the features instead
    (`mix`, called on the waveform batch), with the gain-aware ratio of between-class learning.
    """

    def __init__(self, num_classes: int, db_per_unit: float = 1.0, gain_db=6.0, stretch=1.2, shift=0.5,
                 time_masks=2, time_mask_frames=20, freq_masks=2, freq_mask_bins=8, mixup_alpha=0.0,
                 mixup_domain="logmel", pitch=0.0, mel_range=(0.0, 8000.0)):
        super().__init__()
        if mixup_domain not in ("logmel", "wave"):
            raise ValueError(f"mixup_domain {mixup_domain!r}: choose logmel or wave")
        self.num_classes, self.db_per_unit = num_classes, db_per_unit
        self.gain_db, self.stretch, self.shift, self.mixup_alpha = gain_db, stretch, shift, mixup_alpha
        self.mixup_domain, self.pitch, self.mel_range = mixup_domain, pitch, mel_range
        self.masks = nn.Sequential(
            *[torchaudio.transforms.TimeMasking(time_mask_frames, iid_masks=True) for _ in range(time_masks)],
            *[torchaudio.transforms.FrequencyMasking(freq_mask_bins, iid_masks=True) for _ in range(freq_masks)])

    def _pitch_rows(self, b: int, f: int, dev, semitones=None) -> torch.Tensor:
        """Source row of each output mel bin, (B, F) in grid_sample's [-1, 1], for a pitch shift
        of `semitones` (B, 1), or a random one of up to +-pitch when None."""
        if semitones is None and not self.pitch:
            return self._centres(f, dev).expand(b, f)
        if semitones is None:
            semitones = (torch.rand(b, 1, device=dev) * 2 - 1) * self.pitch
        k = torch.arange(f, device=dev, dtype=torch.float32)
        mel = lambda hz: 2595 * torch.log10(1 + hz / 700)  # noqa: E731  (torchaudio's default, HTK)
        lo, hi = (mel(torch.tensor(float(hz), device=dev)) for hz in self.mel_range)
        step = (hi - lo) / (f + 1)  # bin k is centred at mel lo + (k + 1) * step
        centre_hz = 700 * (10 ** ((lo + (k + 1) * step) / 2595) - 1)
        ratio = 2 ** (semitones / 12)  # > 1 raises the pitch
        src = (mel(centre_hz / ratio) - lo) / step - 1  # fractional source bin
        return (2 * src + 1) / f - 1

    @staticmethod
    def _centres(n: int, dev) -> torch.Tensor:
        """The n pixel centres along one axis in grid_sample's [-1, 1] (as F.affine_grid): no warp."""
        return torch.linspace(-1, 1, n, device=dev) * (n - 1) / n

    @staticmethod
    def _warp(x: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Resample x (B, 1, F, T): output frame j reads time cols[:, j], mel bin i reads rows[:, i]."""
        b, t = x.shape[0], x.shape[-1]
        grid = torch.stack(torch.broadcast_tensors(cols.expand(b, t)[:, None, :], rows[:, :, None]), -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def shift_pitch(self, x: torch.Tensor, semitones: float) -> torch.Tensor:
        """The training pitch warp, fixed at `semitones` for the whole batch (B, 1, F, T), in
        either mode: for averaging predictions over pitch shifts at test time."""
        b, (f, t), dev = x.shape[0], x.shape[-2:], x.device
        rows = self._pitch_rows(b, f, dev, torch.full((b, 1), float(semitones), device=dev))
        return self._warp(x, self._centres(t, dev), rows)

    def _mix_weights(self, b: int, dev) -> tuple:
        lam = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample((b,)).to(dev)
        lam = torch.maximum(lam, 1 - lam)  # the first clip dominates, so its label stays the hard one
        return lam, torch.randperm(b, device=dev)

    def mix(self, wave: torch.Tensor, y: torch.Tensor) -> tuple:
        """Between-class mixing of a waveform batch (B, T) (Tokozume et al., ICLR 2018): a blend
        with a permutation of itself, each clip's loudness (its loudest window of 1024 samples, unweighted)
        taken into account so that the mixture sounds lam : 1 - lam; the targets are blended by
        lam. Returns the batch and soft targets (B, num_classes); a no-op unless training with
        `mixup_domain="wave"`."""
        target = F.one_hot(y, self.num_classes).float()
        if not (self.training and self.mixup_domain == "wave" and self.mixup_alpha > 0):
            return wave, target
        lam, perm = self._mix_weights(wave.shape[0], wave.device)
        win = min(1024, wave.shape[-1])
        frames = wave.float().unfold(-1, win, win // 2)  # (B, windows, win)
        gain = 10 * frames.pow(2).mean(-1).amax(-1).clamp_min(1e-10).log10()  # dB
        p = 1 / (1 + 10 ** ((gain - gain[perm]) / 20) * (1 - lam) / lam)
        wave = (p[:, None] * wave + (1 - p[:, None]) * wave[perm]) / (p ** 2 + (1 - p) ** 2).sqrt()[:, None]
        return wave, lam[:, None] * target + (1 - lam[:, None]) * target[perm]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        target = y.float() if y.dim() == 2 else F.one_hot(y, self.num_classes).float()
        if not self.training:
            return x, target
        b, dev = x.shape[0], x.device
        if self.gain_db:
            x = x + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.gain_db / self.db_per_unit
        if self.stretch > 1 or self.pitch:
            f, t = x.shape[-2:]
            cols = self._centres(t, dev)
            if self.stretch > 1:
                cols = self.stretch ** (torch.rand(b, 1, device=dev) * 2 - 1) * cols  # rate > 1 speeds up
            x = self._warp(x, cols, self._pitch_rows(b, f, dev))
        if self.shift:
            frames = x.shape[-1]
            offset = (torch.rand(b, device=dev) * self.shift * frames).long()  # (B,)
            cols = (torch.arange(frames, device=dev)[None, :] - offset[:, None]) % frames  # (B, T)
            x = x.gather(-1, cols[:, None, None, :].expand_as(x))
        x = self.masks(x)
        if self.mixup_alpha > 0 and self.mixup_domain == "logmel":
            lam, perm = self._mix_weights(b, dev)
            x = lam.view(b, 1, 1, 1) * x + (1 - lam.view(b, 1, 1, 1)) * x[perm]
            target = lam[:, None] * target + (1 - lam[:, None]) * target[perm]
        return x, target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data", help="folder holding ESC-50/ (see download.py)")
    p.add_argument("--sample-rate", type=int, default=16000, help="rate of the cached waveforms")
    args = p.parse_args(argv)
    data_dir = Path(args.root) / "ESC-50"
    meta = load_meta(data_dir)
    t0 = time.time()
    waves = load_waveforms(data_dir, args.sample_rate, meta=meta)
    print(f"waveforms {waves.shape} {waves.dtype} ready in {time.time() - t0:.1f} s")
    for k in range(1, 6):
        tr, va, te = splits(meta, k)
        print(f"test fold {k}: train {len(tr)}, val {len(va)}, test {len(te)}; "
              "no recording's clips of one class in two splits")


if __name__ == "__main__":
    main()
