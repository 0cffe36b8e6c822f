"""File chores every part shares: where caches live, writing a file that a kill cannot leave half
written, and downloading a file that must match its published checksum.

Long runs get interrupted: by Ctrl-C, by a crash, by a full disk. A file written in place and cut
off midway is worse than no file, because the next run believes it. So every file that a later run
reads is written beside its final name, flushed to disk, and renamed over it: ``os.replace`` is
atomic, so a reader sees the old file or the new one, never half of one.
"""

import errno
import hashlib
import os
import sys
import urllib.request
from pathlib import Path

from tqdm import tqdm

from src.errors import UserError


def cache_dir() -> Path:
    """Where tokenizers, token files, downloads and built kernels are kept: ``$GPT_CACHE_DIR``, or
    ``~/.cache/gpt-from-scratch``."""
    return Path(os.environ.get("GPT_CACHE_DIR") or Path.home() / ".cache" / "gpt-from-scratch")


# --8<-- [start:atomic]
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refuse_if_disk_full(err: BaseException, path: Path) -> None:
    """Say "no space left" in one line, naming the file, instead of the library's own words."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(
            f"no space left on the device while writing {path}; free some space"
        ) from None


def write_atomically(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that a kill at any moment leaves the old file or the new one.

    The bytes go to a temporary file in the same folder (a rename is atomic only within one file
    system), are flushed to the disk, and the file is renamed over ``path``. Whatever goes wrong on
    the way, the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a full disk, a kill, Ctrl-C: no half file stays behind
        tmp.unlink(missing_ok=True)
        refuse_if_disk_full(err, path)
        raise
    return path


# --8<-- [end:atomic]


# --8<-- [start:download]
def download(url: str, expected_sha256: str, path: Path) -> bytes:
    """The bytes at ``url``, which must hash to ``expected_sha256``.

    Fetched once into ``path``; later calls read that copy, checked against the hash again (a copy
    damaged on disk is fetched anew, with a note). A download that fails, or brings other bytes than
    the ones published, is a ``UserError`` naming the URL.
    """
    expected_sha256 = expected_sha256.lower()
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if sha256(data) == expected_sha256:
            return data
        print(f"note: {path} does not match its checksum; downloading it again", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading",
                      disable=total is None or total < 1 << 20) as bar:  # fmt: skip
                chunks = []
                while chunk := response.read(1 << 16):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except OSError as err:
        raise UserError(f"cannot download {url}: {err}") from None
    data = b"".join(chunks)
    actual = sha256(data)
    if actual != expected_sha256:
        raise UserError(
            f"checksum mismatch for {url}: expected sha256 {expected_sha256}, got {actual}"
        )
    write_atomically(path, data)
    return data


# --8<-- [end:download]
