import dataclasses
import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import main
import predict
import train
from conftest import tiny_args
from download import CATEGORIES, CLASSES
from fake_esc50 import make_clip
from model import MeanMaxPool

ROOT = Path(__file__).resolve().parents[1]
DATA_FIGURES = ["samples_per_class.png", "random_waveform_samples.png", "random_log_spectrogram_samples.png"]
FOLD_FIGURES = ["resnet18_confusion_matrix.png", "resnet18_loss.png", "resnet18_accuracy.png",
                "random_log_spectrogram_samples_predictions.png"]


@pytest.fixture(scope="module")
def run(esc50, tmp_path_factory):
    """One tiny coarse run on test fold 5, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    assert main.main(tiny_args(tmp, esc50, "--epochs", "6")) == 0
    return tmp


def test_end_to_end_writes_every_output(run):
    res, figs = run / "results" / "resnet18_coarse", run / "figures" / "resnet18_coarse"
    fold = res / "fold5"
    hist = pd.read_csv(fold / "history.csv")
    assert list(hist.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                                  "seconds"] and len(hist) == 6
    metrics = pd.read_csv(fold / "test_metrics.csv")
    assert {"loss", "accuracy", "balanced_accuracy", "macro_f1"} <= set(metrics.columns) and len(metrics) == 1
    assert metrics["accuracy"].iloc[0] >= 0.7  # five well-separated categories; chance is 0.2
    preds = pd.read_csv(fold / "predictions.csv")
    assert list(preds.columns) == ["filename", "fold", "true", "predicted"] + [f"p_{c}" for c in CATEGORIES]
    assert len(preds) == 50 and (preds["fold"] == 5).all()
    assert np.allclose(preds.filter(like="p_").sum(axis=1), 1, atol=1e-3)
    assert metrics["accuracy"].iloc[0] == pytest.approx((preds["true"] == preds["predicted"]).mean(), abs=1e-4)
    cm = pd.read_csv(fold / "confusion_matrix.csv", index_col=0)
    assert list(cm.index) == CATEGORIES and list(cm.columns) == CATEGORIES and cm.to_numpy().sum() == 50
    report = pd.read_csv(fold / "classification_report.csv", index_col=0)
    assert set(CATEGORIES) <= set(report.index) and "f1-score" in report.columns
    assert json.loads((res / "config.json").read_text())["epochs"] == 6
    assert {p.name for p in fold.glob("*.pt")} == {"best.pt", "last.pt"}
    for name in DATA_FIGURES:
        assert (figs / name).stat().st_size > 10_000
    for name in FOLD_FIGURES + ["resnet18_saliency.png"]:
        assert (figs / "fold5" / name).stat().st_size > 10_000


def test_run_json_records_provenance(run, esc50, monkeypatch):
    res = run / "results" / "resnet18_coarse"
    rec = json.loads((res / "fold5" / "run.json").read_text())
    assert rec["command"] and rec["seed"] == 0 and rec["test_fold"] == 5
    assert set(rec["versions"]) == {"python", "torch", "torchaudio", "torchvision", "numpy", "scikit-learn", "pandas"}
    assert rec["device"]["type"] == "cpu" and rec["device"]["threads"] >= 1 and rec["device"]["name"]
    assert rec["device"]["precision"] == "float32"  # tiny_args pass --no-amp
    monkeypatch.setattr(train, "bf16_is_fast", lambda device: True)  # as on a CPU with AMX, or CUDA
    for amp, precision in ((True, "bfloat16"), (False, "float32")):
        cfg = main.Config(sample_rate=8000, amp=amp)
        assert main.provenance(cfg, esc50, torch.device("cpu"))["device"]["precision"] == precision
    import hashlib
    assert rec["data"]["esc50_csv_sha256"] == hashlib.sha256((esc50 / "meta" / "esc50.csv").read_bytes()).hexdigest()
    assert len(rec["data"]["waveform_cache_key"]) == 64
    assert rec["wall_seconds"] > 0 and rec["started"] <= rec["ended"]
    assert "git_commit" in rec and "git_dirty" in rec
    assert json.loads((res / "run.json").read_text())["folds_run"] == [5]
    from train import load_checkpoint
    assert load_checkpoint(res / "fold5" / "best.pt")["provenance"]["command"] == rec["command"]


def test_git_dirty_flag_follows_tracked_files(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "a"], cwd=repo, check=True)
    monkeypatch.setattr(main, "__file__", str(repo / "main.py"))
    assert main._git("status", "--porcelain", "--untracked-files=no") == ""
    (repo / "a.py").write_text("x = 2\n")
    assert main._git("status", "--porcelain", "--untracked-files=no") != ""


def test_provenance_is_taken_before_the_run_rewrites_config_json(run, esc50, monkeypatch):
    # a committed run resumed for another fold rewrites its config.json ("folds"); git_dirty must not see that
    path = run / "results" / "resnet18_coarse" / "config.json"
    path.write_text(path.read_text().replace('"folds": "5"', '"folds": "4,5"'))
    seen, provenance = [], main.provenance
    monkeypatch.setattr(main, "provenance", lambda *a: seen.append(json.loads(path.read_text())["folds"])
                        or provenance(*a))
    assert main.main(tiny_args(run, esc50, "--epochs", "6")) == 0  # fold 5 is complete: skipped
    assert seen == ["4,5"] and json.loads(path.read_text())["folds"] == "5"


def test_second_start_skips_a_complete_fold_and_refuses_another_config(run, esc50, capsys):
    assert main.main(tiny_args(run, esc50, "--epochs", "6")) == 0
    assert "fold 5: complete, skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another config.*epochs: 6 there, 7 now"):
        main.main(tiny_args(run, esc50, "--epochs", "7"))


def test_cv_writes_a_summary_of_five_folds(esc50, tmp_path, capsys):
    args = tiny_args(tmp_path, esc50, "--epochs", "1", "--task", "fine", "--n-mels", "16", "--freq-mask-bins", "2")
    assert main.main([*args, "--folds", "1,2"]) == 0  # a first sitting
    res = tmp_path / "results" / "resnet18_fine"
    assert not (res / "cv_summary.csv").exists()
    assert "CV summary waits for folds [3, 4, 5]" in capsys.readouterr().out
    assert main.main([*args, "--cv"]) == 0  # the rest; folds 1 and 2 are skipped
    out = capsys.readouterr().out
    assert "fold 1: complete, skipped" in out and "on the 5 categories: accuracy" in out
    assert "fold 3: test accuracy" in out and "fold 1: test accuracy" not in out  # printed as each fold ends
    summary = pd.read_csv(res / "cv_summary.csv")
    assert summary["test_fold"].astype(str).tolist() == ["1", "2", "3", "4", "5", "mean", "std"]
    assert summary["accuracy"].iloc[5] == pytest.approx(summary["accuracy"].iloc[:5].mean(), abs=1e-4)
    assert (res / "cv_summary.csv").read_text().splitlines()[1].startswith("1,1,1,")  # epochs stay integers
    assert (tmp_path / "figures" / "resnet18_fine" / "resnet18_cv_accuracy.png").exists()
    preds = pd.read_csv(res / "fold3" / "predictions.csv")
    assert preds.shape[1] == 4 + 50 and set(preds["fold"]) == {3}
    # a fine run also scores its predictions on the 5 categories: class probabilities summed
    category = {c: i // 10 for i, c in enumerate(CLASSES)}  # ESC-50: category = target // 10
    probs = preds.filter(like="p_").rename(columns=lambda c: category[c[2:]]).T.groupby(level=0).sum().T
    expected = (probs.to_numpy().argmax(1) == preds["true"].map(category).to_numpy()).mean()
    metrics = pd.read_csv(res / "fold3" / "test_metrics.csv")
    assert metrics["category_accuracy"].iloc[0] == pytest.approx(expected, abs=1e-4)
    assert "category_accuracy" in summary
    assert not (tmp_path / "figures" / "resnet18_fine" / "fold3" / "resnet18_saliency.png").exists()


COMMITTED_RUNS = subprocess.run(["git", "ls-files", "results/*/config.json"], cwd=ROOT, capture_output=True,
                                text=True).stdout.split()
COMMITTED_SUMMARIES = subprocess.run(["git", "ls-files", "results/*/cv_summary.csv"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.split()


def test_a_setting_missing_from_an_older_config_reads_as_its_default(tmp_path):
    old = {k: v for k, v in dataclasses.asdict(main.Config()).items() if k != "decay_norm_bias"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    main.check_run_config(main.Config(), tmp_path)  # the run made before the setting: resumed
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="decay_norm_bias: True there, False now"):
        main.check_run_config(main.Config(decay_norm_bias=False), tmp_path)


@pytest.mark.parametrize("config", COMMITTED_RUNS)
def test_committed_runs_can_be_repeated_and_leave_the_default_command_free(config, tmp_path):
    """Each committed run folder is the one its own config names, so its README command (with
    --name) lands there, and none uses a default name ({model}_{task}): `python main.py` on a
    clone would then skip the fold (or refuse another config) and leave no checkpoint."""
    path = ROOT / config
    cfg = main.Config(**json.loads(path.read_text()))
    assert cfg.name and cfg.run_name == path.parent.name
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(path.read_text())
    main.check_run_config(cfg, tmp_path / "run")


def test_readme_commands_repeat_the_committed_configs():
    """Every README command naming a committed run parses to that run's config (all but where
    and which folds), so a change of default must be written into the commands of older runs."""
    readme = (ROOT / "README.md").read_text()
    # an inline command wrapped over lines in the prose reads as one line
    readme = re.sub(r"(?<!`)`[^`]+`(?!`)", lambda m: re.sub(r"\s*\n\s*", " ", m.group(0)), readme)
    commands = re.findall(r"python main\.py([^`|\n&;#]*--name (resnet18_\w+)[^`|\n&;#]*)", readme)
    checked = 0
    for args, name in commands:
        path = ROOT / "results" / name / "config.json"
        if str(path.relative_to(ROOT)) not in COMMITTED_RUNS:
            continue
        cfg = dataclasses.asdict(main.parse_config(shlex.split(re.sub(r"(--folds )(\$?k)\b", r"\g<1>1", args))))
        diff = {k: (cfg[k], v) for k, v in json.loads(path.read_text()).items()
                if k not in ("folds", "cv", "device", "data_root") and cfg[k] != v}
        assert not diff, f"README: python main.py{args} -> {diff} (README value, {name}/config.json)"
        checked += 1
    assert checked >= 40


def test_readme_tables_match_the_committed_cv_summaries():
    """Each README table row naming a run with a committed cv_summary.csv (and the "5
    categories" row under it) shows that file's mean +- std and per-fold test accuracy, to the
    digits it prints."""
    def shown(text, value):
        return abs(float(text) - value) <= 0.5 * 10 ** -len(text.split(".")[1]) + 1e-9

    checked, name = 0, None
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if m := re.search(r"--name (resnet18_\w+)", line if line.startswith("|") else ""):
            name, col = m.group(1), "accuracy"
        elif line.startswith("| 5 categories") and name:
            col = "category_accuracy"
        else:
            name = None
            continue
        path = ROOT / "results" / name / "cv_summary.csv"
        if str(path.relative_to(ROOT)) not in COMMITTED_SUMMARIES:
            continue
        acc = pd.read_csv(path).set_index("test_fold")[col]
        for cell in cells:
            if m := re.fullmatch(r"(\d\.\d+) \+- (\d\.\d+)", cell):
                assert shown(m.group(1), acc["mean"]) and shown(m.group(2), acc["std"]), (name, col, cell)
                checked += 1
            elif re.fullmatch(r"\d\.\d+(, \d\.\d+){4}", cell):
                assert all(shown(v, acc[str(k)]) for k, v in enumerate(cell.split(", "), 1)), (name, col, cell)
                checked += 1
    assert checked >= 50


def test_readme_table_rows_have_their_headers_cells():
    """Markdown drops a row's cells beyond its header's count without a word, so a stray `|`
    would hide a verdict: each table row has as many cells as the header above it."""
    header = None
    for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = line.replace("\\|", "").count("|") - 1
        header = header or cells
        assert cells == header, f"README.md line {n}: {cells} cells under a header of {header}"


def test_cli_overrides():
    cfg = main.parse_config(["--epochs", "30", "--task", "fine", "--cv", "--batch-size=64", "--no-amp", "--lr", "1e-4"])
    assert (cfg.epochs, cfg.task, cfg.cv, cfg.batch_size, cfg.amp, cfg.lr) == (30, "fine", True, 64, False, 1e-4)
    assert cfg.fold_list == [1, 2, 3, 4, 5] and cfg.run_name == "resnet18_fine"
    assert main.parse_config(["--mixup_alpha", "0", "--pretrained", "true"]).pretrained is True
    assert main.parse_config([]) == main.Config()


@pytest.mark.parametrize("args, message", [
    (["--epoch", "3"], "unrecognized arguments: --epoch"),
    (["--epochs", "ten"], "invalid int value: 'ten'"),
    (["--task", "medium"], "invalid choice: 'medium'"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--epochs", "0"], "--epochs 0: must be positive"),
    (["--folds", "1,7"], "--folds '1,7': must be comma-separated numbers from 1 to 5"),
    (["--f-max", "12000"], "--f_max 12000.0: must be at most sample_rate / 2"),
    (["--crop-seconds", "6"], "ESC-50 clips are 5 s long"),
    (["--crop-min-energy", "1.5"], "--crop_min_energy 1.5: must be in [0, 1]"),
    (["--ema-decay", "1"], "--ema_decay 1.0: must be in [0, 1)"),
    (["--pitch", "-2"], "--pitch -2.0: must be >= 0"),
    (["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
    (["--pool", "max"], "invalid choice: 'max'"),
    (["--cv", "maybe"], "'maybe' is not a boolean"),
])
def test_cli_errors_name_the_value(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_config(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_predict_any_rate_length_and_channels(run, tmp_path, capsys):
    ckpt = run / "results" / "resnet18_coarse" / "fold5" / "best.pt"
    rng = np.random.default_rng(3)
    target = 45  # exterior: a 2,700 Hz tone
    files = []
    for name, sr, seconds, channels, fmt in [("mono_8k.wav", 8000, 1.0, 1, "WAV"),
                                             ("stereo_22k.flac", 22050, 1.0, 2, "FLAC"),
                                             ("long_16k.wav", 16000, 12.0, 1, "WAV"),
                                             ("short_8k.wav", 8000, 0.3, 1, "WAV")]:
        x = make_clip(target, rng, sr, seconds)
        sf.write(tmp_path / name, np.stack([x] * channels, 1) if channels > 1 else x, sr, format=fmt)
        files.append(str(tmp_path / name))
    (tmp_path / "notes.wav").write_text("this is not audio")
    code = predict.main([*files, str(tmp_path / "notes.wav"), "--checkpoint", str(ckpt), "--top", "2"])
    out, err = capsys.readouterr()
    assert code == 1  # one file failed, the others were scored
    assert "notes.wav" in err and "could not decode" in err
    assert "run resnet18_coarse" in out and "commit" in out
    lines = [line for line in out.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 4
    top2 = [[p.split()[0] for p in line.split(": ")[1].split(", ")] for line in lines[:3]]
    assert all(len(t) == 2 and "exterior" in t for t in top2), top2  # a resampling slip moves the tone
    windows = predict.Predictor(ckpt).windows(torch.arange(8000 * 2.5))  # the fake clips last 1 s
    assert windows.shape == (3, 8000) and windows[2, 4000:].abs().sum() == 0 and windows[2, 0] == 8000 * 2


def test_predict_explain_writes_png_and_wav(run, tmp_path, capsys):
    ckpt = run / "results" / "resnet18_coarse" / "fold5" / "best.pt"
    rng = np.random.default_rng(4)
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, make_clip(12, rng), 8000)
    assert predict.main([str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "--checkpoint", str(ckpt),
                         "--explain", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_explanation.png", "a_explanation.wav", "b_explanation.png", "b_explanation.wav"]
    wav, sr = sf.read(tmp_path / "out" / "a_explanation.wav")
    assert sr == 8000 and len(wav) == 8000


def test_predictor_builds_the_checkpoints_pooling(run, tmp_path):
    best = run / "results" / "resnet18_coarse" / "fold5" / "best.pt"
    assert isinstance(predict.Predictor(best).model.avgpool, MeanMaxPool)  # the default
    ck = torch.load(best, weights_only=False)
    ck["config"]["pool"] = "avg"
    torch.save(ck, tmp_path / "avg.pt")
    assert isinstance(predict.Predictor(tmp_path / "avg.pt").model.avgpool, torch.nn.AdaptiveAvgPool2d)
    del ck["config"]["pool"]  # checkpoints from before the option pooled by the average
    torch.save(ck, tmp_path / "old.pt")
    assert isinstance(predict.Predictor(tmp_path / "old.pt").model.avgpool, torch.nn.AdaptiveAvgPool2d)
    assert isinstance(predict.Predictor(best).model.maxpool, torch.nn.MaxPool2d)
    ck["config"]["stem_pool"] = False
    torch.save(ck, tmp_path / "nostem.pt")
    assert isinstance(predict.Predictor(tmp_path / "nostem.pt").model.maxpool, torch.nn.Identity)


def test_mismatched_checkpoint_is_refused(run, tmp_path, capsys):
    ckpt = run / "results" / "resnet18_coarse" / "fold5" / "best.pt"
    with pytest.raises(ValueError, match=r"task is 'coarse' in the checkpoint but 'fine' was asked"):
        predict.Predictor(ckpt, expect={"task": "fine"})
    with pytest.raises(ValueError, match=r"n_mels is 32 in the checkpoint but 64 was asked"):
        predict.Predictor(ckpt, expect={"n_mels": 64})
    with pytest.raises(ValueError, match=r"num_classes is 5 in the checkpoint but 50 was asked"):
        predict.Predictor(ckpt, expect={"num_classes": 50})
    sf.write(tmp_path / "x.wav", np.zeros(8000, dtype=np.float32), 8000)
    assert predict.main([str(tmp_path / "x.wav"), "--checkpoint", str(ckpt), "--task", "fine"]) == 2
    assert "'fine' was asked" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "x.wav"), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_eval_crops_scores_the_validation_fold(run, esc50, capsys):
    from benchmarks import eval_crops
    res = run / "results" / "resnet18_coarse"
    argv = ["--results-dir", str(run / "results"), "--data-root", str(esc50.parent), "--folds", "5", "--crops", "3"]
    df = eval_crops.main(argv + ["--pitch", "1"])
    assert list(df.index) == [5] and df.loc[5, "validation_fold"] == 4
    assert 0 <= df.loc[5, "pitch -1,+0,+1"] <= 1
    # the whole-clip column is the validation accuracy main.py recorded for the best epoch
    best = pd.read_csv(res / "fold5" / "test_metrics.csv")["best_epoch"].iloc[0]
    hist = pd.read_csv(res / "fold5" / "history.csv").set_index("epoch")
    assert df.loc[5, "whole clip"] == pytest.approx(hist.loc[best, "val_accuracy"], abs=1e-4)
    out = capsys.readouterr().out
    assert 0 <= df.loc[5, "3 crops"] <= 1 and "crops / whole clip" in out and "pitch shifts / whole clip" in out
    with pytest.raises(SystemExit, match="semitones separated by commas"):
        eval_crops.main(argv + ["--pitch", "up"])
    with pytest.raises(SystemExit, match="train the run first"):
        eval_crops.main(argv[:4] + ["--run", "none"])


def test_silent_crops_benchmark_finds_the_padded_class(tmp_path, capsys):
    import soundfile as sf
    from benchmarks import silent_crops
    from download import ensure_esc50
    from fake_esc50 import make_fake_esc50
    src = make_fake_esc50(tmp_path / "src", clips_per_fold=1, seconds=5.0)
    meta = pd.read_csv(src / "meta" / "esc50.csv")
    padded = meta[meta.target == 0]
    for name in padded.filename:  # class 0 becomes a 0.3-s tone followed by silence
        x, sr = sf.read(src / "audio" / name)
        x[int(0.3 * sr):] = 0
        sf.write(src / "audio" / name, x, sr)
    ensure_esc50(tmp_path / "data", source=src)
    shares = silent_crops.main(["--data-root", str(tmp_path / "data"), "--crops", "640"])
    plain, picky = shares.values()
    name = padded.category.iloc[0]
    assert plain[name] > 0.5 and plain.drop(name).max() == 0  # every crop after 0.3 s is silent
    assert picky.max() == 0
    assert "worst classes: " + name in capsys.readouterr().out


def test_pipeline_benchmark_times_both_precisions_where_bf16_is_fast_and_compiled(tmp_path, capsys, monkeypatch):
    from benchmarks import pipeline
    from train import bf16_is_fast
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)  # the real one takes minutes here
    rates = pipeline.main(["--batches", "1", "--data-root", str(tmp_path), "--compile"])  # no ESC-50: random audio
    out = capsys.readouterr().out
    assert "random audio" in out and "data pipeline share" in out
    precisions = ["bf16", "float32"] if bf16_is_fast(torch.device("cpu")) else ["float32"]
    assert list(rates) == [n for p in precisions for n in (p, f"{p} compiled")] and len(compiled) == len(precisions)
    assert all(r > 0 for pair in rates.values() for r in pair)
    assert ("bf16 / float32 throughput" in out) == (len(precisions) == 2)
    assert "forward + backward + step, float32 compiled" in out and "float32 compiled / float32 throughput" in out
    for name, (tr, ev) in rates.items():  # each variant's line shows its own rates
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{name}: data pipeline share"))
        assert line.endswith(f"training {tr:.1f} samples/s, evaluation {ev:.1f} samples/s")


def test_processes_benchmark_times_one_process_against_several_side_by_side(tmp_path, capsys):
    from benchmarks import processes
    one, side = processes.main(["--processes", "2", "--seconds", "0.5", "--rounds", "1",
                                "--data-root", str(tmp_path), "--task", "fine"])  # random audio
    out = capsys.readouterr().out
    assert one > 0 and side > 0
    assert "1 process(es) x" in out and "2 process(es) x" in out and f"{side / one:.2f}x" in out
    with pytest.raises(SystemExit):  # a bad override stops before any process starts
        processes.main(["--n-mels", "many"])


def test_pipeline_benchmark_batches_outlast_an_epoch():
    from benchmarks.pipeline import cycle
    from dataset import WaveformDataset, make_loader
    loader = make_loader(WaveformDataset(np.zeros((3, 100), dtype=np.float16), [0, 1, 2]), 2)
    batches = cycle(loader)
    ys = [next(batches)[1].tolist() for _ in range(5)]
    assert ys == [[0, 1], [2], [0, 1], [2], [0, 1]]  # a new pass whenever the loader runs out


def fake_cv(root: Path, name: str, val: float, right: np.ndarray, task: str = "fine") -> Path:
    """A finished fine CV: per fold, two clips of each class, one probability table; clip i is
    predicted right (0.6 on its class) where right[i], else its class gets 0.3 and the next 0.4."""
    d = root / name
    (d / "config.json").parent.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"task": task}))
    for k in range(1, 6):
        (d / f"fold{k}").mkdir()
        history = pd.DataFrame({"epoch": [1, 2], "val_accuracy": [val / 2, val]})
        history.to_csv(d / f"fold{k}" / "history.csv", index=False)
        target = np.tile(np.arange(50), 2)
        p = np.full((100, 50), 0.3 / 48)
        p[np.arange(100), target] = np.where(right, 0.6, 0.3)
        p[np.arange(100), (target + 1) % 50] = np.where(right, 0.1, 0.4)
        df = pd.DataFrame(p, columns=[f"p_{c}" for c in CLASSES])
        df.insert(0, "true", [CLASSES[t] for t in target])
        df.insert(0, "filename", [f"{k}-{i}-A-{t}.wav" for i, t in enumerate(target)])
        df.sample(frac=1, random_state=k).to_csv(d / f"fold{k}" / "predictions.csv", index=False)  # any row order
    return d


def test_ensemble_averages_the_members_softmax(tmp_path, capsys):
    from benchmarks import ensemble
    first = np.arange(100) < 60  # a is right on clips 0-59, b on the others
    fake_cv(tmp_path, "a", 0.8, first)
    fake_cv(tmp_path, "b", 0.7, ~first)
    fake_cv(tmp_path, "c", 0.9, np.ones(100, bool), task="coarse")  # not a fine run: never picked
    df = ensemble.main(["--top", "2", "--results-dir", str(tmp_path)])
    assert "members, validation mean: a 0.8000, b 0.7000" in capsys.readouterr().out
    assert (df["a"] == 0.6).all() and (df["b"] == 0.4).all() and (df["first 1 averaged"] == 0.6).all()
    assert (df["first 2 averaged"] == 1.0).all()  # each clip: 0.6 + 0.3 on its class, 0.1 + 0.4 on the next
    wrong_category = np.arange(100)[~first] % 10 == 9  # a's wrong guess (the next class) leaves the category
    assert (df["first 1 averaged, categories"] == 1 - wrong_category.sum() / 100).all()
    with pytest.raises(SystemExit, match="not a fine-task run"):
        ensemble.main(["a", "c", "--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not both"):
        ensemble.main(["a", "--top", "1", "--results-dir", str(tmp_path)])
    (tmp_path / "b" / "fold3" / "predictions.csv").unlink()
    with pytest.raises(SystemExit, match="fold3/predictions.csv: the ensemble needs finished runs"):
        ensemble.main(["a", "b", "--results-dir", str(tmp_path)])


def test_ensemble_of_one_committed_cv_is_its_summary():
    from benchmarks import ensemble
    summary = pd.read_csv(ROOT / "results" / "resnet18_fine_wd05" / "cv_summary.csv").iloc[:5]
    df = ensemble.main(["resnet18_fine_wd05", "--results-dir", str(ROOT / "results")])
    assert df["resnet18_fine_wd05"].tolist() == summary.accuracy.tolist()
    assert df["first 1 averaged, categories"].tolist() == summary.category_accuracy.tolist()
