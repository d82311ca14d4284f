"""Explanations: which parts of the log-mel decided a prediction, as a map, a figure and a WAV.

    maps, probs = attribute(model, features, waves)          # (B, n_mels, frames) >= 0, (B, C)
    audio = mask_audio(waves[0], maps[0], features)          # (T,): the clip kept where the map is high
    overlay_figure(features.db(waves[:1])[0], maps[0], "dog.wav", cfg, path="dog.png")
    explain_files(model, features, waves, names, class_names, cfg, "explain/")  # predict.py --explain
    saliency_figure(model, features, waves, true, pred, class_names, cfg, path)  # main.py's figure

Attributions are Integrated Gradients (Captum) of the task-label probability with respect to
the normalised log-mel, from a baseline of silence (each clip's own minimum, a constant), so
they measure what differs from silence; only the positive evidence is kept. `method="gradcam"`
gives a coarser Grad-CAM view of the last conv block. `cfg` is a Config or its dict.
"""
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from train import atomic_write


def _cfg(cfg) -> dict:
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)


def _last_block(model):
    """The last conv block Grad-CAM looks at: resnet's layer4, densenet's features."""
    for name in ("layer4", "features"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"gradcam: {type(model).__name__} has neither layer4 nor features")


def attribute(model, features, waves, target=None, group=1, steps=32, method="ig", internal_batch_size=32):
    """Attribution maps on the log-mel for waveforms (B, T): returns maps (B, n_mels, frames),
    float32 >= 0 on CPU, and task-label probabilities (B, C). `target`: a task label, one per
    clip, or None for the predicted label. Gradients go to the input only, never to .grad."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        x = features.to(device)(torch.as_tensor(waves, dtype=torch.float32).to(device))  # (B, 1, n_mels, frames)

    def forward(x):  # log-mel batch -> task-label probabilities (B, C)
        p = model(x).float().softmax(1)
        return p.view(p.shape[0], -1, group).sum(-1)

    with torch.no_grad():
        probs = forward(x)
    if target is None:
        target = probs.argmax(1)
    target = torch.as_tensor(target, device=device).long().expand(len(x))
    if method == "ig":
        baseline = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x).contiguous()  # silence, per clip
        maps = IntegratedGradients(forward).attribute(x, baseline, target=target, n_steps=steps,
                                                      internal_batch_size=max(internal_batch_size, 2 * len(x)))
    elif method == "gradcam":
        cam = LayerGradCam(forward, _last_block(model)).attribute(x, target=target, relu_attributions=True)
        maps = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    else:
        raise ValueError(f"unknown method {method!r}; choose ig or gradcam")
    return maps.detach()[:, 0].clamp(min=0).float().cpu(), probs.cpu()


def mask_audio(wave: torch.Tensor, map_: torch.Tensor, features) -> torch.Tensor:
    """The clip (T,) kept where the map (n_mels, frames) is high: its STFT (the features' own
    n_fft, hop and window) times the map brought onto the STFT grid through the mel filterbank
    and scaled to [0, 1], inverted with the original phase. Returns (T,) at the same rate."""
    spec = features.mel.spectrogram
    wave = torch.as_tensor(wave, dtype=torch.float32).cpu()
    window = spec.window.cpu()
    stft = torch.stft(wave, spec.n_fft, spec.hop_length, spec.win_length, window, center=True,
                      pad_mode=spec.pad_mode, return_complex=True)  # (n_freq, frames)
    mask = features.mel.mel_scale.fb.cpu() @ torch.as_tensor(map_, dtype=torch.float32).cpu()  # (n_freq, frames)
    mask = mask / mask.max().clamp_min(1e-12)
    return torch.istft(stft * mask, spec.n_fft, spec.hop_length, spec.win_length, window, center=True,
                       length=len(wave))


def _overlay(ax, db, map_, cfg):
    """The log-mel in grey with the map over it, opaque where it is high. The map is scaled by
    its 99th percentile (not its max), so a few extreme cells do not wash out the rest."""
    from main import _show_logmel
    _show_logmel(ax, np.asarray(db, dtype=np.float32), cfg).set_cmap("gray")
    m = np.asarray(map_, dtype=np.float32)
    m = np.clip(m / max(float(np.percentile(m, 99)), float(m.max()) * 1e-3, 1e-12), 0, 1)
    return ax.imshow(m, origin="lower", aspect="auto", cmap="inferno", vmin=0, vmax=1, alpha=0.85 * m,
                     extent=ax.get_images()[0].get_extent())


def overlay_figure(db, map_, title, cfg, top=None, path=None):
    """One clip: its log-mel (n_mels, frames, dB) beside the same with the map over it.
    `top`: (label, prob) pairs for the title. Saved to `path` (and closed) when given."""
    import matplotlib.pyplot as plt
    from main import _show_logmel
    cfg, db = _cfg(cfg), np.asarray(db, dtype=np.float32)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    _show_logmel(a, db, cfg, fig)
    a.set_title("log-mel")
    fig.colorbar(_overlay(b, db, map_, cfg), ax=b, label="relative attribution")
    b.set_title("what decided (positive attribution)")
    if top:
        title = f"{title}\n" + ", ".join(f"{label} {p:.2f}" for label, p in top)
    fig.suptitle(title)
    if path is not None:
        path = Path(path)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], dpi=110, bbox_inches="tight"))
        plt.close(fig)
    return fig


def explain_files(model, features, waves, names, class_names, cfg, out_dir, group=1) -> list:
    """For each clip (rows of `waves`, or a list of (T,) clips of any length) and its file name,
    write out_dir/<stem>_explanation.png (overlay, top-3 categories) and <stem>_explanation.wav
    (`mask_audio`, at cfg["sample_rate"]). Returns the written paths."""
    import soundfile as sf
    cfg, out_dir = _cfg(cfg), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for wave, name in zip(waves, names):
        wave = torch.as_tensor(wave, dtype=torch.float32).cpu()
        maps, probs = attribute(model, features, wave[None], group=group)
        p, idx = probs[0].topk(min(3, probs.shape[1]))
        stem = out_dir / f"{Path(name).stem}_explanation"
        with torch.no_grad():
            db = features.db(wave[None].to(features.mean.device))[0].cpu()
        overlay_figure(db, maps[0], f"{Path(name).name}: {class_names[idx[0]]}", cfg,
                       top=[(class_names[i], float(q)) for q, i in zip(p, idx)], path=stem.with_suffix(".png"))
        audio = np.clip(mask_audio(wave, maps[0], features).numpy(), -1, 1)
        atomic_write(stem.with_suffix(".wav"), lambda tmp: sf.write(tmp, audio, cfg["sample_rate"], format="WAV"))
        written += [stem.with_suffix(".png"), stem.with_suffix(".wav")]
    return written


def saliency_figure(model, features, waves, true, pred, class_names, cfg, path, group=1, chunk=16) -> Path:
    """A grid, one row per category: the first correctly and the first wrongly classified test
    clip of that category (true label), each with its map for the predicted label."""
    import matplotlib.pyplot as plt
    cfg, path = _cfg(cfg), Path(path)
    true, pred = np.asarray(true), np.asarray(pred)
    picks = {}  # (row, column) -> clip index
    for c in range(len(class_names)):
        for col, hit in enumerate(((true == c) & (pred == c), (true == c) & (pred != c))):
            if hit.any():
                picks[c, col] = int(np.flatnonzero(hit)[0])
    idx = sorted(set(picks.values()))
    w = torch.as_tensor(np.asarray(waves)[idx], dtype=torch.float32)
    maps, probs = [], []
    for s in range(0, len(idx), chunk):  # bounds memory when there are many categories
        m, p = attribute(model, features, w[s:s + chunk], torch.as_tensor(pred[idx[s:s + chunk]]), group=group)
        maps.append(m), probs.append(p)
    maps, probs = torch.cat(maps), torch.cat(probs)
    with torch.no_grad():
        db = features.db(w.to(features.mean.device)).cpu()
    row = {i: r for r, i in enumerate(idx)}
    fig, axes = plt.subplots(len(class_names), 2, figsize=(11, 2.4 * len(class_names)),
                             squeeze=False, layout="constrained")
    im = None
    for c in range(len(class_names)):
        for col in range(2):
            ax = axes[c, col]
            if (c, col) not in picks:
                text = "no test clip" if not (true == c).any() else "no mistakes" if col else "no correct clip"
                ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
                ax.set(xticks=[], yticks=[])
                ax.set_title(f"true {class_names[c]}", fontsize=9)
                continue
            i = picks[c, col]
            im = _overlay(ax, db[row[i]], maps[row[i]], cfg)
            ax.set_title(f"true {class_names[true[i]]} / predicted {class_names[pred[i]]} "
                         f"({probs[row[i], pred[i]]:.2f})", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, label="relative attribution", shrink=min(1.0, 3 / len(class_names)))
    fig.suptitle("Integrated gradients for the predicted label: correct (left) and wrong (right) test clips")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
