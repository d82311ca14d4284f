import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def esc50(tmp_path_factory):
    """A verified, installed fake ESC-50 (1 clip per class and fold, 1 s at 8 kHz): data/ESC-50."""
    from download import ensure_esc50
    from fake_esc50 import make_fake_esc50
    base = tmp_path_factory.mktemp("esc50")
    src = make_fake_esc50(base / "src", clips_per_fold=1)
    return ensure_esc50(base / "data", source=src)


def tiny_args(tmp_path, esc50, *extra) -> list:
    """Command-line arguments of a run small enough for the tests: 32 mel bins at 8 kHz, float32
    (bf16 autocast on an AMX CPU is slower than float32 at these tiny shapes; test_train covers it),
    a weight average over ~10 steps (about an epoch of these runs; the default's 200 steps would
    outlast them)."""
    return ["--data-root", str(esc50.parent), "--results-dir", str(tmp_path / "results"),
            "--figures-dir", str(tmp_path / "figures"), "--sample-rate", "8000", "--n-fft", "256",
            "--hop-length", "64", "--n-mels", "32", "--crop-seconds", "0.5", "--batch-size", "16",
            "--time-mask-frames", "8", "--freq-mask-bins", "4", "--ema-decay", "0.9", "--device", "cpu", "--no-amp",
            *extra]
