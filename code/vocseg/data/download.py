"""Download and unpack Pascal VOC 2012 (and optionally SBD) into the layout the training code expects.

Result under OUT:
    VOCdevkit/VOC2012/...                          (DATASET_PATH=OUT)
    SBD/{cls,img,inst,train.txt,val.txt,train_noval.txt}  (SBD_DATASET_PATH=OUT/SBD)
    downloads/<archive>, downloads/<archive>.extracted

Informational messages and progress bars go to stderr; stdout carries only the final `export` lines, so
`eval "$(python code/scripts/download_dataset.py OUT)"` works.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import posixpath
import re
import shlex
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vocseg.errors import UserError, exit_with

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"
TRAIN_NOVAL_URL = "http://home.bharathh.info/pubs/codes/SBD/train_noval.txt"

TIMEOUT_S = 60.0
RETRIES = 3
RETRY_DELAY_S = 1.0
CHUNK = 1 << 20

# Errors worth retrying: the network dropped or stalled. Disk errors (also OSError) are not in here on
# purpose, retrying them would only hide the real cause.
_TRANSIENT = (ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError)


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    option: str  # CLI prefix ("--voc"), so messages can name the flag that fixes them
    root: str  # directory inside the archive that we keep
    into: str  # where `root` ends up, relative to OUT

    @property
    def name(self) -> str:
        parsed = urllib.parse.urlparse(self.url)
        name = posixpath.basename(parsed.path)
        if parsed.scheme not in ("http", "https") or not name:
            raise UserError(
                f"{self.option}-url {self.url!r} is not an http(s) URL ending in a file name; pass the archive's URL"
            )
        return name


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _total_from_content_range(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(match[1]) if match else None


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        # 416: we asked to start at or past the end. If the server says the file is exactly as long as
        # our .part, the earlier run finished writing but was stopped before renaming it.
        total = _total_from_content_range(exc.headers.get("Content-Range"))
        exc.close()
        if total == have:
            return
        say(f"{part.name}: server rejected the resume point; starting again from zero")
        part.unlink()
        return _fetch_once(url, part, timeout, progress)

    with response:
        start = have
        if have and response.status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match[1]) != have:
                got = response.headers.get("Content-Range")
                raise ConnectionError(f"server resumed at {got!r}, not at byte {have}")
            say(f"{part.name}: resuming at byte {have}")
        elif have:
            say(f"{part.name}: server ignored the Range request; starting again from zero")
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with (
            open(part, "ab" if start else "wb") as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[: -len(".part")],
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while block := response.read(CHUNK):
                f.write(block)
                bar.update(len(block))
    if total is not None and part.stat().st_size != total:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")


def fetch(
    url: str,
    dest: Path,
    *,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    progress: bool = True,
    hint: str = "check the URL",
) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming a partial .part; no checksum here."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == retries:
                raise UserError(f"{url}: HTTP {exc.code} {exc.reason}; {hint}") from None
            problem = f"HTTP {exc.code}"
        except _TRANSIENT as exc:
            problem = str(getattr(exc, "reason", exc)) or type(exc).__name__
            if attempt == retries:
                resume = f"rerun to resume from {part}" if part.exists() else "check the network and rerun"
                raise UserError(f"{url}: download failed after {retries + 1} attempts ({problem}); {resume}") from None
        say(f"{dest.name}: {problem}; retrying ({attempt + 1}/{retries})")
        time.sleep(RETRY_DELAY_S * (attempt + 1))
    os.replace(part, dest)
    return dest


def _check_md5(path: Path, archive: Archive) -> None:
    actual = md5sum(path)
    if actual != archive.md5:
        # Kept, not deleted: it may be a good copy of a newer upstream file, and re-downloading
        # gigabytes to find that out would be worse than asking.
        raise UserError(
            f"{path}: md5 is {actual}, expected {archive.md5}; nothing was extracted and the file was kept: "
            f"delete it to download again, or pass {archive.option}-md5 {actual} if you trust it"
        )


def _check_members(tar: tarfile.TarFile, label: str) -> None:
    """Refuse the whole archive if any member could be written outside the extraction directory."""
    for member in tar.getmembers():
        name = member.name
        problem = None
        if name.startswith("/") or re.match(r"[A-Za-z]:", name):
            problem = "is an absolute path"
        elif ".." in name.replace("\\", "/").split("/"):
            problem = "contains '..'"
        elif member.issym() or member.islnk():
            # Symlink targets are relative to the link's directory, hardlink targets to the archive root.
            base = posixpath.dirname(name) if member.issym() else ""
            target = posixpath.normpath(posixpath.join(base, member.linkname))
            if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
                problem = f"links outside the archive ({member.linkname!r})"
        elif not (member.isfile() or member.isdir()):
            problem = "is a device or FIFO"
        if problem:
            raise UserError(
                f"{label}: member {name!r} {problem}; refusing to extract anything from this archive, "
                f"check where it came from"
            )


def _merge_move(src: Path, dst: Path) -> None:
    # Merging rather than replacing whole trees keeps anything else the user put there (e.g. VOC2007).
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir():
            _merge_move(entry, target)
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)


def extract(path: Path, archive: Archive, out: Path) -> None:
    """Unpack `archive.root` from `path` into OUT/`archive.into`.

    Everything is unpacked into a scratch directory inside OUT/downloads first, so a bad or interrupted
    extraction leaves OUT itself untouched, and a rerun starts the scratch directory over.
    """
    scratch = path.with_name(path.name + ".extracting")
    if scratch.exists():
        shutil.rmtree(scratch)
    try:
        with tarfile.open(path) as tar:
            _check_members(tar, str(path))
            say(f"{path.name}: extracting")
            # The data filter also catches tricks our name check cannot see, such as a link followed
            # through another link; the scratch directory makes that safe to discover mid-way.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(scratch, filter="data")
            else:
                tar.extractall(scratch)
        root = scratch / archive.root
        if not root.is_dir():
            raise UserError(f"{path}: has no {archive.root}/ directory; check {archive.option}-url")
        _merge_move(root, out / archive.into)
    except tarfile.ReadError:
        raise UserError(f"{path}: is not a tar archive; delete it and check {archive.option}-url") from None
    except tarfile.TarError as exc:
        raise UserError(
            f"{path}: refused during extraction ({' '.join(str(exc).split())}); check where it came from"
        ) from None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def install(
    archive: Archive, out: Path, *, timeout: float = TIMEOUT_S, retries: int = RETRIES, progress: bool = True
) -> None:
    """Make sure OUT/`archive.into` holds the contents of a verified copy of `archive`."""
    downloads = out / "downloads"
    path = downloads / archive.name
    marker = downloads / f"{archive.name}.extracted"
    done = marker.is_file() and marker.read_text().strip() == archive.md5 and (out / archive.into).is_dir()

    if path.exists():
        say(f"{path.name}: already downloaded, checking md5")
        _check_md5(path, archive)
    elif done:
        say(f"{path.name}: archive was removed but its contents are in place; nothing to do")
        return
    else:
        say(f"{path.name}: downloading {archive.url}")
        fetch(
            archive.url, path, timeout=timeout, retries=retries, progress=progress, hint=f"check {archive.option}-url"
        )
        _check_md5(path, archive)

    if done:
        say(f"{path.name}: already extracted to {out / archive.into}")
        return
    extract(path, archive, out)
    marker.write_text(archive.md5 + "\n")


def _ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def write_train_noval(out: Path, url: str, *, timeout: float = TIMEOUT_S) -> None:
    """OUT/SBD/train_noval.txt: the published list if reachable, else SBD train minus VOC2012 val."""
    dest = out / "SBD" / "train_noval.txt"
    if dest.exists():
        return
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read(1 << 20).decode("ascii")
        # A proxy's HTML error page must not pass for a split file.
        ids = text.split()
        if not ids or not all(re.fullmatch(r"\w+", i) for i in ids):
            raise ValueError("not a list of image ids")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        voc_val = out / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
        sbd_train = out / "SBD" / "train.txt"
        for need in (voc_val, sbd_train):
            if not need.is_file():
                raise UserError(
                    f"cannot fetch {url} ({exc}) and cannot derive train_noval.txt without {need}; "
                    f"check the archive URLs, or pass a reachable --sbd-train-noval-url"
                ) from None
        val = set(_ids(voc_val))
        ids = [i for i in _ids(sbd_train) if i not in val]
        text = "".join(f"{i}\n" for i in ids)
        say(
            f"train_noval.txt: could not fetch {url} ({exc}); derived it as SBD train minus VOC2012 val "
            f"({len(ids)} ids)"
        )
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, dest)


def prepare(
    out: Path,
    voc: Archive,
    sbd: Archive | None,
    train_noval_url: str = TRAIN_NOVAL_URL,
    *,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    progress: bool = True,
) -> dict[str, str]:
    """Download and unpack everything; returns the environment variables the training code reads."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a directory as OUT")
    for archive in (voc, sbd):
        if archive is not None and not re.fullmatch(r"[0-9a-f]{32}", archive.md5):
            raise UserError(f"{archive.option}-md5 {archive.md5!r} is not a 32-digit hex md5; pass the archive's md5")
    install(voc, out, timeout=timeout, retries=retries, progress=progress)
    env = {"DATASET_PATH": str(out)}
    if sbd is not None:
        install(sbd, out, timeout=timeout, retries=retries, progress=progress)
        write_train_noval(out, train_noval_url, timeout=timeout)
        env["SBD_DATASET_PATH"] = str(out / sbd.into)
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download Pascal VOC 2012 (and SBD) into OUT, verify md5s and unpack.")
    p.add_argument("out", type=Path, metavar="OUT", help="directory to fill (created if missing)")
    p.add_argument("--no-sbd", action="store_true", help="skip the SBD augmentation set")
    p.add_argument("--voc-url", default=VOC_URL)
    p.add_argument("--voc-md5", default=VOC_MD5)
    p.add_argument("--sbd-url", default=SBD_URL)
    p.add_argument("--sbd-md5", default=SBD_MD5)
    p.add_argument(
        "--sbd-train-noval-url",
        default=TRAIN_NOVAL_URL,
        help="if unreachable, train_noval.txt is derived as SBD train minus VOC2012 val",
    )
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="socket timeout in seconds")
    p.add_argument("--retries", type=int, default=RETRIES, help="retries per download on connection errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    voc = Archive(args.voc_url, args.voc_md5.strip().lower(), "--voc", "VOCdevkit/VOC2012", "VOCdevkit/VOC2012")
    sbd = (
        None
        if args.no_sbd
        else Archive(args.sbd_url, args.sbd_md5.strip().lower(), "--sbd", "benchmark_RELEASE/dataset", "SBD")
    )
    try:
        env = prepare(
            args.out,
            voc,
            sbd,
            args.sbd_train_noval_url,
            timeout=args.timeout,
            retries=max(0, args.retries),
            progress=sys.stderr.isatty(),
        )
    except UserError as exc:
        exit_with(exc)
    say("done; set these before training:")
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0
