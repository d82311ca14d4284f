import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

import train
from conftest import tiny_args
from dataset import load_meta, load_waveforms
from main import Config, parse_config, prepare_fold
from model import MeanMaxPool, build_model
from train import _autocast, bf16_is_fast, evaluate, fit, load_checkpoint, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
@pytest.mark.parametrize("classes", [5, 50])
def test_one_channel_forward_backward(name, classes):
    model = build_model(name, classes)
    x = torch.randn(2, 1, 32, 63, requires_grad=True)
    out = model(x)
    assert out.shape == (2, classes)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dropout_before_the_classifier_only_while_training():
    torch.manual_seed(0)
    model = build_model("resnet18", 5, dropout=0.5)
    feats = torch.ones(4, 512)
    assert model.fc.training and not torch.equal(model.fc(feats), model.fc(feats))  # dropped, at random
    model.eval()
    assert torch.allclose(model.fc(feats), feats @ model.fc.weight.T + model.fc.bias)  # all kept, unscaled
    assert model.state_dict().keys() == build_model("resnet18", 5).state_dict().keys()  # checkpoints load


def test_meanmax_pool_keeps_a_short_sound_as_strong_in_a_longer_clip():
    pool = MeanMaxPool()
    x = torch.tensor([[[[0.0, 4.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]]])  # (B, C, F, T): one loud frame
    assert pool(x).flatten().tolist() == [3.0 + 0.75]  # max 3 over time + mean 0.75
    longer = torch.cat([x, torch.zeros_like(x)], -1)  # the same sound in twice the silence
    assert pool(longer).flatten().tolist() == [3.0 + 0.375]  # only the mean part halves
    clip = torch.randn(2, 1, 32, 63)
    models = {name: build_model(name, 5, pool="meanmax").eval() for name in ("resnet18", "densenet121")}
    for name, model in models.items():
        assert model(clip).shape == (2, 5)
        assert model.state_dict().keys() == build_model(name, 5).state_dict().keys()  # checkpoints load
    assert isinstance(models["resnet18"].avgpool, MeanMaxPool)
    # DenseNet: the classifier sees relu(features) pooled the same way
    model = models["densenet121"]
    with torch.no_grad():
        feats = torch.relu(model.features[:-1](clip))
        assert torch.allclose(model(clip), model.classifier(MeanMaxPool()(feats).flatten(1)), atol=1e-5)
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        build_model("resnet18", 5, pool="max")


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_no_stem_pool_doubles_the_resolution_after_the_stem(name):
    clip = torch.randn(1, 1, 64, 251)
    maps = {}
    for stem_pool in (True, False):
        model = build_model(name, 5, stem_pool=stem_pool).eval()
        body = model.features if name == "densenet121" else torch.nn.Sequential(*list(model.children())[:-2])
        maps[stem_pool] = body(clip).shape[-2:]
        assert model(clip).shape == (1, 5)
        assert model.state_dict().keys() == build_model(name, 5).state_dict().keys()  # a pool has no weights
    (f, t), (f2, t2) = maps[True], maps[False]  # 64 x 251 -> 2 x 8 in ResNet-18 (DenseNet: 2 x 7)
    assert f2 == 2 * f and 2 * t <= t2 <= 2 * t + 1


def test_pretrained_sums_rgb_filters(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18()  # stands in for the ImageNet weights
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", 5, pretrained=True)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(model.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert model.fc.out_features == 5


def test_pretrained_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"place it at .*hub/checkpoints/resnet18-"):
        build_model("resnet18", 5, pretrained=True)


def setup(esc50, tmp_path, *extra):
    cfg = parse_config(tiny_args(tmp_path, esc50, *extra))
    meta = load_meta(esc50)
    return cfg, prepare_fold(cfg, meta, load_waveforms(esc50, cfg.sample_rate, meta=meta), 5, torch.device("cpu"))


def run(cfg, f, out, **kw):
    return fit(f["model"], f["features"], f["augment"], f["train"], f["val"], cfg, out, torch.device("cpu"),
               group=cfg.group, **kw)


@pytest.mark.parametrize("mixup_domain", ["logmel", "wave"])
def test_short_run_learns_and_checkpoints(esc50, tmp_path, mixup_domain):
    cfg, f = setup(esc50, tmp_path, "--epochs", "8", "--mixup-domain", mixup_domain)
    hist = run(cfg, f, tmp_path / "run")
    assert list(hist.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                                  "seconds"]
    assert len(hist) == 8 and hist["val_accuracy"].max() >= 0.8  # chance is 0.2
    assert pd.read_csv(tmp_path / "run" / "history.csv").shape == (8, 7)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    ranked = hist.assign(neg_loss=-hist["val_loss"]).sort_values(["val_accuracy", "neg_loss"], kind="stable")
    assert best["epoch"] == ranked["epoch"].iloc[-1]  # best accuracy, ties to the lower loss
    for key in ("model", "features", "optimizer", "scheduler", "epoch", "best_score", "bad_epochs", "rng", "config"):
        assert key in best
    f["model"].load_state_dict(best["model"])
    m = evaluate(f["model"], f["features"], f["test"], torch.device("cpu"), group=cfg.group)
    assert m["accuracy"] >= 0.8 and m["probs"].shape == (50, 5)
    lr = hist["lr"].to_numpy()  # one-cycle: warm up, then anneal
    assert lr[0] < lr.max() / 5 and lr[-1] < lr.max() / 2 and lr.argmax() not in (0, len(lr) - 1)


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_is_fast_on_cpus_with_bf16_instructions(monkeypatch, amx, avx512_bf16, fast):
    monkeypatch.setattr(torch._C._cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert bf16_is_fast(torch.device("cpu")) is fast


def test_bf16_autocast_on_cpus_where_it_is_fast(esc50, tmp_path):
    cfg, f = setup(esc50, tmp_path, "--epochs", "6", "--amp")
    cpu = torch.device("cpu")
    x = f["features"](torch.zeros(2, 4000))
    for amp, fast in ((True, torch.bfloat16), (False, torch.float32)):
        with _autocast(cpu, amp):
            assert f["model"](x).dtype == (fast if bf16_is_fast(cpu) else torch.float32)
    hist = run(cfg, f, tmp_path / "run")
    assert hist["val_accuracy"].max() >= 0.6  # chance is 0.2


def test_early_stopping_stops_when_validation_stalls(esc50, tmp_path, capsys):
    # no weight average: its BatchNorm statistics would still drift towards the trained model's
    cfg, f = setup(esc50, tmp_path, "--epochs", "20", "--patience", "2", "--schedule", "constant", "--lr", "1e-9",
                   "--ema-decay", "0")
    hist = run(cfg, f, tmp_path / "run")
    assert len(hist) == 3  # epoch 1 sets the best, 2 and 3 do not beat it
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and all("min left)" in line for line in lines)  # the time-to-go estimate


def test_lr_schedules():
    model = torch.nn.Linear(2, 2)
    cfg = Config(lr=1e-2, epochs=10, warmup=0.2)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == pytest.approx(20, abs=1)
    assert lrs[0] < 1e-3 and lrs[-1] < 1e-5
    opt, sched = make_optimizer(model, Config(lr=1e-2, schedule="plateau", patience=6), steps_per_epoch=10)
    for _ in range(4):  # one best epoch, then patience // 3 = 2 bad ones are tolerated, the third halves
        sched.step(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    opt, sched = make_optimizer(model, Config(schedule="constant"), 10)
    assert sched is None


def test_sgd_optimizer():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, Config(optimizer="sgd", lr=0.1, weight_decay=5e-4, epochs=10), 10)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["weight_decay"] == 5e-4
    momenta = []
    for _ in range(100):
        momenta.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    assert max(momenta) == pytest.approx(0.95) and min(momenta) == pytest.approx(0.85)  # one-cycle momentum
    assert isinstance(make_optimizer(model, Config(), 10)[0], torch.optim.AdamW)  # the default


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_resume_reproduces_an_uninterrupted_run(esc50, tmp_path, monkeypatch, capsys, ema):
    args = ("--epochs", "4", "--mixup-alpha", "0.4", "--ema-decay", ema)
    cfg, f = setup(esc50, tmp_path, *args)
    full = run(cfg, f, tmp_path / "full")

    real = train.train_one_epoch
    calls = []

    def interrupt_third_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "train_one_epoch", interrupt_third_epoch)
    cfg, f = setup(esc50, tmp_path, *args)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, f, tmp_path / "cut")
    assert "Run the same command again to resume" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    monkeypatch.setattr(train, "train_one_epoch", real)
    cfg, f = setup(esc50, tmp_path, *args)  # a fresh process would rebuild all
    resumed = run(cfg, f, tmp_path / "cut")
    cols = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    pd.testing.assert_frame_equal(resumed[cols], full[cols])


def test_ema_weights_are_validated_and_saved(esc50, tmp_path):
    cfg, f = setup(esc50, tmp_path, "--epochs", "3", "--ema-decay", "0.9")
    hist = run(cfg, f, tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    trained, average = last["ema"]["trained"], last["model"]
    assert not torch.equal(trained["fc.weight"], average["fc.weight"])
    assert not torch.equal(trained["bn1.running_mean"], average["bn1.running_mean"])  # BatchNorm statistics too
    f["model"].load_state_dict(average)
    m = evaluate(f["model"], f["features"], f["val"], torch.device("cpu"), group=cfg.group, amp=cfg.amp)
    assert m["accuracy"] == hist["val_accuracy"].iloc[-1] and m["loss"] == pytest.approx(hist["val_loss"].iloc[-1])
    f["model"].load_state_dict(trained)
    m = evaluate(f["model"], f["features"], f["val"], torch.device("cpu"), group=cfg.group, amp=cfg.amp)
    assert m["loss"] != pytest.approx(hist["val_loss"].iloc[-1])


def test_torchrun_two_processes_write_one_set_of_files(esc50, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "main.py"), *tiny_args(tmp_path, esc50, "--epochs", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "results" / "resnet18_coarse"
    assert len(pd.read_csv(out / "fold5" / "history.csv")) == 2
    assert (out / "fold5" / "test_metrics.csv").exists()
    assert proc.stdout.count("test fold 5: accuracy") == 1  # one summary: rank 0 alone reports and writes
    assert sorted(p.name for p in (out / "fold5").glob("*.pt")) == ["best.pt", "last.pt"]


def _write_many(path, text, start, n=300):
    start.wait()
    for _ in range(n):
        train.atomic_write(path, lambda tmp: tmp.write_text(text))


def test_atomic_write_from_processes_writing_one_file_at_once(tmp_path):
    """Folds run as parallel processes all write the run's config.json and data figures."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    start, path = ctx.Event(), tmp_path / "config.json"
    texts = ["a" * 100_000, "b" * 100_000]
    procs = [ctx.Process(target=_write_many, args=(path, t, start)) for t in texts]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]  # a shared temporary name made one rename fail
    assert path.read_text() in texts and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("omp, local, want", [(None, None, 2), (None, "2", 1), ("1", None, 3)])
def test_cpu_threads_split_between_local_processes_unless_omp_num_threads_says(monkeypatch, omp, local, want):
    """torchrun's processes share the cores; folds run side by side set OMP_NUM_THREADS, which
    torch read at import (3 stands for it here) and which setup_distributed leaves alone."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for name, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local), ("WORLD_SIZE", None)):
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        train.setup_distributed()
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_decay_norm_bias_off_spares_batchnorm_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(1, 1, 5, 5))
    assert len(make_optimizer(model, Config(), 10)[0].param_groups) == 1  # the default decays all
    opt = make_optimizer(model, Config(decay_norm_bias=False, weight_decay=0.5), 10)[0]
    decayed, spared = opt.param_groups
    assert decayed["weight_decay"] == 0.5 and spared["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [(4, 1, 3, 3), (2, 36)]
    assert len(spared["params"]) == 4  # conv bias, BatchNorm weight and bias, linear bias
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: only weight decay moves a parameter
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert moved == [True, False, False, False, True, False]  # conv w, conv b, BN w, BN b, linear w, linear b
