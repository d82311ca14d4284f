"""Get ESC-50 onto disk, verified: data/ESC-50/{audio,meta} plus the 50-to-5 category table.

Owns the download (progress bar, HTTP Range resume, retry with backoff), installing from a
local copy, and verification. Nothing else in the repo touches the network.

    python download.py                         # download to data/ESC-50 (several hundred MB)
    python download.py --source ESC-50.zip     # install from a local zip ...
    python download.py --source ../shared/esc50    # ... or from a directory in ESC-50 layout
    python download.py --force                 # reinstall over a verified copy

Every install is unpacked into a temporary directory under --root, verified there (zip CRCs,
csv structure, class names, every clip decodable) and only then renamed into place, so a
failed or interrupted run never harms a good copy. A verified copy carries a marker
(meta/.verified, the sha256 of esc50.csv); when it is present, a second run returns at once.
A copy without the marker (for example one placed by hand) is replaced; to adopt it instead,
pass it as --source.
"""
import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import pandas as pd
import soundfile as sf
from tqdm import tqdm

URL = "https://github.com/karoldvl/ESC-50/archive/master.zip"
CATEGORIES = ["animals", "natural", "human", "interior", "exterior"]  # category id = target // CLASSES_PER_CATEGORY
CLASSES_PER_CATEGORY = 10
CLASSES = [  # ESC-50 class names in target order, as in esc50.csv's `category` column
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow",
    "rain", "sea_waves", "crackling_fire", "crickets", "chirping_birds", "water_drops",
    "wind", "pouring_water", "toilet_flush", "thunderstorm",
    "crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps", "laughing",
    "brushing_teeth", "snoring", "drinking_sipping",
    "door_wood_knock", "mouse_click", "keyboard_typing", "door_wood_creaks", "can_opening",
    "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick", "glass_breaking",
    "helicopter", "chainsaw", "siren", "car_horn", "engine", "train", "church_bells",
    "airplane", "fireworks", "hand_saw",
]
AUDIO_EXTS = (".wav", ".flac", ".ogg")
CSV_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
N_FOLDS = 5

DIRNAME = "ESC-50"                 # the installed copy: root/ESC-50
ZIPNAME = "ESC-50-master.zip"      # where a download lands: root/ESC-50-master.zip
MARKER = "meta/.verified"
BACKOFF_S = 1.0                    # first retry delay, doubled per failed attempt; tests set 0
TIMEOUT_S = 60.0                   # socket timeout of one request
CHUNK = 1 << 20


def category_table() -> pd.DataFrame:
    """The 50 classes with their major category: target, class_name, category_id, category_name."""
    return pd.DataFrame({
        "target": range(len(CLASSES)),
        "class_name": CLASSES,
        "category_id": [t // CLASSES_PER_CATEGORY for t in range(len(CLASSES))],
        "category_name": [CATEGORIES[t // CLASSES_PER_CATEGORY] for t in range(len(CLASSES))],
    })


def find_clip(audio_dir: Path, filename: str) -> Path:
    """The audio file for a csv name ("x.wav"): audio_dir/x.wav, x.flac or x.ogg."""
    stem = Path(filename).stem
    for ext in AUDIO_EXTS:
        path = Path(audio_dir) / (stem + ext)
        if path.is_file():
            return path
    raise FileNotFoundError(f"clip {filename} not found in {audio_dir} "
                            f"(tried {', '.join(stem + e for e in AUDIO_EXTS)})")


# ---------------------------------------------------------------------------- download

def _fetch(url: str, part: Path) -> None:
    """One request: append to `part` from where it ends, or rewrite it if the server won't resume."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "esc50-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urlopen(Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
        start = 0
        if have and resp.status == 206:
            # "bytes START-END/TOTAL": appending is only safe if it starts where we stopped.
            start = int(resp.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
            if start != have:
                part.unlink()
                raise ConnectionError(f"server resumed at byte {start}, expected {have}")
        elif have:
            print("server ignored the Range request; restarting from zero", file=sys.stderr)
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc="ESC-50", leave=False) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    # http.client returns b"" rather than raising when the peer closes before Content-Length.
    got = part.stat().st_size
    if total is not None and got < total:
        raise http.client.IncompleteRead(b"", total - got)


def download(url: str, dest: Path, retries: int = 5) -> Path:
    """Stream `url` to `dest` via `dest`.part, resuming and retrying; return `dest`.

    Gives up after `retries` retries in a row that brought no new bytes, so a flaky
    connection that keeps making progress is followed to the end.
    """
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch(url, part)
            break
        except HTTPError as e:
            if e.code == 416:  # our .part is not a prefix of what the server has: start over
                part.unlink(missing_ok=True)
            elif e.code < 500 and e.code not in (408, 429):
                raise RuntimeError(f"download of {url} failed: HTTP {e.code} {e.reason}. "
                                   f"Check --url, or install from a local copy with --source PATH.")
            error = e
        except (URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            error = e
        got = part.stat().st_size if part.exists() else 0
        failures = 0 if got > before else failures + 1
        if failures > retries:
            raise RuntimeError(
                f"download of {url} failed after {retries} retries ({got:,} bytes received"
                f"{f', kept in {part}; run again to resume' if got else ''}): {error!r}. "
                f"Without network access, "
                f"install from a local copy with --source PATH (a zip or an ESC-50 directory).")
        delay = BACKOFF_S * 2 ** failures
        print(f"download interrupted ({error!r}); retrying in {delay:g} s", file=sys.stderr)
        time.sleep(delay)
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------- verification

def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_verified(dest: Path) -> bool:
    """Cheap check that `dest` is a copy this script verified: marker matches esc50.csv."""
    marker, csv = dest / MARKER, dest / "meta" / "esc50.csv"
    return (marker.is_file() and csv.is_file() and (dest / "audio").is_dir()
            and marker.read_text().strip() == _sha256(csv))


def _zip_base(z: zipfile.ZipFile) -> str:
    """The folder inside the zip that holds meta/esc50.csv ("ESC-50-master/" on GitHub)."""
    hits = [n[:-len("meta/esc50.csv")] for n in z.namelist()
            if n == "meta/esc50.csv" or n.endswith("/meta/esc50.csv")]
    if not hits:
        raise ValueError(f"{z.filename}: no meta/esc50.csv inside; this is not an ESC-50 archive")
    return min(hits, key=len)


def _dir_base(source: Path) -> Path:
    """`source` itself or its only subdirectory, whichever holds meta/esc50.csv and audio/."""
    def ok(d):
        return (d / "meta" / "esc50.csv").is_file() and (d / "audio").is_dir()
    if ok(source):
        return source
    subdirs = [d for d in source.iterdir() if d.is_dir()]
    if len(subdirs) == 1 and ok(subdirs[0]):
        return subdirs[0]
    raise ValueError(f"{source}: expected meta/esc50.csv and audio/ in it or in its only "
                     f"subdirectory; this is not an ESC-50 directory")


def check_metadata(df: pd.DataFrame) -> None:
    """Structure of esc50.csv, independent of its size: 50 classes with their ESC-50 names,
    equal clips per class, folds 1..5 of equal size, each source recording in one fold."""
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"esc50.csv lacks columns {missing} (has {list(df.columns)})")
    if df.filename.duplicated().any():
        raise ValueError(f"esc50.csv lists {df.filename[df.filename.duplicated()].iloc[0]} twice")
    if sorted(df.target.unique()) != list(range(len(CLASSES))):
        raise ValueError(f"esc50.csv targets are {sorted(df.target.unique())}, expected 0..49")
    for target, names in df.groupby("target").category:
        if set(names) != {CLASSES[target]}:
            raise ValueError(f"esc50.csv: target {target} is named {sorted(set(names))}, "
                             f"expected '{CLASSES[target]}'")
    per_class = df.target.value_counts()
    if per_class.nunique() != 1:
        raise ValueError(f"esc50.csv: clips per class differ (target {per_class.idxmin()} has "
                         f"{per_class.min()}, target {per_class.idxmax()} has {per_class.max()})")
    per_fold = df.fold.value_counts().sort_index()
    if list(per_fold.index) != list(range(1, N_FOLDS + 1)) or per_fold.nunique() != 1:
        raise ValueError(f"esc50.csv: expected folds 1..{N_FOLDS} of equal size, "
                         f"got {per_fold.to_dict()}")
    # Clips cut from one recording must share a fold, or a fold split leaks. The official csv
    # breaks this for 4 recordings (e.g. src_file 131943: clock_tick in fold 2, clock_alarm in
    # fold 3), always across classes, so the check is per recording and class.
    folds = df.groupby(["src_file", "target"]).fold.nunique()
    if (folds > 1).any():
        src, target = folds.idxmax()
        raise ValueError(f"esc50.csv: clips of src_file {src} (target {target}) "
                         f"sit in more than one fold")


def check_audio(df: pd.DataFrame, audio_dir: Path) -> tuple:
    """Decode every listed clip in full; return the common (sample rate, frames).

    libsndfile reads a truncated WAV without complaint, so a truncated clip is caught by its
    length: ESC-50 clips are all 5 s, and any clip shorter or longer than the rest is named.
    """
    shapes = {}
    for name in tqdm(df.filename, desc="verifying clips", unit="clip", leave=False):
        try:
            path = find_clip(audio_dir, name)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        try:
            data, sr = sf.read(path, dtype="float32")
        except Exception as e:  # soundfile raises several types for damaged files
            raise ValueError(f"{path}: cannot decode ({e}); the copy is damaged") from None
        shapes[path] = (sr, len(data))
    common, _ = Counter(shapes.values()).most_common(1)[0]
    odd = {p: s for p, s in shapes.items() if s != common}
    if odd or common[1] == 0:
        p, (sr, n) = next(iter(odd.items())) if odd else next(iter(shapes.items()))
        raise ValueError(f"{p}: {n} samples at {sr} Hz where the other clips have {common[1]} "
                         f"at {common[0]} Hz (truncated or damaged; {len(odd)} such clips)")
    return common


def verify(base: Path) -> dict:
    """Check an unpacked copy at `base`; return counts for the report."""
    df = pd.read_csv(base / "meta" / "esc50.csv")
    check_metadata(df)
    sr, frames = check_audio(df, base / "audio")
    return dict(clips=len(df), per_category=len(df) // len(CATEGORIES),
                per_fold=len(df) // N_FOLDS, sample_rate=sr, seconds=frames / sr)


# ---------------------------------------------------------------------------- install

def _unpack(source: Path, staging: Path) -> None:
    """Copy a zip's or a directory's ESC-50 folder to `staging`, files as they are."""
    if source.is_dir():
        shutil.copytree(_dir_base(source), staging)
        return
    unzipped = staging.with_name("unzipped")
    try:
        with zipfile.ZipFile(source) as z:
            bad = z.testzip()
            if bad is not None:
                raise ValueError(f"{source}: member {bad} fails its CRC check; the zip is corrupt")
            prefix = _zip_base(z)
            # extractall() sanitises member paths (no absolute paths, no "..").
            z.extractall(unzipped, members=[n for n in z.namelist() if n.startswith(prefix)])
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{source}: damaged or not a zip file ({e})") from None
    os.rename(unzipped / prefix, staging)


def _swap_in(staging: Path, dest: Path) -> None:
    """Put `staging` at `dest`; an old copy is moved aside first and deleted only afterwards."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{DIRNAME}.old-")) / DIRNAME
        os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
            old.parent.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old.parent)


def install(source: Path, root: Path) -> tuple:
    """Unpack `source` under `root`, verify, add category table and marker, move into place."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{DIRNAME}.tmp-"))
    try:
        staging = tmp / DIRNAME
        _unpack(source, staging)
        report = verify(staging)
        category_table().to_csv(staging / "meta" / "esc50_categories.csv", index=False)
        (staging / MARKER).write_text(_sha256(staging / "meta" / "esc50.csv") + "\n")
        _swap_in(staging, root / DIRNAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / DIRNAME, report


def ensure_esc50(root="data", source=None, url=URL, force=False, retries=5) -> Path:
    """Make sure root/ESC-50 holds a verified ESC-50 copy and return its path.

    With `source` (a zip, or a directory in ESC-50 layout) nothing is downloaded; the source
    is copied, never moved or deleted. Otherwise the archive is downloaded to
    root/ESC-50-master.zip, which is deleted once installed.
    """
    root = Path(root)
    dest = root / DIRNAME
    if not force and is_verified(dest):
        print(f"ESC-50 is already installed and verified at {dest} (--force reinstalls)")
        return dest
    root.mkdir(parents=True, exist_ok=True)
    downloaded = source is None
    if downloaded:
        source = root / ZIPNAME
        if source.exists():
            print(f"using the archive downloaded earlier: {source}")
        else:
            print(f"downloading {url} to {source}")
            download(url, source, retries=retries)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--source {source} does not exist")
    print(f"verifying and installing {source} ...")
    try:
        dest, report = install(source, root)
    except ValueError as e:
        if downloaded:  # a bad download would otherwise be reused on every later run
            source.unlink(missing_ok=True)
            raise ValueError(f"{e}\n(deleted {source}; run again to download afresh)") from None
        raise
    if downloaded:
        source.unlink()
    print(f"installed ESC-50 at {dest}: {report['clips']} clips, {report['per_category']} per "
          f"category, {report['per_fold']} per fold, {report['seconds']:g} s at "
          f"{report['sample_rate']} Hz")
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data", help="directory that gets ESC-50/ (default: data)")
    p.add_argument("--source", default=None,
                   help="install from a local zip or ESC-50 directory instead of downloading")
    p.add_argument("--url", default=URL, help="archive to download (default: GitHub's)")
    p.add_argument("--force", action="store_true", help="reinstall over a verified copy")
    args = p.parse_args(argv)
    try:
        ensure_esc50(args.root, args.source, args.url, args.force)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; a partial download is kept and resumes on the next run",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
