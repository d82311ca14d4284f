"""Tests for download.py on a small fake archive; a local HTTP server stands in for GitHub.

    .venv/bin/python -m pytest -q tests/test_download.py
"""
import contextlib
import hashlib
import shutil
import socket
import struct
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

import download
from download import CATEGORIES, CLASSES, category_table, ensure_esc50, find_clip, main
from fake_esc50 import make_fake_esc50, zip_dir

N_CLIPS = 250  # the fake archive: 50 classes x 5 folds x 1 clip


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory):
    """A pristine fake ESC-50 directory; tests that change it work on a copy."""
    return make_fake_esc50(tmp_path_factory.mktemp("fake"), clips_per_fold=1)


@pytest.fixture(scope="session")
def fake_zip(fake_dir, tmp_path_factory):
    return zip_dir(fake_dir, tmp_path_factory.mktemp("zip") / "ESC-50-master.zip")


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0)


@contextlib.contextmanager
def serve(data: bytes, cut_first=None, honour_range=True):
    """Serve `data` on 127.0.0.1; yield (url, Range headers seen, one per request).

    cut_first: on the first request, close the connection after this many bytes.
    honour_range=False: answer every request with 200 and the whole file.
    """
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            seen.append(rng)
            start = int(rng.split("=")[1].split("-")[0]) if rng and honour_range else 0
            if start >= len(data) > 0:
                self.send_response(416)
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206 if rng and honour_range else 200)
            if rng and honour_range:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut_first is not None and len(seen) == 1:
                body = body[:cut_first]  # HTTP/1.0: the connection closes when we return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/master.zip", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def snapshot(directory):
    """{relative path: sha256} of every file under `directory`."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_fake(fake_dir, tmp_path):
    return shutil.copytree(fake_dir, tmp_path / "src" / "ESC-50-master")


def assert_installed(dest, n=N_CLIPS):
    assert download.is_verified(dest)
    assert len(list((dest / "audio").iterdir())) == n
    table = pd.read_csv(dest / "meta" / "esc50_categories.csv")
    pd.testing.assert_frame_equal(table, category_table())


# ---------------------------------------------------------------------------- download

def test_download_installs_and_reports(fake_zip, tmp_path, capsys):
    root = tmp_path / "data"
    with serve(fake_zip.read_bytes()) as (url, seen):
        dest = ensure_esc50(root, url=url)
    assert seen == [None]
    assert dest == root / "ESC-50"
    assert_installed(dest)
    assert f"{N_CLIPS} clips, {N_CLIPS // 5} per category, {N_CLIPS // 5} per fold" \
        in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["ESC-50"]  # zip and temp dirs gone


def test_download_cut_off_resumes_with_range(fake_zip, tmp_path):
    data = fake_zip.read_bytes()
    cut = len(data) // 2
    with serve(data, cut_first=cut) as (url, seen):
        dest = ensure_esc50(tmp_path, url=url)
    assert seen == [None, f"bytes={cut}-"]
    assert_installed(dest)


def test_download_restarts_when_server_ignores_range(fake_zip, tmp_path):
    data = fake_zip.read_bytes()
    with serve(data, cut_first=len(data) // 3, honour_range=False) as (url, seen):
        dest = ensure_esc50(tmp_path, url=url)
    assert len(seen) == 2 and seen[1] is not None  # asked to resume, got the whole file
    assert_installed(dest)


def test_download_gives_up_with_backoff_and_suggests_source(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/master.zip"
    sleeps = []
    monkeypatch.setattr(download, "BACKOFF_S", 0.001)
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    with pytest.raises(RuntimeError, match="--source") as e:
        ensure_esc50(tmp_path, url=url, retries=2)
    assert url in str(e.value) and "0 bytes received" in str(e.value)
    assert sleeps == [0.002, 0.004]


def test_corrupt_download_is_deleted(fake_zip, tmp_path):
    data = bytearray(fake_zip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with serve(bytes(data)) as (url, _):
        with pytest.raises(ValueError, match="download afresh"):
            ensure_esc50(tmp_path, url=url)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- verification

def flip_member_byte(zip_path, member):
    """Corrupt one byte of a stored member's data, so its CRC no longer matches."""
    with zipfile.ZipFile(zip_path) as z:
        info = z.getinfo(member)
    with open(zip_path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("damage, message", [
    ("crc", "fails its CRC check"),
    ("no_csv", "no meta/esc50.csv"),
    ("not_zip", "not a zip file"),
])
def test_bad_zip_leaves_good_copy_intact(fake_dir, tmp_path, damage, message):
    root = tmp_path / "data"
    dest = ensure_esc50(root, source=fake_dir)
    before = snapshot(dest)
    src = copy_fake(fake_dir, tmp_path)
    bad_zip = tmp_path / "bad.zip"
    if damage == "no_csv":
        (src / "meta" / "esc50.csv").unlink()
    zip_dir(src, bad_zip)
    if damage == "crc":
        flip_member_byte(bad_zip, "ESC-50-master/audio/" + sorted(snapshot(src / "audio"))[0])
    if damage == "not_zip":
        bad_zip.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ValueError, match=message):
        ensure_esc50(root, source=bad_zip, force=True)
    assert snapshot(dest) == before and download.is_verified(dest)
    assert sorted(p.name for p in root.iterdir()) == ["ESC-50"]  # no temp dir left behind
    assert bad_zip.exists()  # a user's --source is never deleted


def test_failed_swap_restores_old_copy(fake_dir, tmp_path, monkeypatch):
    root = tmp_path / "data"
    dest = ensure_esc50(root, source=fake_dir)
    before = snapshot(dest)
    rename = download.os.rename

    def failing_rename(src, dst):  # fail at the worst moment: old copy already moved aside
        if Path(dst) == dest and ".tmp-" in str(src):
            raise OSError("disk went away")
        rename(src, dst)

    monkeypatch.setattr(download.os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk went away"):
        ensure_esc50(root, source=fake_dir, force=True)
    assert snapshot(dest) == before and download.is_verified(dest)
    assert sorted(p.name for p in root.iterdir()) == ["ESC-50"]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_clip_is_named(fake_dir, tmp_path, damage):
    src = copy_fake(fake_dir, tmp_path)
    clip = sorted((src / "audio").iterdir())[7]
    data = clip.read_bytes()
    clip.write_bytes(b"this is not audio" * 100 if damage == "garbage" else data[:len(data) // 2])
    with pytest.raises(ValueError, match=clip.name):
        ensure_esc50(tmp_path / "data", source=src)
    assert list((tmp_path / "data").iterdir()) == []


def test_missing_clip_is_named(fake_dir, tmp_path):
    src = copy_fake(fake_dir, tmp_path)
    clip = sorted((src / "audio").iterdir())[3]
    clip.unlink()
    with pytest.raises(ValueError, match=f"{clip.stem}.wav not found"):
        ensure_esc50(tmp_path / "data", source=src)


def _rename_target_7(df):
    df.loc[df.target == 7, "category"] = "bugs"
    return df


def _drop_one_clip(df):
    return df.iloc[1:]


def _move_clip_to_other_fold(df):  # classes stay balanced, folds do not
    df.loc[df.index[0], "fold"] = 2 if df.loc[df.index[0], "fold"] == 1 else 1
    return df


def _split_recording_across_folds(df):
    a = df[(df.fold == 1) & (df.target == 0)].index[0]
    b = df[(df.fold == 2) & (df.target == 0)].index[0]
    df.loc[b, "src_file"] = df.loc[a, "src_file"]
    return df


def _share_recording_across_classes(df):  # as the official csv does for 4 recordings
    a = df[(df.fold == 1) & (df.target == 0)].index[0]
    b = df[(df.fold == 2) & (df.target == 1)].index[0]
    df.loc[b, "src_file"] = df.loc[a, "src_file"]
    return df


def test_recording_shared_across_classes_is_accepted(fake_dir, tmp_path):
    src = copy_fake(fake_dir, tmp_path)
    csv = src / "meta" / "esc50.csv"
    _share_recording_across_classes(pd.read_csv(csv)).to_csv(csv, index=False)
    assert_installed(ensure_esc50(tmp_path / "data", source=src))


def _drop_column(df):
    return df.drop(columns="take")


@pytest.mark.parametrize("edit, messages", [
    (_rename_target_7, ["target 7", "bugs", "insects"]),
    (_drop_one_clip, ["clips per class differ"]),
    (_move_clip_to_other_fold, ["folds 1..5 of equal size"]),
    (_split_recording_across_folds, ["more than one fold"]),
    (_drop_column, ["lacks columns", "take"]),
])
def test_bad_metadata_is_explained(fake_dir, tmp_path, edit, messages):
    src = copy_fake(fake_dir, tmp_path)
    csv = src / "meta" / "esc50.csv"
    edit(pd.read_csv(csv)).to_csv(csv, index=False)
    with pytest.raises(ValueError) as e:
        ensure_esc50(tmp_path / "data", source=src)
    for m in messages:
        assert m in str(e.value)


# ---------------------------------------------------------------------------- sources

def test_source_flac_directory(tmp_path):
    # The source's only subdirectory holds the data, as an unpacked GitHub archive does.
    fake = make_fake_esc50(tmp_path / "flac", clips_per_fold=1, fmt="flac")
    dest = ensure_esc50(tmp_path / "data", source=fake.parent)
    assert_installed(dest)
    assert {p.suffix for p in (dest / "audio").iterdir()} == {".flac"}  # copied as they are
    assert snapshot(dest / "audio") == snapshot(fake / "audio")


def test_source_zip_is_kept(fake_zip, tmp_path):
    dest = ensure_esc50(tmp_path / "data", source=fake_zip)
    assert_installed(dest)
    assert fake_zip.exists()


def test_second_run_does_nothing(fake_dir, tmp_path, monkeypatch, capsys):
    calls = []
    read = download.sf.read
    monkeypatch.setattr(download.sf, "read", lambda *a, **k: calls.append(a) or read(*a, **k))
    dest = ensure_esc50(tmp_path, source=fake_dir)
    assert len(calls) == N_CLIPS
    capsys.readouterr()
    assert ensure_esc50(tmp_path, source=fake_dir) == dest
    assert ensure_esc50(tmp_path, url="http://127.0.0.1:1/unreachable") == dest
    assert len(calls) == N_CLIPS  # nothing decoded, nothing downloaded
    assert "already installed" in capsys.readouterr().out
    ensure_esc50(tmp_path, source=fake_dir, force=True)
    assert len(calls) == 2 * N_CLIPS
    # The marker vouches for this esc50.csv only.
    with open(dest / "meta" / "esc50.csv", "a") as f:
        f.write("\n")
    assert not download.is_verified(dest)


def test_find_clip(tmp_path):
    (tmp_path / "1-2-A-3.ogg").write_bytes(b"")
    assert find_clip(tmp_path, "1-2-A-3.wav") == tmp_path / "1-2-A-3.ogg"
    with pytest.raises(FileNotFoundError, match=r"9-9-A-9\.wav.*9-9-A-9\.flac, 9-9-A-9\.ogg"):
        find_clip(tmp_path, "9-9-A-9.wav")


def test_category_table():
    t = category_table()
    assert list(t.columns) == ["target", "class_name", "category_id", "category_name"]
    assert len(t) == 50 and list(t.target) == list(range(50))
    assert list(t.class_name) == CLASSES and len(set(CLASSES)) == 50
    assert (t.category_id == t.target // 10).all()
    assert (t.category_name == [CATEGORIES[c] for c in t.category_id]).all()
    assert t.groupby("category_name").size().to_dict() == {c: 10 for c in CATEGORIES}
    assert t.class_name[t.category_name == "animals"].tolist()[:3] == ["dog", "rooster", "pig"]
    assert t.class_name[t.category_name == "exterior"].tolist()[-1] == "hand_saw"


# ---------------------------------------------------------------------------- CLI

def test_main_cli(fake_dir, tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["--source", str(fake_dir), "--root", str(root)]) == 0
    assert f"{N_CLIPS} clips" in capsys.readouterr().out
    assert download.is_verified(root / "ESC-50")


@pytest.mark.parametrize("source, message", [
    ("missing", "does not exist"),
    ("empty_dir", "not an ESC-50 directory"),
])
def test_main_cli_bad_source(tmp_path, capsys, source, message):
    (tmp_path / "empty_dir").mkdir()
    code = main(["--source", str(tmp_path / source), "--root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error:") and message in err and source in err
    assert "Traceback" not in err
