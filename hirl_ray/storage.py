"""Results storage on a local folder or a remote URI such as ``s3://bucket/prefix`` (pyarrow).

Ray Train writes its checkpoints through the same pyarrow filesystem layer, so one
``storage.path`` serves checkpoints, hierarchy snapshots, configs and metrics. Any
``scheme://`` URI except ``file://`` is remote and opened by ``pyarrow.fs.FileSystem.from_uri``
(s3, gs/gcs, hdfs/viewfs, abfs/abfss; tested on S3); :func:`is_remote` is the one test of
local vs remote the rest of the package uses.
Credentials come from the standard AWS chain only (environment, shared files,
instance profile); ``AWS_ENDPOINT_URL`` points at another S3 endpoint (tests use moto).
Nothing here logs or stores credentials.

Writes are atomic: local files are written to ``*.tmp`` and renamed; an S3 object
appears only when its upload completes. Transient S3 errors are retried with
backoff (ray #41137).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")


# Two or more characters, so that a Windows drive ("C://x") is not a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
#: Schemes that name this machine's filesystem.
LOCAL_SCHEMES = ("file",)
#: Remote schemes pyarrow opens (given its optional components: GCS, HDFS's libhdfs, Azure).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def scheme(uri: str | Path) -> str | None:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for ``file:///x``, ``None`` for a plain path."""
    match = _SCHEME.match(str(uri))
    return match.group(1).lower() if match else None


def is_remote(uri: str | Path) -> bool:
    """True for remote URIs (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, …); False for
    local paths and ``file://`` URIs."""
    s = scheme(uri)
    return s is not None and s not in LOCAL_SCHEMES


def _local_path(uri: str | Path) -> Path:
    """A local path or ``file://`` URI as a user-expanded :class:`Path`."""
    text = str(uri)
    if scheme(text) in LOCAL_SCHEMES:
        text = text[text.index("://") + 3:]
    return Path(text).expanduser()


def join(uri: str | Path, *parts: str) -> str:
    """Join path parts with ``/`` (works for URIs and local paths)."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def resolve(uri: str | Path) -> str:
    """Absolute local path (user-expanded) or the URI unchanged."""
    return str(uri) if is_remote(uri) else str(_local_path(uri).resolve())


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(_local_path(uri).resolve())


#: pyarrow's names of S3 errors that no retry can fix (a missing bucket, refused credentials):
#: reported at once instead of after the whole backoff.
PERMANENT_ERRORS = ("NO_SUCH_BUCKET", "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID",
                    "SIGNATURE_DOES_NOT_MATCH")


def retry(fn: Callable[[], T], attempts: int = 5, base_delay_s: float = 0.5) -> T:
    """Call ``fn``, retrying OSErrors (how pyarrow reports S3 faults) with backoff; not
    :data:`PERMANENT_ERRORS`."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as e:
            if i == attempts - 1 or any(code in str(e) for code in PERMANENT_ERRORS):
                raise
            time.sleep(base_delay_s * 2**i)
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return retry(lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """Whole object/file; FileNotFoundError if absent."""
    fs, path = _fs(uri)
    if retry(lambda: fs.get_file_info(path)).type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retry(read)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: tmp file + rename locally, single upload on object stores."""
    if not is_remote(uri):
        path = _local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name: concurrent writers of one path never share a temp file.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = _fs(uri)

    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    retry(write)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def list_dir(uri: str) -> list[tuple[str, bool]]:
    """Direct children as ``(name, is_dir)``; empty if the folder does not exist."""
    fs, path = _fs(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = retry(lambda: fs.get_file_info(selector))
    return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def delete_file(uri: str) -> None:
    """Remove one file/object; absent is fine."""
    fs, path = _fs(uri)

    def delete() -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    retry(delete)


def delete_dir(uri: str) -> None:
    """Remove a folder/prefix and everything under it; absent is fine."""
    fs, path = _fs(uri)
    if retry(lambda: fs.get_file_info(path)).type == pafs.FileType.NotFound:
        return
    retry(lambda: fs.delete_dir(path))


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder's files into ``dst`` (same or different filesystem; recursive)."""
    src_fs, src_path = _fs(src)
    dst_fs, dst_path = _fs(dst)
    if not is_remote(dst):
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    retry(lambda: pafs.copy_files(src_path, dst_path, source_filesystem=src_fs,
                                  destination_filesystem=dst_fs))


def upload_file(local: str | Path, uri: str) -> None:
    """Copy one local file to ``uri`` (atomically)."""
    write_bytes(uri, Path(local).read_bytes())


def download_dir(uri: str, local: str | Path) -> Path:
    """Copy a folder (recursively) to a local path."""
    fs, path = _fs(uri)
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    retry(lambda: pafs.copy_files(path, str(local), source_filesystem=fs,
                                  destination_filesystem=pafs.LocalFileSystem()))
    return local


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """A local folder with ``uri``'s content: the folder itself if local, else a temp copy."""
    if not is_remote(uri):
        yield _local_path(uri)
        return
    tmp = Path(tempfile.mkdtemp(prefix="hirl_ray_"))
    try:
        yield download_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(uri: str) -> None:
    """Fail early with one clear line if ``uri`` cannot be written (ray #48187)."""
    probe = join(uri, ".hirl_ray_write_probe")
    try:
        write_bytes(probe, b"ok")
        fs, path = _fs(probe)
        retry(lambda: fs.delete_file(path))
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise PermissionError(
            f"storage.path {uri} is not writable ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the path, bucket and "
            "AWS credentials (standard AWS chain)") from None
