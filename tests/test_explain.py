"""explain.py on 1 s clips at 8 kHz: map shapes and ranges, a model that reads one band of mel
bins gets its map (and its listenable explanation) in that band, and the files are written."""
import numpy as np
import soundfile as sf
import torch
from torch import nn

from dataset import LogMel, WaveformDataset, make_loader
from explain import attribute, explain_files, mask_audio, saliency_figure
from model import build_model

SR, N_FFT, HOP, N_MELS = 8000, 256, 64, 32
LO, HI = 12, 18  # the mel bins the band model reads
CFG = {"sample_rate": SR, "n_fft": N_FFT, "hop_length": HOP, "n_mels": N_MELS, "f_min": 0.0, "f_max": 0.0}
NAMES = ["a", "b", "c", "d", "e"]


class BandModel(nn.Module):
    """Reads only mel bins LO:HI of its input; fixed weights, 5 logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        band = torch.zeros(1, 1, N_MELS, 1)
        band[:, :, LO:HI] = 1
        self.register_buffer("band", band)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.features(x * self.band))


def _features():
    waves = _waves(4, seed=9).numpy()
    return LogMel(SR, N_FFT, HOP, N_MELS).fit_stats(make_loader(WaveformDataset(waves, np.zeros(4)), 4))


def _waves(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SR) / SR
    tones = torch.sin(2 * torch.pi * (300 + 700 * torch.arange(n))[:, None] * t)  # (n, T)
    return 0.3 * tones + 0.05 * torch.randn(n, SR, generator=g)


def _band_hz(features):
    """Lowest and highest frequency (Hz) that the mel filters LO:HI respond to."""
    fb = features.mel.mel_scale.fb  # (n_freq, n_mels)
    rows = torch.nonzero(fb[:, LO:HI].sum(1) > 0).flatten()
    hz = torch.fft.rfftfreq(N_FFT, 1 / SR)
    return hz[rows.min()].item(), hz[rows.max()].item()


def test_map_shape_range_and_probs():
    features, waves = _features(), _waves()  # resnet18 on three 1 s clips: a few seconds on CPU
    frames = SR // HOP + 1
    for model, group, method in [(BandModel(), 1, "ig"), (build_model("resnet18", 10), 2, "ig"),
                                 (build_model("resnet18", 10), 2, "gradcam"), (BandModel(), 1, "gradcam")]:
        maps, probs = attribute(model, features, waves, group=group, steps=4, method=method)
        assert maps.shape == (3, N_MELS, frames) and maps.dtype == torch.float32 and maps.device.type == "cpu"
        assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.sum() > 0, method
        assert probs.shape == (3, 5) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
        assert all(p.grad is None for p in model.parameters())  # nothing leaks into the model
        assert not model.training


def test_band_model_map_lies_in_its_band():
    maps, _ = attribute(BandModel(), _features(), _waves(), steps=16)
    in_band = maps[:, LO:HI].sum((1, 2)) / maps.sum((1, 2))
    assert (in_band >= 0.9).all(), in_band


def test_mask_audio_keeps_length_and_band_frequencies():
    features = _features()
    noise = 0.1 * torch.randn(1, SR - 37, generator=torch.Generator().manual_seed(1))  # broadband, odd length
    maps, _ = attribute(BandModel(), features, noise, steps=16)
    out = mask_audio(noise[0], maps[0], features)
    assert out.shape == noise[0].shape and torch.isfinite(out).all()
    power = np.abs(np.fft.rfft(out.numpy())) ** 2
    hz = np.fft.rfftfreq(len(out), 1 / SR)
    lo, hi = _band_hz(features)
    share = power[(hz >= lo) & (hz <= hi)].sum() / power.sum()
    # The mask is zero outside the band's filters; what remains outside is window leakage.
    assert share > 0.9, (share, lo, hi)
    band_of_input = (hi - lo) / (SR / 2)
    assert band_of_input < 0.35  # so the share above is not met by the input noise itself


def test_explain_files_writes_png_and_wav(tmp_path):
    features, waves = _features(), _waves(2)
    paths = explain_files(BandModel(), features, waves, ["x/dog.wav", "cat.ogg"], NAMES, CFG, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["cat_explanation.png", "cat_explanation.wav",
                                             "dog_explanation.png", "dog_explanation.wav"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    audio, sr = sf.read(tmp_path / "out" / "dog_explanation.wav")
    assert sr == SR and audio.shape == (SR,)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_saliency_figure_writes_png(tmp_path):
    waves = _waves(6)
    true, pred = np.array([0, 0, 1, 2, 2, 4]), np.array([0, 3, 1, 2, 1, 0])  # category 3 has no clip
    path = saliency_figure(BandModel(), _features(), waves, true, pred, NAMES, CFG, tmp_path / "f" / "s.png")
    assert path.exists() and path.stat().st_size > 0
