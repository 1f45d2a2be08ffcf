"""Where a user's images live: a folder (``file:///data/images``) or an S3 prefix
(``s3://bucket/images/``) of image files, read one object at a time, or of shards
(pipelines/shards.py), read a piece at a time.

Torch-free: the controller checks a source at submit with it (one bounded page, never the
whole prefix), the driver lists it once into a ``Catalog`` that fixes every image's global
index, and Ray Data tasks read the images. S3 settings come from boto3's standard places
(``AWS_ENDPOINT_URL``, ``AWS_*`` credentials, a profile): a spec names only the URI.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from pipelines.shards import ShardSet

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Objects looked at by the submit-time check: a prefix of a million objects costs one page.
CHECK_PAGE = 1000
SCHEMES = ("file", "s3")


def is_image_source(uri: str) -> bool:
    return uri.partition("://")[0] in SCHEMES and "://" in uri


# What decides which S3 a process reaches, and as whom: a client is made once per setting
# of these (held in memory only, as boto3 holds them anyway).
_S3_ENVIRONMENT = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_EC2_METADATA_DISABLED",
)


def _s3_settings() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in _S3_ENVIRONMENT)


def _s3_client() -> Any:
    """The client for the S3 this process's environment names (boto3's standard settings),
    made once per setting, so that a process whose environment changes reaches the S3 it now
    names. Few retries, so that a wrong endpoint fails a submit in seconds, not minutes."""
    return _s3_client_for(_s3_settings())


@functools.cache
def _s3_client_for(_settings: tuple[str | None, ...]) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3})
    return boto3.session.Session().client("s3", config=config)


def _filesystem(scheme: str, root: str) -> Any:
    """pyarrow's filesystem for random access to shards (S3: the same standard settings)."""
    return _filesystem_for(scheme, root, _s3_settings() if scheme == "s3" else ())


@functools.cache
def _filesystem_for(scheme: str, root: str, _settings: tuple[str | None, ...]) -> Any:
    import pyarrow.fs

    if scheme == "file":
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.FileSystem.from_uri(f"s3://{root}")[0]


@dataclass(frozen=True)
class ImageSource:
    """``root`` is the folder (file) or the bucket (s3); ``prefix`` the key prefix under the
    bucket, "" or ending in "/". Keys are relative to both: ``cats/0001.png``."""

    uri: str
    scheme: Literal["file", "s3"]
    root: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> ImageSource:
        parts = urlsplit(uri)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"{uri!r} is not a file:// or s3:// URI")
        if "@" in parts.netloc or parts.query or parts.fragment:
            # Credentials never travel in a spec: they would land in MLflow params and logs.
            raise ValueError(
                f"{uri!r} carries credentials, a query or a fragment; S3 credentials come "
                "from AWS_* variables or a profile, never the URI"
            )
        if parts.scheme == "file":
            if parts.netloc or not parts.path.startswith("/"):
                raise ValueError(f"{uri!r}: a folder is file:///absolute/path (three slashes)")
            return cls(uri, "file", str(Path(parts.path)), "")
        if not parts.netloc:
            raise ValueError(f"{uri!r} names no bucket (s3://bucket/prefix/)")
        prefix = parts.path.lstrip("/")
        return cls(
            uri, "s3", parts.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/"
        )

    def iter_keys(self, limit: int | None = None) -> Iterator[str]:
        """Every object under the source, images or not, in a stable order; at most
        ``limit`` of them."""
        keys = self._s3_keys(limit) if self.scheme == "s3" else self._file_keys()
        for count, key in enumerate(keys, start=1):
            yield key
            if count == limit:  # stop before the next key, which may cost another page
                return

    def _file_keys(self) -> Iterator[str]:
        root = Path(self.root)
        for folder, folders, files in os.walk(root):
            folders.sort()
            base = Path(folder).relative_to(root)
            for name in sorted(files):
                yield str(base / name) if base != Path(".") else name

    def _s3_keys(self, limit: int | None) -> Iterator[str]:
        pages = _s3_client().get_paginator("list_objects_v2")
        # A page asks for no more than the caller will read (S3 returns at most 1000).
        size = {"PageSize": min(limit, 1000)} if limit else {}
        for page in pages.paginate(Bucket=self.root, Prefix=self.prefix, PaginationConfig=size):
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :]

    def read(self, key: str) -> bytes:
        if self.scheme == "file":
            return (Path(self.root) / key).read_bytes()
        return _s3_client().get_object(Bucket=self.root, Key=self.prefix + key)["Body"].read()

    def _path(self, key: str) -> str:
        return f"{self.root}/{self.prefix}{key}"

    def open(self, key: str) -> Any:
        """A seekable pyarrow file (ranged reads on S3)."""
        return _filesystem(self.scheme, self.root).open_input_file(self._path(key))

    def open_stream(self, key: str) -> Any:
        """A pyarrow stream, read front to back in large requests."""
        return _filesystem(self.scheme, self.root).open_input_stream(self._path(key))


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_SUFFIXES) and not Path(key).name.startswith(".")


@dataclass(frozen=True)
class Catalog:
    """Every image of a source in a fixed order: an image's global index is its position
    here, stable across workers, attempts and resumes. ``keys`` are the image files in
    sorted order, or the samples of a shard set (``shards``) in set order. ``labels[i]`` is
    the class of image i (its first-level folder, or the shards' label column), or None for
    all when not every image has one."""

    source: ImageSource
    keys: list[str]
    classes: list[str]
    labels: list[int] | None
    shards: ShardSet | None = None

    @classmethod
    def list(
        cls, source: ImageSource, image_column: str | None = None, label_column: str | None = None
    ) -> Catalog:
        from pipelines.shards import list_shards

        every = sorted(source.iter_keys())
        keys = [key for key in every if is_image_key(key)]
        layout = _layout(source, every, keys)
        if layout is not None:
            kind, shard_keys = layout
            listed = list_shards(source, shard_keys, kind, image_column, label_column)
            classes, labels = _classes(listed.labels)
            return cls(source, listed.names, classes, labels, listed.shards)
        if not keys:
            raise ValueError(f"{source.uri} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        if all("/" in key for key in keys):
            classes, labels = _classes([key.partition("/")[0] for key in keys])
            return cls(source, keys, classes, labels)
        return cls(source, keys, [], None)

    def read(self, indices: Any) -> Iterator[tuple[int, bytes | None]]:
        """(index, encoded image) of each of ``indices``."""
        if self.shards is not None:
            yield from self.shards.read(indices)
            return
        for index in indices:
            try:
                yield int(index), self.source.read(self.keys[index])
            except OSError:  # a file gone since the listing: unreadable, like a corrupt one
                yield int(index), None


def _classes(names: list[str] | None) -> tuple[list[str], list[int] | None]:
    if names is None:
        return [], None
    classes = sorted(set(names))
    number = {name: i for i, name in enumerate(classes)}
    return classes, [number[name] for name in names]


def _layout(source: ImageSource, every: list[str], images: list[str]) -> Any:
    """(kind, shard keys) when the source is a shard set, None when it holds image files."""
    from pipelines.shards import shard_kind

    kinds = {key: kind for key in every if (kind := shard_kind(key))}
    if not kinds:
        return None
    if images or len(set(kinds.values())) > 1:
        raise ValueError(
            f"{source.uri} mixes image files, Parquet and tar shards: a source is one of them"
        )
    return next(iter(kinds.values())), sorted(kinds)


def _s3_problem(source: ImageSource, error: Exception) -> str:
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    endpoint = _s3_client().meta.endpoint_url
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return (
            f"no S3 credentials for {source.uri}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where the controller runs"
        )
    if isinstance(error, EndpointConnectionError):
        return f"cannot reach the S3 endpoint {endpoint} (AWS_ENDPOINT_URL) for {source.uri}"
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return f"bucket {source.root!r} does not exist at {endpoint}"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"the S3 credentials were refused for {source.uri} ({code})"
        return f"S3 refused to list {source.uri}: {code or error}"
    return f"cannot list {source.uri} at {endpoint}: {type(error).__name__}: {error}"


def source_problems(
    uri: str,
    field: str,
    page_size: int = CHECK_PAGE,
    image_column: str | None = None,
    label_column: str | None = None,
) -> list[tuple[str, str]]:
    """What keeps ``uri`` from being read, as (field, message) pairs; looks at one page of
    at most ``page_size`` objects, and at the first shard of a shard set."""
    from pipelines.shards import shard_kind, shard_problems

    try:
        source = ImageSource.parse(uri)
    except ValueError as error:
        return [(field, str(error))]
    if source.scheme == "file" and not Path(source.root).is_dir():
        what = "is not a folder" if Path(source.root).exists() else "does not exist"
        return [(field, f"{source.root} {what}")]
    try:
        page = list(source.iter_keys(limit=page_size))
    except OSError as error:  # an unreadable folder
        return [(field, f"cannot list {source.root}: {error}")]
    except Exception as error:  # noqa: BLE001 - botocore's errors, each turned into words
        return [(field, _s3_problem(source, error))]
    if not page:
        return [(field, f"{uri} is empty")]
    shards = sorted(key for key in page if shard_kind(key))
    if shards and not any(is_image_key(key) for key in page):
        kind = shard_kind(shards[0])
        return shard_problems(source, field, shards[0], kind, image_column, label_column)
    if not any(is_image_key(key) for key in page):
        return [
            (
                field,
                f"no image files ({', '.join(IMAGE_SUFFIXES)}) nor .parquet or .tar shards "
                f"among the first {len(page)} objects of {uri}",
            )
        ]
    return []
