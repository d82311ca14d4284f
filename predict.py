"""Classify audio files with a trained checkpoint.

    python predict.py clip.wav other.flac                       # default: results/resnet18_coarse/fold5/best.pt
    python predict.py clip.wav --checkpoint results/<run>/fold<k>/best.pt --top 3

Any length, sample rate and channel count: audio is downmixed, resampled to the
checkpoint's rate and scored over 5-second windows whose probabilities are averaged. A file
that cannot be decoded is reported by name; the others are still scored (exit status 1).
"""
import argparse
import sys
from pathlib import Path

import torch

from dataset import class_names, fit_length, read_audio
from main import make_features
from model import build_model
from train import load_checkpoint, predict_proba

WINDOW_SECONDS = 5  # the clip length the models are trained and evaluated on
DEFAULT_CHECKPOINT = "results/resnet18_coarse/fold5/best.pt"


class Predictor:
    """A trained model with its LogMel and config, loaded from a checkpoint written by train.fit()."""

    def __init__(self, checkpoint=DEFAULT_CHECKPOINT, device="cpu"):
        ck = load_checkpoint(checkpoint, device)
        self.path, self.cfg, self.device = Path(checkpoint), ck["config"], torch.device(device)
        self.names = class_names(self.cfg["task"])
        self.group = 10 if self.cfg["task"] == "coarse" and self.cfg.get("fine_supervision") else 1
        self.features = make_features(self.cfg).to(self.device)
        self.features.load_state_dict(ck["features"])
        self.model = build_model(self.cfg["model"], len(self.names) * self.group)
        self.model.load_state_dict(ck["model"])
        self.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.epoch = ck["epoch"]

    def windows(self, wave: torch.Tensor) -> torch.Tensor:
        """(T,) -> (W, window) 5-second windows, the last one zero-padded."""
        n = WINDOW_SECONDS * self.cfg["sample_rate"]
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
    args = p.parse_args(argv)
    try:
        predictor = Predictor(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = predictor.cfg
    print(f"checkpoint {predictor.path} (epoch {predictor.epoch}, {cfg['model']}, {cfg['task']} task)")
    failed = 0
    for f in args.files:
        try:
            probs = predictor.predict_file(f)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"{f}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        top = probs.topk(min(args.top, len(probs)))
        print(f"{f}: " + ", ".join(f"{predictor.names[i]} {p:.3f}" for p, i in zip(top.values.tolist(),
                                                                                   top.indices.tolist())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
