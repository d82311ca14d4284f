"""Training throughput of folds run side by side: one process with every core against several
processes at once, each with its share of the cores (OMP_NUM_THREADS, as a CV would run them).

    python -m benchmarks.processes                                  # 1 x 2 threads vs 2 x 1 on 2 cores
    python -m benchmarks.processes --processes 3 --task fine --n-mels 96   # any Config override

Each process builds the same training step as `benchmarks.pipeline` (fetch a batch of crops,
LogMel + Augment, forward + backward + optimizer step, in the default precision), runs two
warm-up batches, waits for the others, then trains for `--seconds`. The settings alternate
round by round, so both see the same machine; prints samples/s summed over the processes and
the ratio, the speed-up of running a CV's folds side by side instead of one after another.
"""
import argparse
import multiprocessing as mp
import os
import time

import torch

from benchmarks.pipeline import cycle, parts, sync
from main import make_model, parse_config, resolve_device
from train import _autocast, make_optimizer, uses_bf16


def _worker(overrides, threads, seconds, barrier, out):
    torch.set_num_threads(threads)
    cfg = parse_config(overrides)
    device = resolve_device(cfg.device)
    train, _, features, augment, _ = parts(cfg, device)
    model = make_model(cfg).to(device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, len(train))[0]
    batches, bf16 = cycle(train), uses_bf16(device, cfg.amp)

    def step():
        wave, y = next(batches)
        with torch.no_grad():
            wave, target = augment.mix(wave.to(device).float(), y.to(device))
            x, target = augment(features(wave), target)
        with _autocast(device, bf16):
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)).float(),
                                                     target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)

    for _ in range(2):
        step()
    barrier.wait()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    out.put(n * cfg.batch_size / (time.perf_counter() - start))


def rate(overrides, processes, threads, seconds) -> float:
    """Training samples/s summed over `processes` processes training at once."""
    ctx = mp.get_context("spawn")  # fresh interpreters: each sets its own thread count
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(overrides, threads, seconds, barrier, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=600 + 10 * seconds) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2, help="processes side by side (default 2)")
    p.add_argument("--seconds", type=float, default=30.0, help="timed training per process and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each timing both settings")
    args, overrides = p.parse_known_args(argv)
    parse_config(overrides)  # a bad override stops here, not in a child
    cores = os.cpu_count() or 1
    settings = [(1, cores), (args.processes, max(1, cores // args.processes))]
    rates = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in settings:
            rates[s].append(rate(overrides, *s, args.seconds))
            print(f"round {r + 1}: {s[0]} process(es) x {s[1]} thread(s): {rates[s][-1]:.1f} samples/s", flush=True)
    one, side = (sum(v) / len(v) for v in rates.values())
    print(f"{' '.join(overrides) or 'default Config'}; {cores} cores, {args.seconds:g} s per round, "
          f"mean of {args.rounds} round(s): one process {one:.1f} samples/s, {args.processes} side by side "
          f"{side:.1f} samples/s in all: {side / one:.2f}x")
    return one, side


if __name__ == "__main__":
    main()
