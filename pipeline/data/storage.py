"""Locations that are local paths or object-storage URLs, through fsspec.

Everything a run reads or writes (shards, manifests, stores, run directories, teacher weights)
is named by a *location*: a local path, a ``file://`` URL, or a URL of an fsspec filesystem
(``s3://`` with the ``[s3]`` extra, ``gs://`` with ``[gcs]``). Credentials come only from the
filesystem libraries' own environment and config (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``): a URL that carries them is refused, so that
no location this project records or prints can hold a secret.

Object stores have no rename and no append; what they do have is an atomic whole-object PUT.
``write_bytes`` therefore writes whole objects (a temp file and ``os.replace`` locally), and
anything larger is built in a local folder first and uploaded file by file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec

_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageError(OSError):
    """A location that cannot be used or reached; the message names the location."""


class LocationNotFound(StorageError):
    """The location does not exist (as opposed to a store that cannot be reached or read)."""


def is_url(location: str) -> bool:
    return "://" in location


def local_path(location: str) -> str | None:
    """The local path of a local location (a path or a ``file://`` URL); None for any other URL."""
    if location.startswith("file://"):
        return location.removeprefix("file://")
    return None if is_url(location) else location


def is_remote(location: str) -> bool:
    """True for URLs of filesystems other than the local one (``s3://``, ``gs://``, ...)."""
    return local_path(location) is None


def check_location(location: str) -> str:
    """Return ``location`` unchanged; refuse a URL with credentials in it (``s3://key:secret@bucket``)."""
    if is_url(location):
        parts = urlsplit(location)
        if "@" in parts.netloc:
            shown = f"{parts.scheme}://***@{parts.netloc.rsplit('@', 1)[1]}{parts.path}"
            raise StorageError(f"{shown}: credentials in a URL are refused; give them to the storage library "
                               f"(environment variables such as AWS_ACCESS_KEY_ID, ~/.aws, "
                               f"GOOGLE_APPLICATION_CREDENTIALS)")
    return location


def absolute(location: str) -> str:
    """Local paths made absolute (workers may run elsewhere); URLs checked and kept as given."""
    if is_url(location):
        return check_location(location)
    return os.path.abspath(os.path.expanduser(location))


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1] if is_url(location) else os.path.basename(location.rstrip("/"))


def parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0] if is_url(location) else os.path.dirname(location)


@contextlib.contextmanager
def storage_errors(location: str) -> Iterator[None]:
    """Turn what a filesystem raises (OSError, botocore errors, a missing extra) into one StorageError line."""
    try:
        yield
    except StorageError:
        raise
    except ImportError as e:
        extra = _EXTRAS.get(location.split("://", 1)[0].lower())
        hint = f"install the [{extra}] extra (pip install 'regla-distill[{extra}]')" if extra else str(e)
        raise StorageError(f"{location}: {hint}") from e
    except FileNotFoundError as e:
        raise LocationNotFound(f"{location}: not found") from e
    except OSError as e:
        raise StorageError(f"{location}: {_reason(e)}") from e
    except Exception as e:
        if not _is_storage_library_error(e):
            raise
        raise StorageError(f"{location}: {_reason(e)}") from e


def _reason(error: BaseException) -> str:
    if isinstance(error, PermissionError):
        return f"permission denied ({error.strerror or error})" if error.strerror else "permission denied"
    text = (getattr(error, "strerror", None) or str(error) or type(error).__name__).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_storage_library_error(error: BaseException) -> bool:
    # botocore/aiobotocore (endpoint unreachable, bad credentials) and google-auth errors are not OSErrors.
    module = type(error).__module__ or ""
    return module.split(".")[0] in ("botocore", "aiobotocore", "google", "gcsfs", "s3fs", "aiohttp")


def filesystem(location: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a location."""
    check_location(location)
    with storage_errors(location):
        return fsspec.core.url_to_fs(location)


def exists(location: str) -> bool:
    path = local_path(location)
    if path is not None:
        return os.path.exists(path)
    fs, inner = filesystem(location)
    with storage_errors(location):
        fs.invalidate_cache(inner)  # another process may have written it since this one listed
        return fs.exists(inner)


def isfile(location: str) -> bool:
    path = local_path(location)
    if path is not None:
        return os.path.isfile(path)
    fs, inner = filesystem(location)
    with storage_errors(location):
        fs.invalidate_cache(inner)
        return fs.isfile(inner)


def listdir(location: str) -> list[str]:
    """Names (not paths) of the entries directly in a folder, sorted; [] when it does not exist."""
    path = local_path(location)
    if path is not None:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, inner = filesystem(location)
    with storage_errors(location):
        fs.invalidate_cache(inner)
        try:
            found = fs.ls(inner, detail=False)
        except FileNotFoundError:
            return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found if p.rstrip("/") != inner.rstrip("/"))


@contextlib.contextmanager
def open_location(location: str, mode: str = "rb") -> Iterator[IO]:
    """Open a location for reading or writing (writes to object stores become one upload at close)."""
    path = local_path(location)
    with storage_errors(location):
        if path is not None:
            if "w" in mode:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, mode) as f:
                yield f
        else:
            with fsspec.open(check_location(location), mode) as f:
                yield f


def read_bytes(location: str) -> bytes:
    with open_location(location, "rb") as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


@contextlib.contextmanager
def _replaced_atomically(path: str) -> Iterator[str]:
    """A temp file beside ``path`` to fill; renamed onto ``path`` if the block succeeds, removed if not."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old content or the new, never part of it.

    Locally: a temp file beside it, then ``os.replace``. On an object store a single PUT of the
    whole object is already atomic.
    """
    path = local_path(location)
    with storage_errors(location):
        if path is not None:
            with _replaced_atomically(path) as tmp, open(tmp, "wb") as f:
                f.write(data)
            return
        fs, inner = filesystem(location)
        fs.pipe_file(inner, data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def remove(location: str) -> None:
    """Delete a file; one that is already gone is fine."""
    path = local_path(location)
    with storage_errors(location):
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return
        fs, inner = filesystem(location)
        try:
            fs.rm_file(inner)
        except FileNotFoundError:
            pass


def upload_file(source: str, location: str) -> None:
    """Copy a local file to a location, whole (a temp file and a rename locally, one upload remotely)."""
    path = local_path(location)
    with storage_errors(location):
        if path is not None:
            with _replaced_atomically(path) as tmp:
                shutil.copyfile(source, tmp)
            return
        fs, inner = filesystem(location)
        fs.put_file(source, inner)


def upload_dir(source: str, location: str, last: Sequence[str] = ()) -> list[str]:
    """Copy every file under a local folder to ``location`` (same relative names); return the locations.

    Files whose relative names are in ``last`` go after all others, in that order: a manifest
    uploaded last names only files that are already there.
    """
    names = sorted(os.path.relpath(os.path.join(folder, name), source).replace(os.sep, "/")
                   for folder, _, files in os.walk(source) for name in files)
    ordered = [n for n in names if n not in last] + [n for n in last if n in names]
    written = []
    for name in ordered:
        target = join(location, *name.split("/"))
        upload_file(os.path.join(source, *name.split("/")), target)
        written.append(target)
    return written
