"""An OpenAI ``image_url`` -> a decoded RGB image and its content hash (one concept: fetching and
decoding media, with every limit a hostile client could push against).

    policy = MediaPolicy.from_settings(settings)
    loaded = load_image("data:image/png;base64,iVBOR...", policy)   # LoadedImage(image, content_hash)

Sources: ``data:`` URLs (base64; PNG, JPEG, WebP, GIF's first frame), ``http(s)://`` only from the
hosts of ``--allowed-media-domains`` (streamed, stopped at ``--max-image-bytes`` and at
``--media-fetch-timeout``; redirects only to the same host), ``file://`` only under
``--allowed-local-media-path`` (after ``..`` and symlinks are resolved; regular files only).
The header's width x height is checked against ``--max-image-pixels`` before any pixel is decoded
(decompression bombs). Every failure is a ``MediaError`` whose message names the problem; the API
layer turns it into a 400 naming the content part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_REDIRECTS = 3


class MediaError(ValueError):
    """An image that cannot be used; the message says why (the client's mistake: a 400)."""


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from and how large they may be (defaults: server/settings.py)."""

    allowed_domains: tuple[str, ...] = ()
    allowed_local_path: Path | None = None
    max_bytes: int = 20_000_000
    max_pixels: int = 7680 * 4320
    fetch_timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: Any) -> "MediaPolicy":
        return cls(allowed_domains=tuple(d.strip().lower() for d in settings.allowed_media_domains if d.strip()),
                   allowed_local_path=settings.allowed_local_media_path, max_bytes=settings.max_image_bytes,
                   max_pixels=settings.max_image_pixels, fetch_timeout=settings.media_fetch_timeout)


@dataclass(frozen=True)
class LoadedImage:
    """image: RGB ``PIL.Image``; content_hash: sha256 hex of its mode, size and pixel bytes (the same
    pixels in another container or encoding hash the same)."""

    image: Image.Image
    content_hash: str


def load_image(url: str, policy: MediaPolicy) -> LoadedImage:
    """Fetch (per ``policy``) and decode the image an ``image_url.url`` names; any failure is a ``MediaError``."""
    if not isinstance(url, str) or not url:
        raise MediaError("the image URL is empty")
    try:
        return _load(url, policy)
    except MediaError:
        raise
    except (ValueError, OSError, UnicodeError) as exc:  # a malformed URL or path urllib/pathlib refuse
        raise MediaError(f"the image URL cannot be used: {_reason(exc)}") from None


def _load(url: str, policy: MediaPolicy) -> LoadedImage:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(_data_url_bytes(url, policy), policy)
    if scheme in ("http", "https"):
        return decode_image(_fetch_http(url, policy), policy)
    if scheme == "file":
        return decode_image(_read_local(url, policy), policy)
    raise MediaError(f"unsupported image URL scheme {scheme or url[:16]!r} (use data:, http(s):// or file://)")


def decode_image(data: bytes, policy: MediaPolicy) -> LoadedImage:
    """Encoded bytes -> RGB image + content hash. The size in the header is checked before decoding."""
    if len(data) > policy.max_bytes:
        raise MediaError(f"the image has {len(data)} bytes, over the limit of {policy.max_bytes} (--max-image-bytes)")
    if not data:
        raise MediaError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        raise MediaError(f"the image's size is over the limit of {policy.max_pixels} pixels (--max-image-pixels)") from None
    except Image.UnidentifiedImageError:
        raise MediaError("the image cannot be decoded (not a PNG, JPEG, WebP or GIF file)") from None
    except Exception as exc:  # noqa: BLE001 - a malformed header may raise anything from a plugin
        raise MediaError(f"the image cannot be decoded: {_reason(exc)}") from None
    width, height = img.size
    if width < 1 or height < 1 or width * height > policy.max_pixels:
        raise MediaError(f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{policy.max_pixels} (--max-image-pixels)")
    try:
        img.seek(0)  # an animated GIF or WebP: its first frame
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            rgb = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, broken chunks SyntaxError/ValueError
        raise MediaError(f"the image cannot be decoded ({img.format}): {_reason(exc)}") from None
    digest = hashlib.sha256()
    digest.update(f"{rgb.mode}:{rgb.size[0]}x{rgb.size[1]}:".encode())
    digest.update(rgb.tobytes())
    return LoadedImage(rgb, digest.hexdigest())


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]


# -- data: ---------------------------------------------------------------------------------------


def _data_url_bytes(url: str, policy: MediaPolicy) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("the data: URL has no ',' before its data")
    params = [p.strip().lower() for p in head[len("data:"):].split(";")]
    media_type = params[0] or "text/plain"
    if media_type not in FORMATS.values() and media_type not in ("image/jpg", "image/*", "application/octet-stream"):
        raise MediaError(f"unsupported media type {media_type!r} in the data: URL (PNG, JPEG, WebP or GIF images)")
    if "base64" not in params[1:]:
        raise MediaError("the data: URL must be base64-encoded (data:image/png;base64,...)")
    payload = "".join(payload.split())  # line breaks some encoders insert
    if len(payload) // 4 * 3 > policy.max_bytes + 2:
        raise MediaError(f"the image has about {len(payload) // 4 * 3} bytes, over the limit of {policy.max_bytes} "
                         "(--max-image-bytes)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URL's payload is not valid base64") from None


# -- http(s):// ----------------------------------------------------------------------------------


def _fetch_http(url: str, policy: MediaPolicy) -> bytes:
    import httpx  # noqa: PLC0415 - only servers that allow remote media pay for the import

    if not policy.allowed_domains:
        raise MediaError("http(s) image URLs are not allowed on this server (its operator may allow hosts with "
                         "--allowed-media-domains)")
    host = _allowed_host(url, policy)
    deadline = time.monotonic() + policy.fetch_timeout
    try:
        with httpx.Client(follow_redirects=False, timeout=httpx.Timeout(policy.fetch_timeout), trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", url, headers={"Accept": "image/*"}) as resp:
                    if resp.is_redirect:
                        target = urljoin(url, resp.headers.get("location", ""))
                        other = (urlsplit(target).hostname or "").lower()
                        if other != host:
                            raise MediaError(f"the image URL redirects to another host ({other!r})")
                        _allowed_host(target, policy)  # the scheme, the port's syntax
                        url = target
                        continue
                    if resp.status_code != 200:
                        raise MediaError(f"fetching the image URL returned HTTP {resp.status_code}")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise MediaError(f"the image has {declared} bytes, over the limit of {policy.max_bytes} "
                                         "(--max-image-bytes)")
                    chunks, size = [], 0
                    for chunk in resp.iter_bytes():
                        size += len(chunk)
                        if size > policy.max_bytes:
                            raise MediaError(f"the image is over the limit of {policy.max_bytes} bytes "
                                             "(--max-image-bytes)")
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("deadline")
                        chunks.append(chunk)
                    return b"".join(chunks)
            raise MediaError(f"the image URL redirects more than {MAX_REDIRECTS} times")
    except httpx.TimeoutException:
        raise MediaError(f"fetching the image URL took longer than {policy.fetch_timeout:g} s "
                         "(--media-fetch-timeout)") from None
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching the image URL failed: {_reason(exc)}") from None


def _allowed_host(url: str, policy: MediaPolicy) -> str:
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise MediaError("the image URL is malformed") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"the image URL redirects to an unsupported scheme {parts.scheme!r}")
    if host not in policy.allowed_domains:
        raise MediaError(f"the host {host!r} is not in --allowed-media-domains")
    return host


# -- file:// -------------------------------------------------------------------------------------


def _read_local(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise MediaError("file:// image URLs are not allowed on this server (its operator may allow a folder with "
                         "--allowed-local-media-path)")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError("a file:// image URL must name a local path (file:///path)")
    root = Path(policy.allowed_local_path).resolve()
    raw = unquote(parts.path)
    if "\x00" in raw:
        raise MediaError("the file:// image path is malformed")
    try:
        path = Path(raw).resolve(strict=True)  # '..' and every symlink resolved
    except (OSError, RuntimeError):
        raise MediaError(f"the file {raw!r} does not exist") from None
    if not path.is_relative_to(root):
        raise MediaError(f"the file {raw!r} is outside --allowed-local-media-path")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise MediaError(f"the file {raw!r} cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"the file {raw!r} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise MediaError(f"the image has {info.st_size} bytes, over the limit of {policy.max_bytes} "
                             "(--max-image-bytes)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(policy.max_bytes + 1)
    finally:
        os.close(fd)
