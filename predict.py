"""Classify audio files with a trained checkpoint.

    python predict.py clip.wav other.flac                       # default: results/resnet18_coarse/fold5/best.pt
    python predict.py clip.wav --checkpoint results/<run>/fold<k>/best.pt --top 3
    python predict.py clip.wav --explain explanations/     # + overlay PNG and "what decided" WAV

Any length, sample rate and channel count: audio is downmixed, resampled to the
checkpoint's rate and scored over windows of the training clip length (5 s for ESC-50),
whose probabilities are averaged. A file
that cannot be decoded is reported by name; the others are still scored (exit status 1).
"""
import argparse
import sys
from pathlib import Path

import torch

from dataset import class_names, fit_length, read_audio
from explain import explain_files
from main import label_group, make_features
from model import build_model
from train import load_checkpoint, predict_proba

DEFAULT_CHECKPOINT = "results/resnet18_coarse/fold5/best.pt"


# what must agree between a checkpoint and what it is asked to do
COMPATIBLE = ("task", "num_classes", "sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max")


def describe(cfg: dict) -> dict:
    """The COMPATIBLE settings of a config dict (a checkpoint's or a run's config.json)."""
    return {**{k: cfg[k] for k in COMPATIBLE if k in cfg}, "num_classes": len(class_names(cfg["task"]))}


class Predictor:
    """A trained model with its LogMel and config, loaded from a checkpoint written by train.fit().

    `expect`: settings the caller relies on (a run's config.json, or e.g. {"task": "fine"});
    a checkpoint whose task, number of classes or spectrogram settings differ is refused
    with an error that names both sides."""

    def __init__(self, checkpoint=DEFAULT_CHECKPOINT, device="cpu", expect: dict = None):
        ck = load_checkpoint(checkpoint, device)
        self.path, self.cfg, self.device = Path(checkpoint), ck["config"], torch.device(device)
        have = describe(self.cfg)
        want = {**describe({**self.cfg, **(expect or {})}), **{k: v for k, v in (expect or {}).items()
                                                               if k == "num_classes"}}
        wrong = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
        if wrong:
            raise ValueError(f"checkpoint {checkpoint} does not fit what was asked: " + ", ".join(
                f"{k} is {a!r} in the checkpoint but {b!r} was asked" for k, (a, b) in wrong.items()))
        self.names = class_names(self.cfg["task"])
        self.group = label_group(self.cfg)
        self.features = make_features(self.cfg).to(self.device)
        self.features.load_state_dict(ck["features"])
        self.model = build_model(self.cfg["model"], len(self.names) * self.group, pool=self.cfg.get("pool", "avg"),
                                 stem_pool=self.cfg.get("stem_pool", True))
        self.model.load_state_dict(ck["model"])
        self.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.epoch, self.provenance = ck["epoch"], ck.get("provenance", {})
        self.window = ck.get("clip_samples", 5 * self.cfg["sample_rate"])  # the clip length it was trained on

    def __str__(self):
        p, c = self.provenance, self.cfg
        commit = (p.get("git_commit") or "unknown")[:10] + (" (uncommitted changes)" if p.get("git_dirty") else "")
        run = c.get("name") or f"{c['model']}_{c['task']}"
        return f"checkpoint {self.path}: run {run}, epoch {self.epoch}, {c['task']} task, commit {commit}"

    def windows(self, wave: torch.Tensor) -> torch.Tensor:
        """(T,) -> (W, window): windows of the training clip length (5 s), the last one zero-padded."""
        n = self.window
        count = max(1, -(-wave.shape[0] // n))
        return fit_length(wave, count * n).view(count, n)

    @torch.no_grad()
    def predict_wave(self, wave: torch.Tensor) -> torch.Tensor:
        """Task-label probabilities (C,) for a mono waveform at the checkpoint's rate."""
        return predict_proba(self.model, self.features, self.windows(wave), self.device,
                             group=self.group).mean(0)

    def predict_file(self, path) -> torch.Tensor:
        return self.predict_wave(read_audio(path, self.cfg["sample_rate"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, ...)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a best.pt or last.pt written by main.py")
    p.add_argument("--top", type=int, default=1, help="how many labels to print per file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--task", choices=("coarse", "fine"), help="refuse a checkpoint trained for another task")
    p.add_argument("--explain", metavar="OUT_DIR", help="also write, per file, an attribution overlay (PNG) and "
                   "the part of the sound that decided (WAV)")
    args = p.parse_args(argv)
    try:
        predictor = Predictor(args.checkpoint, args.device, expect={"task": args.task} if args.task else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(predictor)
    failed = 0
    for f in args.files:
        try:
            wave = read_audio(f, predictor.cfg["sample_rate"])
        except ValueError as e:
            print(f"{f}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = predictor.predict_wave(wave)
        top = probs.topk(min(args.top, len(probs)))
        print(f"{f}: " + ", ".join(f"{predictor.names[i]} {p:.3f}" for p, i in zip(top.values.tolist(),
                                                                                   top.indices.tolist())))
        if args.explain:
            png, wav = explain_files(predictor.model, predictor.features, [wave], [f], predictor.names,
                                     predictor.cfg, args.explain, group=predictor.group)
            print(f"  explanation: {png}, {wav}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
