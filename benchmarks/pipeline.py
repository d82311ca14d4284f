"""Throughput of the default recipe and the data pipeline's share of a training step.

    python -m benchmarks.pipeline                    # default Config, real data if installed
    python -m benchmarks.pipeline --batches 20 --device cuda --task fine

Times, side by side in one process and interleaved batch by batch: fetching a training batch
of waveforms (random crops from the cached array), LogMel + Augment on the training device,
the model's forward + backward + optimizer step, and evaluation (LogMel + forward on whole
clips). Prints ms per batch, samples/s and the pipeline's share of a training step, so two
runs (before and after a change) can be compared as ratios; absolute times vary by machine.
"""
import argparse
import time

import numpy as np
import torch

from dataset import Augment, WaveformDataset, load_meta, load_waveforms, make_loader, splits
from main import Config, make_features, num_outputs, resolve_device
from model import build_model
from train import _autocast, make_optimizer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=12, help="timed batches (after 2 warm-up batches)")
    p.add_argument("--device", default="auto")
    p.add_argument("--task", default="coarse", choices=("coarse", "fine"))
    p.add_argument("--data-root", default="data", help="folder holding ESC-50/; random audio when missing")
    args = p.parse_args(argv)
    cfg = Config(task=args.task, device=args.device, data_root=args.data_root)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    try:
        meta = load_meta(f"{cfg.data_root}/ESC-50")
        waves = np.asarray(load_waveforms(f"{cfg.data_root}/ESC-50", cfg.sample_rate, meta=meta)[splits(meta, 5)[0]])
        source = "ESC-50 training folds"
    except FileNotFoundError:
        waves = (np.random.default_rng(0).standard_normal((1200, 5 * cfg.sample_rate)) * 0.1).astype(np.float16)
        source = "random audio (ESC-50 not installed)"
    labels = np.arange(len(waves)) % num_outputs(cfg)
    train = make_loader(WaveformDataset(waves, labels, crop=int(cfg.crop_seconds * cfg.sample_rate)),
                        cfg.batch_size, shuffle=True, drop_last=True)
    evalset = make_loader(WaveformDataset(waves, labels), 2 * cfg.batch_size)
    features = make_features(cfg).to(device)
    features.mean.fill_(-40.0), features.std.fill_(20.0)  # fixed: statistics don't change the cost
    augment = Augment(num_outputs(cfg), 20.0, cfg.gain_db, cfg.stretch, cfg.shift, cfg.time_masks,
                      cfg.time_mask_frames, cfg.freq_masks, cfg.freq_mask_bins, cfg.mixup_alpha).to(device).train()
    model = build_model(cfg.model, num_outputs(cfg)).to(device).to(memory_format=torch.channels_last)
    opt, _ = make_optimizer(model, cfg, len(train))
    t = {"fetch": [], "features + augment": [], "forward + backward + step": [], "evaluation": []}
    it, eval_it = iter(train), iter(evalset)
    for i in range(args.batches + 2):
        t0 = time.perf_counter()
        wave, y = next(it)
        wave, y = wave.to(device), y.to(device)
        sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            x, target = augment(features(wave), y)
        x = x.contiguous(memory_format=torch.channels_last)
        sync(device)
        t2 = time.perf_counter()
        model.train()
        with _autocast(device, cfg.amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        t3 = time.perf_counter()
        model.eval()
        ew, _ = next(eval_it)
        with torch.no_grad(), _autocast(device, cfg.amp):
            model(features(ew.to(device)).contiguous(memory_format=torch.channels_last))
        sync(device)
        t4 = time.perf_counter()
        if i >= 2:
            for k, (a, b) in zip(t, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                t[k].append(b - a)
    ms = {k: 1000 * float(np.median(v)) for k, v in t.items()}
    step = ms["fetch"] + ms["features + augment"] + ms["forward + backward + step"]
    print(f"{cfg.model}, {cfg.task}, {device}, {torch.get_num_threads()} threads; {source}; "
          f"training batch {cfg.batch_size} x {cfg.crop_seconds} s crops, evaluation batch {2 * cfg.batch_size} "
          f"x 5 s clips; median of {args.batches} batches")
    for k, v in ms.items():
        print(f"  {k:28s} {v:8.1f} ms/batch")
    print(f"  data pipeline share of a training step: {(ms['fetch'] + ms['features + augment']) / step:.1%} "
          f"(fetch {ms['fetch'] / step:.1%}, features + augment {ms['features + augment'] / step:.1%})")
    print(f"  training throughput:   {1000 * cfg.batch_size / step:7.1f} samples/s")
    print(f"  evaluation throughput: {1000 * 2 * cfg.batch_size / ms['evaluation']:7.1f} samples/s")


if __name__ == "__main__":
    main()
