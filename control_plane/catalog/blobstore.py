"""Content-addressed blob stores: a directory (local or shared by replicas) or an S3 bucket.

Both keep a blob under its sha256 digest, ``sha256/<2 hex>/<64 hex>``, below their root or
prefix, and offer the same blocking methods (call them from a worker thread): ``has``,
``put`` (data already verified against its digest), ``put_stream`` (chunks hashed as they are
written, so a blob of any size is never held in memory, and kept only when its digest and
size match), ``size`` and ``open_range`` (an iterator of chunks). A missing blob raises
:class:`BlobNotFound` from either.

The directory store writes to a temp file, fsyncs and renames, so a reader never sees half a
blob. The S3 store relies on S3's own atomic PUT, and for a streamed blob over one part on a
multipart upload (parts of ``S3_PART`` bytes), completed only once the digest matched and
aborted otherwise: the object appears whole or not at all. It talks to any S3-compatible
server (AWS_ENDPOINT_URL, or ``endpoint_url``), with credentials from the usual AWS chain.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from control_plane.errors import NotFound
from control_plane.security.files import atomic_writer, write_private
from protocol.bundle import verified_chunks
from protocol.digest import digest_hex

CHUNK = 256 * 1024
S3_PART = 8 * 1024 * 1024  # S3 wants parts of 5 MiB or more, but the last


class BlobNotFound(NotFound):
    """No blob with that digest in the store (a NotFound: 404 at the HTTP edge)."""

    def __init__(self, digest: str) -> None:
        super().__init__("blob_not_found", f"no blob {digest}", "digest")
        self.digest = digest


def blob_key(digest: str) -> str:
    """The relative name of a blob: ``sha256/ab/ab12...``."""
    h = digest_hex(digest)
    return f"sha256/{h[:2]}/{h}"


class BlobStore(Protocol):
    """What the control plane needs of a blob store."""

    def describe(self) -> str:
        """Where the blobs are, for logs."""
        ...

    def has(self, digest: str) -> bool:
        """Tell whether the blob is stored."""
        ...

    def put(self, digest: str, data: bytes) -> None:
        """Store ``data`` (already verified to match ``digest``) unless it is there already."""
        ...

    def put_stream(self, digest: str, size: int, chunks: Iterable[bytes]) -> bool:
        """Store a blob from ``chunks``, hashing them as they are written; True when stored,
        False when it was there already (``chunks`` are then checked, not written). Raises
        DigestMismatch, keeping nothing, unless they have exactly ``size`` bytes and
        ``digest``; whatever ``chunks`` raises goes through the same way."""
        ...

    def size(self, digest: str) -> int:
        """The blob's size in bytes; raises BlobNotFound."""
        ...

    def open_range(self, digest: str, start: int, length: int) -> Iterator[bytes]:
        """Chunks of ``length`` bytes from ``start``; raises BlobNotFound."""
        ...


class DirectoryBlobStore:
    """Files named by their sha256 digest below a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    def path(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        return self.root / blob_key(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: str, data: bytes) -> None:
        dest = self.path(digest)
        if not dest.is_file():
            write_private(dest, data, 0o644)

    def put_stream(self, digest: str, size: int, chunks: Iterable[bytes]) -> bool:
        checked = verified_chunks(chunks, digest, size, f"blob {digest}")
        dest = self.path(digest)
        if dest.is_file():
            for _ in checked:
                pass
            return False
        with atomic_writer(dest, 0o644, prefix=".upload-") as f:
            for chunk in checked:
                f.write(chunk)
        return True

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def open_range(self, digest: str, start: int, length: int) -> Iterator[bytes]:
        try:
            f = self.path(digest).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

        def chunks() -> Iterator[bytes]:
            with f:
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk

        return chunks()


class S3BlobStore:
    """Objects named by their sha256 digest in an S3-compatible bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            try:
                import boto3
            except ImportError:
                raise ValueError(
                    "an s3:// blob store needs boto3: pip install 'modelfleet[s3]'"
                ) from None
            client = boto3.client("s3", endpoint_url=endpoint_url)
        self.client = client

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, digest: str) -> str:
        """The object key of a blob."""
        return f"{self.prefix}/{blob_key(digest)}" if self.prefix else blob_key(digest)

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def has(self, digest: str) -> bool:
        try:
            self.size(digest)
        except BlobNotFound:
            return False
        return True

    def put(self, digest: str, data: bytes) -> None:
        if not self.has(digest):
            self.client.put_object(Bucket=self.bucket, Key=self.key(digest), Body=data)

    def put_stream(self, digest: str, size: int, chunks: Iterable[bytes]) -> bool:
        checked = verified_chunks(chunks, digest, size, f"blob {digest}")
        if self.has(digest):
            for _ in checked:
                pass
            return False
        key = self.key(digest)
        part = bytearray()
        it = iter(checked)
        # Up to one part: a plain PUT once the digest matched (the iterator ran out cleanly).
        for chunk in it:
            part += chunk
            if len(part) >= S3_PART:
                break
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(part))
            return True
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        parts: list[dict[str, Any]] = []
        try:

            def send(data: bytes) -> None:
                n = len(parts) + 1
                r = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=n, Body=data
                )
                parts.append({"PartNumber": n, "ETag": r["ETag"]})

            for chunk in it:
                part += chunk
                while len(part) >= S3_PART:
                    send(bytes(part[:S3_PART]))
                    del part[:S3_PART]
            if part:
                send(bytes(part))
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise
        return True

    def size(self, digest: str) -> int:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except ClientError as exc:
            if self._missing(exc):
                raise BlobNotFound(digest) from None
            raise
        return int(head["ContentLength"])

    def open_range(self, digest: str, start: int, length: int) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        if length <= 0:
            return iter(())
        try:
            obj = self.client.get_object(
                Bucket=self.bucket,
                Key=self.key(digest),
                Range=f"bytes={start}-{start + length - 1}",
            )
        except ClientError as exc:
            if self._missing(exc):
                raise BlobNotFound(digest) from None
            raise
        body = obj["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()


def check_blob_store_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a directory path or ``s3://bucket[/prefix]``."""
    u = urlsplit(url)
    if u.scheme == "s3":
        if not u.netloc:
            raise ValueError(
                f"an S3 blob store URL needs a bucket: s3://bucket/prefix, got {url!r}"
            )
    elif u.scheme not in ("", "file"):
        raise ValueError(f"blob store must be a directory or s3://bucket/prefix, got {url!r}")


def open_blob_store(url: str | None, default_dir: Path) -> BlobStore:
    """The store a ``--blob-store`` value names (the data directory's blobs/ by default)."""
    if not url:
        return DirectoryBlobStore(default_dir)
    check_blob_store_url(url)
    u = urlsplit(url)
    if u.scheme == "s3":
        return S3BlobStore(u.netloc, u.path)
    return DirectoryBlobStore(Path(u.path if u.scheme == "file" else url))
