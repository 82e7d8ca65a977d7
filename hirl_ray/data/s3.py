"""Datasets under an ``s3://bucket/prefix``: downloaded once per node into a local cache, or
(``data.loader=ray_data``) read object by object (:func:`list_image_folder`).

Every Ray worker on a node calls :func:`localize`; a file lock makes the first one
download (in parallel threads) while the others wait, and a manifest marks the copy
complete, so later runs and restarted workers reuse it. Objects whose size changed are
fetched again. Credentials come from the standard AWS chain (boto3); ``AWS_ENDPOINT_URL``
selects another endpoint. The cache lives in ``$HIRL_RAY_CACHE`` (default
``~/.cache/hirl_ray``).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image

from hirl_ray.config import ConfigError
from hirl_ray.data.folder import ImageFiles, load_rgb

MANIFEST = ".hirl_ray_manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("HIRL_RAY_CACHE", "~/.cache/hirl_ray")).expanduser()


def _list_objects(client, bucket: str, prefix: str) -> dict[str, int]:
    objects: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                objects[obj["Key"]] = obj["Size"]
    return objects


def _bucket_prefix(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/").rstrip("/")


def _list_or_fail(client, uri: str, bucket: str, prefix: str,
                  allow_empty: bool = False) -> dict[str, int]:
    """Every object under ``prefix/`` (key → size), or a one-line :class:`ConfigError`."""
    import botocore.exceptions

    try:
        # A folder prefix (ImageFolder layout, or train.npz/test.npz): never a bare file.
        objects = _list_objects(client, bucket, f"{prefix}/" if prefix else "")
    except botocore.exceptions.BotoCoreError as e:
        raise ConfigError(f"data.root={uri}: cannot list the bucket ({e}); check the "
                          "URI and AWS credentials (standard AWS chain)") from None
    except botocore.exceptions.ClientError as e:
        raise ConfigError(f"data.root={uri}: {e.response['Error'].get('Code')}: cannot "
                          "list it; check the bucket name and IAM permissions") from None
    if not objects and not allow_empty:
        raise ConfigError(f"data.root={uri} holds no objects; upload the dataset there "
                          "(ImageFolder layout: train/ and val/ class sub-folders)")
    return objects


def count_folder_images(uri: str, split_folder: str) -> int:
    """Images of ``uri/<split_folder>/<class>/…`` from one bucket listing, downloading nothing.

    Counts what :class:`~hirl_ray.data.folder.ImageFolderDataset` would load from a local copy
    (torchvision's image extensions, at any depth below a class folder), so the driver can check
    ``train.batch_size`` and ``hirl.num_clusters`` against an ImageNet-sized bucket without
    copying 1.28M files to a machine that never trains.
    """
    return scan_folder(uri, split_folder)[0]


def scan_folder(uri: str, split_folder: str) -> tuple[int, list[tuple[str, str]]]:
    """:func:`count_folder_images`, and the objects a local copy's
    :meth:`~hirl_ray.data.folder.ImageFolderDataset.bad_files` would report (zero-byte images,
    non-image files in class folders; hidden files skipped), as ``(s3 URI, reason)``."""
    import boto3
    from torchvision.datasets.folder import IMG_EXTENSIONS

    bucket, prefix = _bucket_prefix(uri)
    root = f"{prefix}/{split_folder}/" if prefix else f"{split_folder}/"
    # Only the split's folder: ImageNet's val/ is not listed with its 1.28M train/ images.
    objects = _list_or_fail(boto3.client("s3"), uri, bucket, root.rstrip("/"), allow_empty=True)
    count, bad = 0, []
    for key, size in objects.items():
        rest = key[len(root):] if key.startswith(root) else ""
        # "<class>/<...>/<file>": files directly in the split folder belong to no class.
        if "/" not in rest:
            continue
        if rest.lower().endswith(IMG_EXTENSIONS):
            count += 1
            if size == 0:
                bad.append((f"s3://{bucket}/{key}", "zero bytes"))
        elif not rest.rsplit("/", 1)[1].startswith("."):
            bad.append((f"s3://{bucket}/{key}", "not an image file"))
    return count, sorted(bad)


def localize(uri: str, max_workers: int = 16) -> Path:
    """Local folder mirroring ``uri`` (``s3://bucket/prefix``); downloads what is missing."""
    import boto3

    bucket, prefix = _bucket_prefix(uri)
    local = cache_root() / "s3" / bucket / prefix
    local.mkdir(parents=True, exist_ok=True)
    client = boto3.client("s3")
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; other workers wait here
        objects = _list_or_fail(client, uri, bucket, prefix)
        manifest_path = local / MANIFEST
        if manifest_path.is_file() and json.loads(manifest_path.read_text()) == objects:
            return local
        todo = []
        for key, size in objects.items():
            target = local / key[len(prefix):].lstrip("/")
            if not (target.is_file() and target.stat().st_size == size):
                todo.append((key, target))

        def fetch(item: tuple[str, Path]) -> None:
            key, target = item
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            client.download_file(bucket, key, str(tmp))
            os.replace(tmp, target)

        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            list(pool.map(fetch, todo))
        manifest_path.write_text(json.dumps(objects))
    return local


# ---- read object by object (data.loader=ray_data): no local copy ----------------------------

_CLIENTS: dict[int, object] = {}


def _client():
    """One boto3 client per process (clients are thread-safe, not fork- or pickle-safe)."""
    import boto3

    pid = os.getpid()
    if pid not in _CLIENTS:
        _CLIENTS[pid] = boto3.client("s3")
    return _CLIENTS[pid]


def read_object(uri: str) -> bytes:
    """The bytes of one ``s3://bucket/key`` object."""
    bucket, key = _bucket_prefix(uri)
    return _client().get_object(Bucket=bucket, Key=key)["Body"].read()


class S3ImageFiles(ImageFiles):
    """One split of an ``s3://`` image folder whose images are read object by object.

    The same samples, in the same index order, as :class:`~hirl_ray.data.folder.ImageFolderDataset`
    on a downloaded copy (:func:`list_image_folder`), so hierarchy assignments and evaluation
    labels agree whichever path read the images; nothing is cached on disk.
    """

    def read(self, path: str, max_reduction: Callable[[int, int], int] | None = None
             ) -> Image.Image:
        return load_rgb(io.BytesIO(read_object(path)), max_reduction)


def _folder_samples(objects: dict[str, int], root: str) -> dict[str, list[tuple[str, str]]]:
    """``class -> [(dirname, filename)]`` of the image objects under ``root`` (a key prefix)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    out: dict[str, list[tuple[str, str]]] = {}
    for key in objects:
        rest = key[len(root):] if key.startswith(root) else ""
        if "/" not in rest or not rest.lower().endswith(IMG_EXTENSIONS):
            continue  # files directly in the split folder belong to no class
        cls = rest.split("/", 1)[0]
        dirname, filename = key.rsplit("/", 1)
        out.setdefault(cls, []).append((dirname, filename))
    return out


def list_image_folder(uri: str, split: str, on_bad_file: str = "error") -> S3ImageFiles:
    """The ``split`` of the image folder at ``uri`` from bucket listings, downloading nothing.

    Index order is torchvision's ``make_dataset`` on a local copy: classes sorted (from
    ``train/``), then each class's files by directory, then by name (``sorted(os.walk)``).
    """
    import boto3

    from hirl_ray.data.folder import SPLIT_FOLDERS

    bucket, prefix = _bucket_prefix(uri)
    client = boto3.client("s3")

    def samples_of(folder: str) -> dict[str, list[tuple[str, str]]]:
        root = f"{prefix}/{folder}/" if prefix else f"{folder}/"
        objects = _list_or_fail(client, uri, bucket, root.rstrip("/"), allow_empty=True)
        return _folder_samples(objects, root)

    train = samples_of("train")
    for folder in SPLIT_FOLDERS[split]:
        found = train if folder == "train" else samples_of(folder)
        if found:
            break
    else:
        raise ConfigError(f"data.root={uri}: no images under "
                          f"{' or '.join(f'{f}/<class>/' for f in SPLIT_FOLDERS[split])}; upload "
                          "the ImageFolder layout (train/ and val/ class sub-folders)")
    classes = sorted(train or found)
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ConfigError(f"data.root={uri}: {folder}/ has classes {extra[:5]} that are not in "
                          "train/; use the same class folders")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirname, filename in sorted(found.get(cls, ())):
            paths.append(f"s3://{bucket}/{dirname}/{filename}")
            labels.append(label)
    return S3ImageFiles(paths, labels, classes, uri, on_bad_file)

