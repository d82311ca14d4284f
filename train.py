"""Training: one epoch, evaluation, and `fit()` with early stopping, an LR schedule,
atomic `best.pt`/`last.pt` checkpoints and exact resume. `main.py` wires these together;
nothing here reads the config file or the command line.

A model may predict finer labels than the task asks for (`group` fine labels per task
label, for example 50 classes summed into 5 categories): training uses the fine labels,
evaluation sums the probabilities of each group.

Under `torchrun --nproc_per_node N main.py` (WORLD_SIZE > 1), `fit()` trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA) and only rank 0 writes files.
"""
import os
import random
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, f1_score
from tqdm import tqdm


# ---------------------------------------------------------------- processes and devices

def setup_distributed() -> torch.device | None:
    """Join the process group when started by torchrun with WORLD_SIZE > 1; returns this rank's
    CUDA device (None on CPU). Splits the CPU cores between the local processes, unless
    OMP_NUM_THREADS says how many threads each process takes (e.g. folds run side by side)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if "OMP_NUM_THREADS" not in os.environ:  # torch already took that one at import
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return None


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# ---------------------------------------------------------------- checkpoints

def atomic_write(path, write) -> None:
    """`write(tmp)` to a temporary name in the same folder, then rename: a crash never leaves half a file.
    The name holds the process id, so processes writing one file at once (folds run in parallel) don't collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj, path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_csv(df: pd.DataFrame, path, **kw) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, **kw))


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by `fit()`. It holds numpy and python RNG states, hence weights_only=False:
    load only checkpoints you made."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (python main.py)") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({e}); delete it and train again") from None


# ---------------------------------------------------------------- one epoch, evaluation

def _collapse(probs: torch.Tensor, group: int) -> torch.Tensor:
    """Probabilities over fine labels (B, C * group) -> over task labels (B, C)."""
    return probs.view(probs.shape[0], -1, group).sum(-1) if group > 1 else probs


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds `device` up: CUDA, or a CPU with bf16 instructions, AMX tiles
    (Intel Xeon 4th generation and later: 1.9x the training throughput of float32 for the default
    ResNet-18 on 2 cores) or AVX512-BF16 (AMD Zen 4: 1.8x; `python -m benchmarks.pipeline`).
    Elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":
        return True
    cpu = torch._C._cpu
    return device.type == "cpu" and any(bool(getattr(cpu, f, lambda: False)())
                                        for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def uses_bf16(device: torch.device, amp: bool) -> bool:
    """Whether a run with `amp` on `device` computes in bf16 (autocast) rather than float32."""
    return amp and bf16_is_fast(device)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, amp))


def train_one_epoch(model, features, augment, loader, optimizer, scheduler, device, *, group=1, amp=True,
                    label_smoothing=0.0, clip_grad_norm=0.0, ema=None, desc="train") -> dict:
    """One pass over `loader` (batches of waveforms and model labels); returns mean loss and
    accuracy (on task labels, against each clip's own label even when mixup blends it). `ema`, an
    `AveragedModel`, is updated after every optimizer step."""
    model.train(), augment.train()
    total_loss = correct = seen = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=None if is_main_process() else True, dynamic_ncols=True)
    for wave, y in bar:
        wave, y = wave.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
        with torch.no_grad():
            wave, target = augment.mix(wave, y)  # between-class mixing, when mixup is on the waveforms
            x, target = augment(features(wave), target)  # (B, 1, n_mels, frames), (B, num_classes)
        x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) // group == y // group).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@torch.no_grad()
def predict_proba(model, features, waves: torch.Tensor, device, *, group=1, amp=True) -> torch.Tensor:
    """Task-label probabilities (B, C) for a batch of waveforms (B, T)."""
    x = features(waves.to(device)).contiguous(memory_format=torch.channels_last)
    with _autocast(device, amp):
        logits = model(x)
    return _collapse(logits.float().softmax(1), group).cpu()


@torch.no_grad()
def evaluate(model, features, loader, device, *, group=1, amp=True) -> dict:
    """`scores` of the task-label probabilities, and the per-clip probabilities (N, C) and
    targets (N,) over `loader` (task labels)."""
    model.eval()
    probs, ys = [], []
    for wave, y in loader:
        probs.append(predict_proba(model, features, wave, device, group=group, amp=amp))
        ys.append(y)
    p, y = torch.cat(probs), torch.cat(ys)
    return {**scores(p, y), "probs": p.numpy(), "targets": y.numpy()}


def scores(p: torch.Tensor, y: torch.Tensor, group: int = 1) -> dict:
    """Loss, accuracy, balanced accuracy and macro F1 of probabilities `p` (N, C) against labels
    `y` (N,); with `group` > 1, on the coarser labels `y // group` (e.g. 50 classes -> 5 categories)."""
    p, y = _collapse(p, group), y // group
    pred = p.argmax(1).numpy()
    return {"loss": F.nll_loss(p.clamp_min(1e-12).log(), y).item(),
            "accuracy": float((pred == y.numpy()).mean()),
            "balanced_accuracy": balanced_accuracy_score(y.numpy(), pred),
            "macro_f1": f1_score(y.numpy(), pred, average="macro")}


# ---------------------------------------------------------------- fit

def make_optimizer(model, cfg, steps_per_epoch: int) -> tuple:
    """AdamW (or SGD with Nesterov momentum 0.9) and the configured schedule: `onecycle` (warm-up
    then cosine, stepped per batch; it also cycles AdamW's beta1 or SGD's momentum, 0.95 -> 0.85
    -> 0.95), `plateau` (LR x0.5 after `patience // 3` epochs without a better validation accuracy,
    stepped per epoch) or `constant`."""
    params = list(model.parameters())
    if not cfg.decay_norm_bias:  # as torchvision's references with --norm-weight-decay 0 --bias-weight-decay 0
        params = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=cfg.warmup)
    elif cfg.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5,
                                                           patience=max(1, cfg.patience // 3))
    elif cfg.schedule == "constant":
        sched = None
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose onecycle, plateau or constant")
    return opt, sched


def fit(model, features, augment, train_loader, val_loader, cfg, out_dir, device, *, group=1,
        resume=True, extra=None) -> pd.DataFrame:
    """Train for up to `cfg.epochs` epochs with early stopping on validation accuracy (ties go to
    the lower validation loss) after `cfg.patience` epochs without improvement.

    With `cfg.ema_decay` > 0 an exponential moving average of the weights (and BatchNorm
    statistics), updated every step, is what is validated and saved as `model`; the trained
    weights and the update count travel in `ema` for resuming.

    Writes to `out_dir`: `last.pt` every epoch, `best.pt` when validation improves (model,
    LogMel, optimizer, scheduler, epoch, early-stopping state, history, RNG states, config and
    `extra`), and `history.csv`. With `resume` and a `last.pt` in `out_dir`, continues where it
    stopped: on CPU with a fixed seed the history equals that of an uninterrupted run.
    Returns the history, one row per epoch.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))
    model = model.to(device).to(memory_format=torch.channels_last)
    features, augment = features.to(device), augment.to(device)
    net = model
    if dist.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if getattr(cfg, "compile", False):
        net = torch.compile(net)
    optimizer, scheduler = make_optimizer(model, cfg, len(train_loader))
    per_batch = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    state = {"epoch": 0, "best_score": None, "bad_epochs": 0, "history": []}
    ema = None
    if getattr(cfg, "ema_decay", 0.0) > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    scored = ema.module if ema is not None else model  # the weights validated and saved

    last = out_dir / "last.pt"
    if resume and last.exists():
        ck = load_checkpoint(last, device)
        scored.load_state_dict(ck["model"])
        if ema is not None:
            model.load_state_dict(ck["ema"]["trained"])
            ema.n_averaged.fill_(ck["ema"]["updates"])
        features.load_state_dict(ck["features"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ck["scheduler"])
        state = {k: ck[k] for k in state}
        set_rng_states(ck["rng"])
        if is_main_process():
            print(f"resuming from {last} after epoch {state['epoch']}")

    def checkpoint() -> dict:
        averaged = {"ema": {"trained": model.state_dict(), "updates": ema.n_averaged.item()}} if ema is not None else {}
        return {"model": scored.state_dict(), **averaged, "features": features.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None, **state,
                "rng": rng_states(), "config": config, **(extra or {})}

    epoch = state["epoch"]
    try:
        while epoch < cfg.epochs and state["bad_epochs"] < cfg.patience:
            epoch += 1
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            t0 = time.time()
            lr = optimizer.param_groups[0]["lr"]
            tr = train_one_epoch(net, features, augment, train_loader, optimizer, scheduler if per_batch else None,
                                 device, group=group, amp=cfg.amp, label_smoothing=cfg.label_smoothing,
                                 clip_grad_norm=cfg.clip_grad_norm, ema=ema, desc=f"epoch {epoch}/{cfg.epochs}")
            va = evaluate(scored, features, val_loader, device, group=group, amp=cfg.amp)
            if scheduler is not None and not per_batch:
                scheduler.step(va["accuracy"])
            row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                   "val_loss": va["loss"], "val_accuracy": va["accuracy"], "lr": lr,
                   "seconds": time.time() - t0}
            score = (va["accuracy"], -va["loss"])
            improved = state["best_score"] is None or score > tuple(state["best_score"])
            state.update(epoch=epoch, history=state["history"] + [row],
                         best_score=score if improved else state["best_score"],
                         bad_epochs=0 if improved else state["bad_epochs"] + 1)
            if is_main_process():
                ck = checkpoint()
                if improved:
                    atomic_save(ck, out_dir / "best.pt")
                atomic_save(ck, last)
                atomic_csv(pd.DataFrame(state["history"]), out_dir / "history.csv", index=False)
                left = (cfg.epochs - epoch) * np.mean([r["seconds"] for r in state["history"]]) / 60
                print(f"epoch {epoch:3d}  train loss {tr['loss']:.3f} acc {tr['accuracy']:.3f}  "
                      f"val loss {va['loss']:.3f} acc {va['accuracy']:.3f}  lr {lr:.2e}  "
                      f"{row['seconds']:.0f} s (at most {left:.0f} min left){'  *' if improved else ''}", flush=True)
    except KeyboardInterrupt:
        if is_main_process():
            print(f"\ninterrupted in epoch {epoch}; {last} holds epoch {state['epoch']}. "
                  "Run the same command again to resume (the partial epoch is redone).", flush=True)
        raise
    if state["bad_epochs"] >= cfg.patience and is_main_process():
        print(f"early stop: no better validation accuracy for {cfg.patience} epochs")
    return pd.DataFrame(state["history"])
