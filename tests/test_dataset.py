import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from dataset import (Augment, LogMel, WaveformDataset, fold_roles, load_meta, load_waveforms, make_loader,
                     splits)


@pytest.fixture(scope="module")
def meta(esc50):
    return load_meta(esc50)


def test_meta_has_both_label_columns(meta):
    assert (meta["fine"] == meta["target"]).all()
    assert (meta["coarse"] == meta["target"] // 10).all()
    assert sorted(meta["coarse"].unique()) == [0, 1, 2, 3, 4]


def test_splits_follow_the_protocol(meta):
    tested = []
    for k in range(1, 6):
        tr, va, te = splits(meta, k)
        train_folds, val_fold, _ = fold_roles(k)
        assert set(meta.fold[te]) == {k} and set(meta.fold[va]) == {val_fold}
        assert val_fold == (k - 1 if k > 1 else 5)
        assert set(meta.fold[tr]) == set(train_folds) == {1, 2, 3, 4, 5} - {k, val_fold}
        assert len(tr) + len(va) + len(te) == len(meta)
        assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
        for a, b in ((tr, va), (tr, te), (va, te)):
            assert not set(meta.src_file[a]) & set(meta.src_file[b])
        tested += list(te)
    assert sorted(tested) == list(range(len(meta)))  # each clip tested exactly once over CV


def test_splits_refuse_a_leaky_csv(meta):
    extra_take = meta[meta.fold == 1].iloc[[0]].assign(fold=5, take="Z")  # a fold-1 recording in the test fold
    leaky = pd.concat([meta, extra_take], ignore_index=True)
    with pytest.raises(ValueError, match="more than one split"):
        splits(leaky, 5)


def test_cache_is_reused_and_rebuilt_when_the_rate_changes(esc50, tmp_path, monkeypatch, meta):
    waves = load_waveforms(esc50, 8000, cache_dir=tmp_path, meta=meta)
    assert waves.shape == (len(meta), 8000) and waves.dtype == np.float16
    calls = []
    real_read = sf.read
    monkeypatch.setattr(sf, "read", lambda *a, **k: calls.append(a) or real_read(*a, **k))
    again = load_waveforms(esc50, 8000, cache_dir=tmp_path, meta=meta)
    assert calls == [] and np.array_equal(again, waves)
    other = load_waveforms(esc50, 4000, cache_dir=tmp_path, meta=meta)
    assert len(calls) == len(meta) and other.shape == (len(meta), 4000)
    assert (tmp_path / "esc50_4000.npy").exists() and (tmp_path / "esc50_8000.npy").exists()


def test_cache_is_rebuilt_when_audio_changes(esc50, tmp_path, meta):
    import shutil
    data = tmp_path / "ESC-50"
    shutil.copytree(esc50, data)
    before = np.array(load_waveforms(data, 8000, cache_dir=tmp_path / "cache", meta=meta))
    clip = data / "audio" / meta.filename[0]
    sf.write(clip, np.zeros(8000, dtype=np.float32), 8000)
    after = load_waveforms(data, 8000, cache_dir=tmp_path / "cache", meta=meta)
    assert np.abs(before[0]).max() > 0 and np.abs(after[0]).max() == 0
    assert np.array_equal(before[1:], after[1:])


def test_corrupt_clip_is_named(esc50, tmp_path, meta):
    import shutil
    data = tmp_path / "ESC-50"
    shutil.copytree(esc50, data)
    (data / "audio" / meta.filename[3]).write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match=meta.filename[3]):
        load_waveforms(data, 8000, cache_dir=tmp_path / "cache", meta=meta)


def test_dataset_batches_equal_items_and_crop(esc50, meta):
    waves = load_waveforms(esc50, 8000, meta=meta)
    ds = WaveformDataset(waves, meta.coarse)
    x, y = ds.__getitems__([5, 2, 9])
    assert x.shape == (3, 8000) and y.tolist() == meta.coarse[[5, 2, 9]].tolist()
    assert torch.equal(x, torch.from_numpy(np.asarray(waves[[5, 2, 9]])))  # the cache's float16, unconverted
    assert torch.equal(x[1], ds[2][0])
    crop = WaveformDataset(waves, meta.coarse, crop=2000)
    torch.manual_seed(0)
    c, _ = crop.__getitems__([5, 5, 5, 5])
    assert c.shape == (4, 2000)
    full = torch.tensor(np.asarray(waves[5]))
    for row in c:  # each crop is a window of the clip, at its own offset
        starts = [s for s in range(8000 - 2000 + 1) if torch.equal(full[s:s + 2000], row)]
        assert starts
    assert len({tuple(r[:50].tolist()) for r in c}) > 1
    xb, yb = next(iter(make_loader(ds, 7, shuffle=True)))
    assert xb.shape == (7, 8000) and yb.shape == (7,)


def test_crops_skip_the_silence_around_a_short_event():
    waves = np.zeros((3, 8000), dtype=np.float16)
    waves[0, 500:900] = 0.5  # a 0.05 s event at the start of a silent clip
    waves[1, 7000:7400] = 0.5  # one at the end
    waves[2] = np.random.default_rng(0).uniform(-0.1, 0.1, 8000)  # a steady sound: any offset will do
    torch.manual_seed(0)
    plain = WaveformDataset(waves, [0, 1, 2], crop=2000)
    assert (plain.__getitems__([0, 1] * 100)[0].abs().amax(1) == 0).float().mean() > 0.5  # most miss the event
    picky = WaveformDataset(waves, [0, 1, 2], crop=2000, min_energy=0.25)
    x, y = picky.__getitems__([0, 1] * 100)
    assert x.shape == (200, 2000) and (x.abs().amax(1) > 0).all() and y.tolist() == [0, 1] * 100
    full = torch.from_numpy(waves[2])
    rows = picky.__getitems__([2] * 40)[0]
    starts = [next(s for s in range(6001) if torch.equal(full[s:s + 2000], row)) for row in rows]
    assert min(starts) < 1500 and max(starts) > 4500  # a steady clip keeps the whole range of offsets


def test_logmel_shape_dtype_and_normalisation(esc50, meta):
    waves = load_waveforms(esc50, 8000, meta=meta)
    lm = LogMel(8000, n_fft=256, hop_length=64, n_mels=32)
    loader = make_loader(WaveformDataset(waves, meta.coarse), 64)
    lm.fit_stats(loader)
    x = torch.cat([lm(w) for w, _ in loader])
    assert x.shape == (len(meta), 1, 32, 8000 // 64 + 1) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    db = lm.db(torch.from_numpy(np.asarray(waves[:4], dtype=np.float32)))
    assert torch.all(db >= db.amax(dim=(1, 2), keepdim=True) - 80 - 1e-4)  # top_db floor per clip
    silent = lm(torch.zeros(2, 8000))
    assert torch.isfinite(silent).all()


def test_augment_changes_training_batches_only():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 32, 63), torch.arange(8) % 5
    aug = Augment(5, db_per_unit=10.0, mixup_alpha=0.4)
    aug.eval()
    xe, te = aug(x, y)
    assert torch.equal(xe, x) and torch.equal(te, torch.nn.functional.one_hot(y, 5).float())
    aug.train()
    xt, tt = aug(x, y)
    assert xt.shape == x.shape and not torch.allclose(xt, x)
    assert torch.allclose(tt.sum(1), torch.ones(8)) and (tt.argmax(1) == y).all()  # mixup keeps the own label on top


def test_wave_mixing_is_gain_aware():
    torch.manual_seed(0)
    wave, y = torch.randn(6, 4000), torch.arange(6) % 5
    for aug in (Augment(5, mixup_alpha=0.4).train(), Augment(5, mixup_alpha=0.4, mixup_domain="wave").eval()):
        w, t = aug.mix(wave, y)  # spectrogram mixup, or not training: the waveforms pass unchanged
        assert torch.equal(w, wave) and torch.equal(t, torch.nn.functional.one_hot(y, 5).float())
    aug = Augment(5, mixup_alpha=0.4, mixup_domain="wave").train()
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 0.5])[:, None]
    torch.manual_seed(1)
    w, t = aug.mix(wave, y)
    torch.manual_seed(1)
    w_scaled, t_scaled = aug.mix(wave * scale, y)
    assert not torch.allclose(w, wave) and torch.equal(t, t_scaled)
    assert torch.allclose(t.sum(1), torch.ones(6)) and (t.argmax(1) == y).all()
    # the mixture sounds lam : 1 - lam whatever each clip's level: rescaling a clip changes no mixture's shape
    cos = torch.nn.functional.cosine_similarity(w, w_scaled, dim=1)
    assert torch.allclose(cos, torch.ones(6), atol=1e-5)
    assert not torch.allclose(torch.nn.functional.cosine_similarity(w, 0.5 * wave + 0.5 * wave * scale, dim=1),
                              torch.ones(6), atol=1e-3)
    x, t2 = aug(torch.randn(6, 1, 32, 63), t)  # the log-mel stage keeps the mixed targets
    assert torch.equal(t2, t)


@pytest.mark.parametrize("piece", ["gain_db", "stretch", "pitch", "shift", "time_masks", "freq_masks", "mixup_alpha"])
def test_each_augmentation_piece_switches(piece):
    off = dict(gain_db=0, stretch=1, pitch=0, shift=0, time_masks=0, freq_masks=0, mixup_alpha=0)
    x, y = torch.randn(8, 1, 32, 63), torch.arange(8) % 5
    aug = Augment(5, **off).train()
    assert torch.equal(aug(x, y)[0], x)  # everything off: identity even in training
    on = {"gain_db": 6.0, "stretch": 1.3, "pitch": 2.0, "shift": 0.5, "time_masks": 2, "freq_masks": 2,
          "mixup_alpha": 0.4}
    torch.manual_seed(1)
    aug = Augment(5, **{**off, piece: on[piece]}).train()
    assert not torch.allclose(aug(x, y)[0], x)


def test_pitch_shift_moves_a_tone_to_its_shifted_frequency():
    """The warped log-mel of a tone peaks in the bin of the tone played 2^(s/12) times higher."""
    lm, t = LogMel(16000, 1024, 160, 64), torch.arange(16000) / 16000
    aug = Augment(5, gain_db=0, stretch=1, shift=0, time_masks=0, freq_masks=0, pitch=4.0,
                  mel_range=(0.0, 8000.0)).train()
    peak = lambda x: x.mean(-1)[:, 0].argmax(-1)  # noqa: E731
    for f0 in (300.0, 1000.0, 3000.0):
        torch.manual_seed(3)
        shifted, _ = aug(lm(torch.sin(2 * torch.pi * f0 * t).repeat(6, 1)), torch.zeros(6, dtype=torch.long))
        torch.manual_seed(3)
        semitones = (torch.rand(6, 1) * 2 - 1) * 4.0  # the shifts the augmentation drew
        played = lm(torch.sin(2 * torch.pi * f0 * 2 ** (semitones / 12) * t))
        assert (peak(shifted) - peak(played)).abs().max() <= 1
        assert len(set(peak(shifted).tolist())) > 1  # the shifts differ per clip


def test_fixed_pitch_shift_moves_a_tone_in_eval_mode_and_zero_leaves_it():
    """shift_pitch applies the training warp at a given shift, also in eval mode (test-time averaging)."""
    lm, t = LogMel(16000, 1024, 160, 64), torch.arange(16000) / 16000
    aug = Augment(5, mel_range=(0.0, 8000.0)).eval()
    peak = lambda x: x.mean(-1)[:, 0].argmax(-1)  # noqa: E731
    x = lm(torch.sin(2 * torch.pi * 500.0 * t)[None])
    torch.testing.assert_close(aug.shift_pitch(x, 0), x, atol=1e-3, rtol=1e-4)
    for s in (-5.0, 2.0, 7.0):
        played = lm(torch.sin(2 * torch.pi * 500.0 * 2 ** (s / 12) * t)[None])
        assert peak(aug.shift_pitch(x, s)) != peak(x) and (peak(aug.shift_pitch(x, s)) - peak(played)).abs() <= 1
