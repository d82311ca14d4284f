"""Throughput of the default recipe and the data pipeline's share of a training step.

    python -m benchmarks.pipeline                    # default Config, real data if installed
    python -m benchmarks.pipeline --batches 20 --device cuda --task fine
    python -m benchmarks.pipeline --compile          # + each precision under torch.compile (`compile`)

Times, side by side in one process and interleaved batch by batch: fetching a training batch
of waveforms (random crops from the cached array), LogMel + Augment on the training device,
the model's forward + backward + optimizer step, and evaluation (LogMel + forward on whole
clips). Where bf16 autocast is fast (CUDA, CPUs with AMX or AVX512-BF16; `train.bf16_is_fast`)
the model step and evaluation are timed both in bf16 (the default, `amp`) and in float32, on the
same batches.
Prints ms per batch, samples/s, the pipeline's share of a training step and the bf16 / float32
speed-up, so two runs (before and after a change) can be compared as ratios; absolute times
vary by machine. With `--compile` each precision is also timed with the model under
`torch.compile` (the same initial weights; its compilation falls in the warm-up batches).
"""
import argparse
import time

import numpy as np
import torch

from dataset import WaveformDataset, load_meta, load_waveforms, make_loader, splits
from main import Config, make_augment, make_features, make_model, num_outputs, resolve_device
from train import _autocast, make_optimizer, uses_bf16


def cycle(loader):
    """Batches of `loader` without end (a new epoch whenever one runs out)."""
    while True:
        yield from loader


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parts(cfg, device):
    """The training batches (random crops of the training folds' cached waveforms, or of random
    audio where ESC-50 is not installed), whole-clip evaluation batches, LogMel and Augment on
    `device`, and a line naming the audio."""
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
    augment = make_augment(cfg, features).to(device).train()
    return train, evalset, features, augment, source


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=12, help="timed batches (after 2 warm-up batches)")
    p.add_argument("--device", default="auto")
    p.add_argument("--task", default="coarse", choices=("coarse", "fine"))
    p.add_argument("--data-root", default="data", help="folder holding ESC-50/; random audio when missing")
    p.add_argument("--compile", action="store_true", help="also time each precision under torch.compile")
    args = p.parse_args(argv)
    cfg = Config(task=args.task, device=args.device, data_root=args.data_root)
    device = resolve_device(cfg.device)
    train, evalset, features, augment, source = parts(cfg, device)
    precisions = ["bf16", "float32"] if uses_bf16(device, cfg.amp) else ["float32"]
    variants = [(p, c) for p in precisions for c in ([False, True] if args.compile else [False])]
    models = {}
    for prec, compiled in variants:  # the same initial weights for each
        torch.manual_seed(0)
        model = make_model(cfg).to(device).to(memory_format=torch.channels_last)
        net = torch.compile(model) if compiled else model
        models[prec + " compiled" * compiled] = (net, prec, make_optimizer(model, cfg, len(train))[0])
    t = {"fetch": [], "features + augment": []}
    for name in models:
        t[f"forward + backward + step, {name}"], t[f"evaluation, {name}"] = [], []
    it, eval_it = cycle(train), cycle(evalset)
    for i in range(args.batches + 2):
        t0 = time.perf_counter()
        wave, y = next(it)
        wave, y = wave.to(device).float(), y.to(device)
        sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            wave, target = augment.mix(wave, y)
            x, target = augment(features(wave), target)
        x = x.contiguous(memory_format=torch.channels_last)
        sync(device)
        times = {"fetch": t1 - t0, "features + augment": time.perf_counter() - t1}
        ew, _ = next(eval_it)
        for name, (model, prec, opt) in models.items():
            t2 = time.perf_counter()
            model.train()
            with _autocast(device, prec == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x).float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(device)
            t3 = time.perf_counter()
            model.eval()
            with torch.no_grad(), _autocast(device, prec == "bf16"):
                model(features(ew.to(device)).contiguous(memory_format=torch.channels_last))
            sync(device)
            times[f"forward + backward + step, {name}"] = t3 - t2
            times[f"evaluation, {name}"] = time.perf_counter() - t3
        if i >= 2:
            for k, v in times.items():
                t[k].append(v)
    ms = {k: 1000 * float(np.median(v)) for k, v in t.items()}
    print(f"{cfg.model}, {cfg.task}, {device}, {torch.get_num_threads()} threads; {source}; "
          f"training batch {cfg.batch_size} x {cfg.crop_seconds} s crops, evaluation batch {2 * cfg.batch_size} "
          f"x 5 s clips; median of {args.batches} batches")
    for k, v in ms.items():
        print(f"  {k:45s} {v:8.1f} ms/batch")
    pipeline = ms["fetch"] + ms["features + augment"]
    rates = {}
    for name in models:
        step = pipeline + ms[f"forward + backward + step, {name}"]
        rates[name] = (1000 * cfg.batch_size / step, 1000 * 2 * cfg.batch_size / ms[f"evaluation, {name}"])
        print(f"  {name}: data pipeline share of a training step {pipeline / step:.1%} "
              f"(fetch {ms['fetch'] / step:.1%}, "
              f"features + augment {ms['features + augment'] / step:.1%}); training {rates[name][0]:.1f} samples/s, "
              f"evaluation {rates[name][1]:.1f} samples/s")
    pairs = [("bf16", "float32")] if len(precisions) == 2 else []
    pairs += [(f"{p} compiled", p) for p in precisions if f"{p} compiled" in rates]
    for a, b in pairs:
        print(f"  {a} / {b} throughput: training {rates[a][0] / rates[b][0]:.2f}x, "
              f"evaluation {rates[a][1] / rates[b][1]:.2f}x")
    return rates  # precision (+ " compiled") -> (training, evaluation) samples/s


if __name__ == "__main__":
    main()
