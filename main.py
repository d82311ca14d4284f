"""ESC-50 sound classification, end to end: data, training, test evaluation, CSVs and figures.

    python main.py                              # coarse task (5 categories), test fold 5
    python main.py --task fine --epochs 80      # any Config field can be overridden
    python main.py --cv                         # 5-fold cross-validation
    python main.py --cv --folds 1,2             # some folds now, the rest later

Edit the defaults in `Config` below. Results go to results/<name>/ and figures/<name>/
(name: {model}_{task} unless set). Fold k is tested on fold k, validated on fold k-1 and
trained on the other three. A fold whose test_metrics.csv exists is skipped; an interrupted
fold resumes from its last.pt; cv_summary.csv is written once all five folds exist. Folds
may run at once as separate processes (`--folds k` each, e.g. sharing one GPU), once the data
and its cache exist (`python download.py && python dataset.py`); on a CPU give each its share
of the cores (`OMP_NUM_THREADS=1` for two at once on two cores).
"""
import argparse
import hashlib
import inspect
import json
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import classification_report, confusion_matrix

from dataset import (Augment, LogMel, WaveformDataset, cache_key, class_names, load_meta, load_waveforms,
                     make_loader, splits)
from download import CATEGORIES, CLASSES_PER_CATEGORY, ensure_esc50
from explain import saliency_figure
from model import MODELS, POOLS, build_model
from train import (atomic_csv, atomic_write, evaluate, fit, is_main_process, load_checkpoint, scores,
                   setup_distributed, uses_bf16)


@dataclass
class Config:
    # task and data
    task: str = "coarse"  # coarse: 5 categories; fine: 50 classes
    fine_supervision: bool = True  # coarse task: learn the 50 classes, sum their probabilities per category
    data_root: str = "data"  # holds ESC-50/ (downloaded when missing) and cache/
    results_dir: str = "results"  # CSVs and checkpoints go to results/<name>/
    figures_dir: str = "figures"  # figures go to figures/<name>/
    name: str = ""  # run name; empty: {model}_{task}
    folds: str = "5"  # test folds to run now, comma-separated ("5", "1,2")
    cv: bool = False  # run all five folds (same as --folds 1,2,3,4,5)
    # features
    sample_rate: int = 16000  # Hz; the rate audio is resampled to and cached at
    n_fft: int = 1024  # STFT size (64 ms at 16 kHz)
    hop_length: int = 160  # STFT hop (10 ms at 16 kHz)
    n_mels: int = 64  # mel bins
    f_min: float = 0.0  # lowest mel frequency, Hz
    f_max: float = 0.0  # highest mel frequency, Hz; 0: sample_rate / 2
    crop_seconds: float = 2.5  # training crop at a random offset (time shift); evaluation sees the whole 5 s
    crop_min_energy: float = 0.25  # crops hold >= this share of the loudest crop's energy; 0: any offset (README)
    # augmentation (training only; 0 switches a piece off)
    gain_db: float = 6.0  # random gain in [-gain_db, +gain_db] dB
    stretch: float = 1.2  # time stretch by a factor in [1/stretch, stretch]
    pitch: float = 3.0  # pitch shift by up to +-pitch semitones, a warp of the mel axis (0 before: README)
    shift: float = 0.0  # circular time shift by up to this fraction of the frames
    time_masks: int = 2  # SpecAugment time masks
    time_mask_frames: int = 25  # their maximum width, frames
    freq_masks: int = 2  # SpecAugment frequency masks
    freq_mask_bins: int = 8  # their maximum width, mel bins
    mixup_alpha: float = 1.0  # mixup Beta(alpha, alpha); 0: off (0.4, 0.2 before: README, "What was tried")
    mixup_domain: str = "wave"  # wave: blend the waveforms, gain-aware (BC learning); logmel: the log-mels (README)
    # model and optimisation
    model: str = "resnet18"  # resnet18 or densenet121
    pretrained: bool = False  # start from torchvision's ImageNet weights
    dropout: float = 0.0  # dropout on the pooled features before the classifier; 0: off (0.5: README, "What was tried")
    pool: str = "meanmax"  # meanmax: mean over frequency, then max + mean over time (PANNs); avg: global mean (README)
    stem_pool: bool = True  # the stem's stride-2 max-pool; False: twice the resolution after it, ~3x the compute
    epochs: int = 100  # maximum epochs (100 against 50: README, "What was tried")
    patience: int = 30  # early stopping: epochs without a better validation accuracy
    batch_size: int = 32  # training batch size
    optimizer: str = "adamw"  # adamw, or sgd (Nesterov momentum 0.9; give it its own lr and weight_decay: README)
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.5  # weight decay (decoupled in AdamW, L2 in SGD); 0.2, 0.05 before ("What was tried")
    decay_norm_bias: bool = True  # decay BatchNorm weights and biases too (False: conv/linear weights only)
    schedule: str = "onecycle"  # onecycle, plateau or constant
    warmup: float = 0.1  # onecycle: fraction of the steps spent warming up
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    clip_grad_norm: float = 0.0  # gradient norm clipping; 0: off
    ema_decay: float = 0.995  # validate and save an EMA of the weights, decay per step (~200 steps); 0: off (README)
    # system
    seed: int = 0  # random seed (each fold adds its number)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16 (train.bf16_is_fast)
    compile: bool = False  # torch.compile the model
    resume: bool = True  # continue an interrupted fold from its last.pt

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}_{self.task}"

    @property
    def fold_list(self) -> list:
        return [1, 2, 3, 4, 5] if self.cv else [int(f) for f in self.folds.split(",")]

    @property
    def group(self) -> int:
        return label_group(asdict(self))


def label_group(cfg: dict) -> int:
    """Fine labels per model output summed into one task label (10 for coarse from fine)."""
    return CLASSES_PER_CATEGORY if cfg["task"] == "coarse" and cfg.get("fine_supervision") else 1


CHOICES = {"task": ("coarse", "fine"), "mixup_domain": ("logmel", "wave"), "model": tuple(MODELS), "pool": POOLS,
           "optimizer": ("adamw", "sgd"),
           "schedule": ("onecycle", "plateau", "constant"),
           "device": ("auto", "cuda", "mps", "cpu")}
# fields that may differ between sittings of one run without mixing results
RUN_CONTROL = ("folds", "cv", "device", "resume", "data_root", "results_dir", "figures_dir", "compile")


def validate(cfg: Config) -> Config:
    """Raise ValueError naming the field when a value cannot work."""
    def need(ok, field, what):
        if not ok:
            raise ValueError(f"--{field} {getattr(cfg, field)!r}: {what}")
    for f in ("sample_rate", "n_fft", "hop_length", "n_mels", "epochs", "patience", "batch_size", "lr",
              "crop_seconds"):
        need(getattr(cfg, f) > 0, f, "must be positive")
    for f in ("gain_db", "pitch", "shift", "time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins",
              "mixup_alpha", "weight_decay", "label_smoothing", "clip_grad_norm", "f_min", "f_max"):
        need(getattr(cfg, f) >= 0, f, "must be >= 0")
    need(cfg.stretch >= 1, "stretch", "must be >= 1 (1: off)")
    need(cfg.crop_seconds <= 5, "crop_seconds", "ESC-50 clips are 5 s long")
    need(0 <= cfg.crop_min_energy <= 1, "crop_min_energy", "must be in [0, 1] (0: crops at any offset)")
    need(cfg.f_max <= cfg.sample_rate / 2, "f_max", f"must be at most sample_rate / 2 = {cfg.sample_rate / 2}")
    need(cfg.f_max == 0 or cfg.f_min < cfg.f_max, "f_min", "must be below f_max")
    need(0 <= cfg.warmup < 1, "warmup", "must be in [0, 1)")
    need(cfg.label_smoothing < 1, "label_smoothing", "must be below 1")
    need(0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1) (0: off)")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1) (0: off)")
    need(cfg.freq_mask_bins < cfg.n_mels, "freq_mask_bins", "must be below n_mels")
    try:
        folds = cfg.fold_list
    except ValueError:
        folds = None
    need(folds and set(folds) <= {1, 2, 3, 4, 5}, "folds", "must be comma-separated numbers from 1 to 5")
    return cfg


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def parse_config(argv=None) -> Config:
    """Config with command-line overrides (`--epochs 30`, `--batch-size 64`, `--cv`, `--no-amp`).
    Unknown options and bad values exit with a message naming them."""
    base = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    comments = _field_comments()
    for f in fields(Config):
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        default = getattr(base, f.name)
        help_ = f"{comments.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(*names, dest=f.name, nargs="?", const=True, default=default, type=_bool, help=help_)
            p.add_argument(*sorted({f"--no-{f.name}", f"--no-{f.name.replace('_', '-')}"}), dest=f.name,
                           action="store_false", help=argparse.SUPPRESS)
        else:
            p.add_argument(*names, dest=f.name, default=default, type=type(default), choices=CHOICES.get(f.name),
                           help=help_)
    cfg = Config(**vars(p.parse_args(argv)))
    try:
        return validate(cfg)
    except ValueError as e:
        p.error(str(e))


def _field_comments() -> dict:
    """The `# comment` after each Config field, for --help."""
    out = {}
    for line in inspect.getsource(Config).splitlines():
        if ":" in line and "#" in line and "=" in line:
            out[line.split(":")[0].strip()] = line.split("#", 1)[1].strip()
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: not available on this machine; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- provenance

def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(cfg: Config, data_dir: Path, device: torch.device) -> dict:
    """What made a result: command, code version, library versions, device, seed and data."""
    import sklearn
    import torchaudio
    import torchvision
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchaudio": torchaudio.__version__, "torchvision": torchvision.__version__,
                     "numpy": np.__version__, "scikit-learn": sklearn.__version__, "pandas": pd.__version__},
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else _cpu_name(), "threads": torch.get_num_threads(),
                   "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                   "precision": "bfloat16" if uses_bf16(device, cfg.amp) else "float32"},
        "seed": cfg.seed,
        "data": {"esc50_csv_sha256": hashlib.sha256((data_dir / "meta" / "esc50.csv").read_bytes()).hexdigest(),
                 "waveform_cache_key": cache_key(data_dir, cfg.sample_rate)},
    }


def write_run_json(record: dict, t0: float, path: Path, **more) -> None:
    """`record` with `more`, the start (t0) and end times and the wall seconds, written atomically."""
    stamp = "%Y-%m-%dT%H:%M:%S%z"
    record = {**record, **more, "started": time.strftime(stamp, time.localtime(t0)), "ended": time.strftime(stamp),
              "wall_seconds": round(time.time() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


# ---------------------------------------------------------------- building blocks shared with predict.py

def make_features(cfg) -> LogMel:
    """The LogMel of a config (a Config or the dict saved in a checkpoint)."""
    c = cfg if isinstance(cfg, dict) else asdict(cfg)
    return LogMel(c["sample_rate"], c["n_fft"], c["hop_length"], c["n_mels"], c["f_min"], c["f_max"] or None)


def make_augment(cfg: Config, features: LogMel) -> Augment:
    """The Augment of a config, its gain in the units of `features` (normalised dB)."""
    return Augment(num_outputs(cfg), features.std.item(), cfg.gain_db, cfg.stretch, cfg.shift, cfg.time_masks,
                   cfg.time_mask_frames, cfg.freq_masks, cfg.freq_mask_bins, cfg.mixup_alpha, cfg.mixup_domain,
                   cfg.pitch, (cfg.f_min, cfg.f_max or cfg.sample_rate / 2))


def num_outputs(cfg: Config) -> int:
    return len(class_names(cfg.task)) * cfg.group


def make_model(cfg: Config):
    """The network of a config, on the CPU: from scratch, or ImageNet-initialised with `pretrained`."""
    return build_model(cfg.model, num_outputs(cfg), cfg.pretrained, cfg.dropout, cfg.pool, cfg.stem_pool)


# ---------------------------------------------------------------- one fold

def prepare_fold(cfg: Config, meta: pd.DataFrame, waves: np.ndarray, test_fold: int, device) -> dict:
    """Seeded model, LogMel (statistics from the training folds), Augment and the three loaders
    of one fold."""
    seed_everything(cfg.seed + test_fold)
    tr, va, te = splits(meta, test_fold)
    train_labels = meta["fine" if cfg.group > 1 else cfg.task].to_numpy()
    labels = meta[cfg.task].to_numpy()
    train_waves = np.asarray(waves[tr])
    train_ds = WaveformDataset(train_waves, train_labels[tr], crop=int(cfg.crop_seconds * cfg.sample_rate),
                               min_energy=cfg.crop_min_energy)
    sampler = None
    if torch.distributed.is_initialized():
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, seed=cfg.seed)
    features = make_features(cfg).to(device)
    features.fit_stats(make_loader(WaveformDataset(train_waves, train_labels[tr]), 2 * cfg.batch_size))
    return dict(
        rows=(tr, va, te), features=features,
        augment=make_augment(cfg, features),
        model=make_model(cfg),
        train=make_loader(train_ds, cfg.batch_size, shuffle=True, sampler=sampler, drop_last=True),
        val=make_loader(WaveformDataset(np.asarray(waves[va]), labels[va]), 2 * cfg.batch_size),
        test=make_loader(WaveformDataset(np.asarray(waves[te]), labels[te]), 2 * cfg.batch_size))


def run_fold(cfg: Config, meta: pd.DataFrame, waves: np.ndarray, test_fold: int, device, run_dir: Path,
             fig_dir: Path, extra: dict) -> dict:
    """Train on the training folds, pick the epoch on the validation fold, test the best
    checkpoint once on `test_fold`; write the fold's CSVs, figures and run.json. `extra` goes into
    the checkpoints (the provenance record, the clip length). Returns test metrics."""
    t0 = time.time()
    out, figs = run_dir / f"fold{test_fold}", fig_dir / f"fold{test_fold}"
    f = prepare_fold(cfg, meta, waves, test_fold, device)
    model, features, (tr, va, te) = f["model"], f["features"], f["rows"]
    if is_main_process():
        print(f"fold {test_fold}: train {len(tr)} clips, validation {len(va)} (fold {meta.fold[va[0]]}), "
              f"test {len(te)}; {device}; results -> {out}")
    history = fit(model, features, f["augment"], f["train"], f["val"], cfg, out, device, group=cfg.group,
                  resume=cfg.resume, extra=extra)
    if not is_main_process():
        return {}

    best = load_checkpoint(out / "best.pt", device)
    model.load_state_dict(best["model"])
    features.load_state_dict(best["features"])
    m = evaluate(model, features, f["test"], device, group=cfg.group, amp=cfg.amp)
    write_fold_outputs(cfg, meta.iloc[te], m, history, best["epoch"], out, figs, waves[te], features, model)
    write_run_json(extra["provenance"], t0, out / "run.json", test_fold=test_fold)
    print(f"fold {test_fold}: test accuracy {m['accuracy']:.4f} with the checkpoint of epoch {best['epoch']} "
          f"(validation {history['val_accuracy'].max():.4f}) -> {out / 'test_metrics.csv'}")
    return {k: m[k] for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1")}


def write_fold_outputs(cfg, test_meta, m, history, best_epoch, out: Path, figs: Path, test_waves, features, model):
    """predictions, confusion matrix, classification report, figures; test_metrics.csv last,
    because its presence marks the fold as complete."""
    names = class_names(cfg.task)
    pred = m["probs"].argmax(1)
    preds = pd.DataFrame({"filename": test_meta["filename"].to_numpy(), "fold": test_meta["fold"].to_numpy(),
                          "true": [names[i] for i in m["targets"]], "predicted": [names[i] for i in pred]})
    preds = pd.concat([preds, pd.DataFrame(m["probs"], columns=[f"p_{n}" for n in names])], axis=1)
    atomic_csv(preds, out / "predictions.csv", index=False, float_format="%.5f")
    cm = pd.DataFrame(confusion_matrix(m["targets"], pred, labels=range(len(names))), index=names, columns=names)
    atomic_csv(cm.rename_axis("true \\ predicted"), out / "confusion_matrix.csv")
    report = classification_report(m["targets"], pred, labels=range(len(names)), target_names=names,
                                   output_dict=True, zero_division=0)
    atomic_csv(pd.DataFrame(report).T.rename_axis("class"), out / "classification_report.csv", float_format="%.4f")
    fold_figures(cfg, history, best_epoch, cm, preds, test_waves, features, figs)
    if len(names) <= 10:  # one row per label: readable for the 5 categories, not for 50 classes
        saliency_figure(model, features, test_waves, m["targets"], pred, names, cfg,
                        figs / f"{cfg.model}_saliency.png", group=cfg.group)
    row = {"test_fold": int(test_meta["fold"].iloc[0]), "best_epoch": best_epoch, "epochs": len(history),
           "train_seconds": float(history["seconds"].sum()),
           **{k: m[k] for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1")}}
    if cfg.task == "fine":  # the same predictions scored on the 5 categories (class probabilities summed)
        cat = scores(torch.from_numpy(m["probs"]), torch.from_numpy(m["targets"]), CLASSES_PER_CATEGORY)
        row.update({f"category_{k}": v for k, v in cat.items()})
    metrics = pd.DataFrame([row])
    atomic_csv(metrics, out / "test_metrics.csv", index=False, float_format="%.4f")


def cv_summary(run_dir: Path) -> pd.DataFrame | None:
    """One row per fold, then mean and std; None until all five folds have test metrics."""
    paths = [run_dir / f"fold{k}" / "test_metrics.csv" for k in range(1, 6)]
    if not all(p.exists() for p in paths):
        return None
    df = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    df["test_fold"] = df["test_fold"].astype(str)
    num = df.drop(columns="test_fold")
    stats = pd.DataFrame([num.mean(), num.std()]).round(4).assign(test_fold=["mean", "std"])
    return pd.concat([df, stats], ignore_index=True)


# ---------------------------------------------------------------- figures (drawn from the CSVs' data)

def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], dpi=110, bbox_inches="tight"))
    import matplotlib.pyplot as plt
    plt.close(fig)


def _show_logmel(ax, db: np.ndarray, cfg, fig=None, label="dB"):
    """A log-mel (n_mels, frames) in dB with time in seconds and mel bins on the axes."""
    seconds = db.shape[1] * cfg["hop_length"] / cfg["sample_rate"]
    im = ax.imshow(db, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, db.shape[0]))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    if fig is not None:
        fig.colorbar(im, ax=ax, label=label)
    return im


def _sample_rows(meta: pd.DataFrame, n_per_category: int = 2, seed: int = 0) -> pd.DataFrame:
    return meta.groupby("coarse", group_keys=False).sample(n_per_category, random_state=seed)


def data_figures(cfg: Config, meta: pd.DataFrame, waves: np.ndarray, features: LogMel, fig_dir: Path) -> None:
    """samples_per_class, random_waveform_samples, random_log_spectrogram_samples (once per run)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    c = asdict(cfg)
    names = class_names(cfg.task)
    path = fig_dir / "samples_per_class.png"
    if not path.exists():
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.3), 4))
        counts = pd.crosstab(meta[cfg.task].map(dict(enumerate(names))), meta["fold"]).reindex(names)
        counts.plot.bar(stacked=True, ax=ax, colormap="viridis", width=0.8)
        ax.set(title=f"ESC-50 clips per {'category' if cfg.task == 'coarse' else 'class'}, by fold",
               xlabel="", ylabel="clips")
        ax.legend(title="fold", bbox_to_anchor=(1.01, 1), loc="upper left")
        _save(fig, path)
    rows = _sample_rows(meta)
    titles = [f"{r.category} ({CATEGORIES[r.coarse]})" for r in rows.itertuples()]
    x = torch.from_numpy(np.asarray(waves[rows.index.to_numpy()], dtype=np.float32))
    path = fig_dir / "random_waveform_samples.png"
    if not path.exists():
        fig, axes = plt.subplots(len(rows) // 2, 2, figsize=(12, 2 * len(rows) // 2), sharex=True)
        t = np.arange(x.shape[1]) / cfg.sample_rate
        for ax, w, title in zip(axes.flat, x.numpy(), titles):
            ax.plot(t, w, lw=0.4)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("amplitude")
        for ax in axes[-1]:
            ax.set_xlabel("time (s)")
        fig.suptitle("Random clips, two per category")
        fig.tight_layout()
        _save(fig, path)
    path = fig_dir / "random_log_spectrogram_samples.png"
    if not path.exists():
        db = features.db(x).numpy()
        fig, axes = plt.subplots(len(rows) // 2, 2, figsize=(12, 2.2 * len(rows) // 2))
        for ax, d, title in zip(axes.flat, db, titles):
            _show_logmel(ax, d, c, fig)
            ax.set_title(title, fontsize=9)
        fig.suptitle(f"Log-mel spectrograms ({cfg.n_mels} mel bins, hop {cfg.hop_length}), same clips")
        fig.tight_layout()
        _save(fig, path)
    sns.reset_orig()


def fold_figures(cfg, history: pd.DataFrame, best_epoch: int, cm: pd.DataFrame, preds: pd.DataFrame, test_waves,
                 features, fig_dir: Path) -> None:
    """Confusion matrix, loss and accuracy curves, and random test spectrograms with predictions."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    m = cfg.model
    big = len(cm) > 10
    fig, ax = plt.subplots(figsize=(14, 12) if big else (6.5, 5.5))
    sns.heatmap(cm, annot=not big, fmt="d", cmap="Blues", ax=ax, cbar_kws={"label": "clips"},
                xticklabels=True, yticklabels=True)
    acc = np.trace(cm.to_numpy()) / cm.to_numpy().sum()
    ax.set(title=f"{m} confusion matrix, test fold {preds['fold'].iloc[0]} (accuracy {acc:.3f})",
           xlabel="predicted", ylabel="true")
    _save(fig, fig_dir / f"{m}_confusion_matrix.png")
    # training rows are measured on augmented crops (mixup, label smoothing), against the 50
    # classes when the coarse model learns them; validation rows on whole clips and task labels
    fine = ", 50-class targets" if cfg.group > 1 else ""
    for metric in ("loss", "accuracy"):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(history["epoch"], history[f"train_{metric}"], label=f"train (augmented{fine * (metric == 'loss')})")
        ax.plot(history["epoch"], history[f"val_{metric}"], label="validation")
        ax.axvline(best_epoch, color="grey", ls="--", lw=0.8, label=f"tested epoch ({best_epoch})")
        ax.set(title=f"{m} {metric}", xlabel="epoch", ylabel=metric)
        ax.legend()
        _save(fig, fig_dir / f"{m}_{metric}.png")
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(preds), size=min(10, len(preds)), replace=False))
    db = features.db(torch.from_numpy(np.asarray(test_waves[pick], dtype=np.float32)).to(features.mean.device))
    fig, axes = plt.subplots(5, 2, figsize=(12, 11))
    for ax, d, i in zip(axes.flat, db.cpu().numpy(), pick):
        r = preds.iloc[i]
        _show_logmel(ax, d, asdict(cfg), fig)
        ok = r["true"] == r["predicted"]
        ax.set_title(f"{r['filename']}  true: {r['true']}  predicted: {r['predicted']} "
                     f"({r['p_' + r['predicted']]:.2f})", fontsize=8, color="green" if ok else "red")
    for ax in axes.flat[len(pick):]:
        ax.axis("off")
    fig.suptitle(f"{m}: random test clips, true and predicted labels (green: correct)")
    fig.tight_layout()
    _save(fig, fig_dir / "random_log_spectrogram_samples_predictions.png")


def cv_figure(cfg, summary: pd.DataFrame, fig_dir: Path) -> None:
    import matplotlib.pyplot as plt
    folds = summary[~summary["test_fold"].isin(["mean", "std"])]
    mean, std = summary.iloc[-2]["accuracy"], summary.iloc[-1]["accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(folds["test_fold"], folds["accuracy"], color="steelblue")
    ax.axhline(mean, color="black", lw=1, label=f"mean {mean:.3f} +- {std:.3f}")
    ax.axhspan(mean - std, mean + std, color="grey", alpha=0.2)
    for x, a in zip(folds["test_fold"], folds["accuracy"]):
        ax.text(x, a + 0.005, f"{a:.3f}", ha="center", fontsize=8)
    ax.set(title=f"{cfg.model} {cfg.task}: test accuracy per fold (5-fold CV)", xlabel="test fold",
           ylabel="accuracy", ylim=(max(0, folds["accuracy"].min() - 0.1), 1))
    ax.legend(loc="lower right")
    _save(fig, fig_dir / f"{cfg.model}_cv_accuracy.png")


# ---------------------------------------------------------------- main

def check_run_config(cfg: Config, run_dir: Path) -> None:
    """Write config.json, or refuse when the run folder holds results of another config."""
    path = run_dir / "config.json"
    now = {k: v for k, v in asdict(cfg).items() if k not in RUN_CONTROL}
    if path.exists():
        # a setting added after the run was made is missing there and reads as its default, so a
        # new setting's default must be what the code did before it (decay_norm_bias=True)
        before = {**asdict(Config()), **json.loads(path.read_text())}
        diff = {k: (before[k], v) for k, v in now.items() if before[k] != v}
        if diff:
            raise ValueError(f"{run_dir} holds results made with another config "
                             f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}). "
                             "Choose another --name, or delete that folder to start over.")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(cfg), indent=2) + "\n"))


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler's stop) ends a run like Ctrl-C: last.pt stays valid


def main(argv=None) -> int:
    cfg = parse_config(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.time()
    ddp_device = setup_distributed()
    try:
        device = ddp_device or resolve_device(cfg.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    run_dir, fig_dir = Path(cfg.results_dir) / cfg.run_name, Path(cfg.figures_dir) / cfg.run_name
    try:
        data_dir = Path(cfg.data_root) / "ESC-50"
        if is_main_process():  # rank 0 downloads and caches, the others wait and read
            load_waveforms(ensure_esc50(cfg.data_root), cfg.sample_rate)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        meta = load_meta(data_dir)
        waves = load_waveforms(data_dir, cfg.sample_rate, meta=meta)
        # before config.json is rewritten: in a checkout with the run committed, a later fold's
        # new "folds" would otherwise read as uncommitted code (git_dirty)
        record = provenance(cfg, data_dir, device)
        if is_main_process():
            check_run_config(cfg, run_dir)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if is_main_process():
        data_figures(cfg, meta, waves, make_features(cfg), fig_dir)
    results = {}
    try:
        for k in cfg.fold_list:
            done = run_dir / f"fold{k}" / "test_metrics.csv"
            if done.exists():
                print(f"fold {k}: complete, skipped ({done})")
                results[k] = pd.read_csv(done).iloc[0].to_dict()
                continue
            results[k] = run_fold(cfg, meta, waves, k, device, run_dir, fig_dir,
                                  extra={"provenance": record, "clip_samples": waves.shape[1]})
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    if not is_main_process():
        return 0

    summary = cv_summary(run_dir)
    write_run_json(record, t0, run_dir / "run.json", folds_run=[k for k in results],
                   cv_summary_written=summary is not None)
    if summary is not None:
        atomic_csv(summary, run_dir / "cv_summary.csv", index=False, float_format="%.10g")
        cv_figure(cfg, summary, fig_dir)
    print(f"\n{cfg.run_name}: {cfg.task} task ({len(class_names(cfg.task))} classes), {time.time() - t0:.0f} s")
    for k, r in results.items():
        print(f"  test fold {k}: accuracy {r['accuracy']:.3f}  balanced {r['balanced_accuracy']:.3f}  "
              f"macro F1 {r['macro_f1']:.3f}")
    if summary is not None:
        mean, std = summary.iloc[-2], summary.iloc[-1]
        print(f"  5-fold CV: accuracy {mean['accuracy']:.3f} +- {std['accuracy']:.3f}  -> {run_dir / 'cv_summary.csv'}")
        if "category_accuracy" in summary:
            print(f"  5-fold CV, the same predictions on the 5 categories: accuracy "
                  f"{mean['category_accuracy']:.3f} +- {std['category_accuracy']:.3f}")
    else:
        missing = [k for k in range(1, 6) if not (run_dir / f"fold{k}" / "test_metrics.csv").exists()]
        if len(missing) < 5 and (cfg.cv or len(cfg.fold_list) > 1):
            print(f"  CV summary waits for folds {missing} (python main.py --folds {','.join(map(str, missing))})")
    print(f"  results: {run_dir}/\n  figures: {fig_dir}/")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(code)
