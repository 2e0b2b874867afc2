"""server/multimodal/media.py: every format, broken and hostile data, size and pixel limits, the
http(s) host allowlist against a local server, and file:// confinement."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.multimodal.media import LoadedImage, MediaError, MediaPolicy, decode_image, load_image

POLICY = MediaPolicy()


def picture(w: int = 40, h: int = 30, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


# -- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kw,exact", [("PNG", {}, True), ("JPEG", {"quality": 90}, False),
                                          ("WEBP", {"lossless": True}, True), ("GIF", {}, False)])
def test_every_format_decodes_to_rgb(fmt, kw, exact):
    img = picture()
    loaded = load_image(data_url(encode(img, fmt, **kw), f"image/{fmt.lower()}"), POLICY)
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.mode == "RGB" and loaded.image.size == (40, 30)
    assert len(loaded.content_hash) == 64
    if exact:  # lossless: the same pixels, so the same hash whatever the container
        assert np.array_equal(np.asarray(loaded.image), np.asarray(img))
        assert loaded.content_hash == load_image(data_url(encode(img, "PNG")), POLICY).content_hash


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    loaded = load_image(data_url(buf.getvalue(), "image/gif"), POLICY)
    assert loaded.image.getpixel((8, 8)) == (255, 0, 0)


def test_palette_and_alpha_become_rgb_and_hash_tracks_pixels():
    rgba = picture(mode="RGBA")
    loaded = decode_image(encode(rgba, "PNG"), POLICY)
    assert loaded.image.mode == "RGB"
    other = decode_image(encode(picture(seed=1), "PNG"), POLICY)
    assert other.content_hash != loaded.content_hash
    assert decode_image(encode(picture(), "PNG"), POLICY).content_hash == decode_image(
        encode(picture(), "PNG", compress_level=9), POLICY).content_hash


# -- broken and unsupported data ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_image_is_refused(fmt):
    data = encode(picture(64, 64), fmt)
    with pytest.raises(MediaError, match="cannot be decoded"):
        decode_image(data[: len(data) // 2], POLICY)


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_refused(data):
    with pytest.raises(MediaError, match="cannot be decoded"):
        decode_image(data, POLICY)


def test_unsupported_container_is_refused():
    with pytest.raises(MediaError, match="not a PNG, JPEG, WebP or GIF"):
        decode_image(encode(picture(), "BMP"), POLICY)
    with pytest.raises(MediaError, match="unsupported media type 'text/plain'"):
        load_image("data:text/plain;base64,aGVsbG8=", POLICY)


@pytest.mark.parametrize("url,message", [
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png,rawbytes", "base64-encoded"),
    ("data:image/png;base64", "no ','"),
    ("ftp://example.com/a.png", "unsupported image URL scheme 'ftp'"),
    ("", "empty"),
])
def test_malformed_urls(url, message):
    with pytest.raises(MediaError, match=message):
        load_image(url, POLICY)


@pytest.mark.parametrize("url", ["file://[", "file:///\udc80", "http://[::1", "https://a:99999999/x", "data:",
                                 "data:image/png;base64,====", "file://" + "a" * 5000, "\x00", "http://"])
def test_hostile_urls_are_media_errors(url, tmp_path):
    policy = MediaPolicy(allowed_domains=("a",), allowed_local_path=tmp_path, fetch_timeout=0.5)
    with pytest.raises(MediaError):
        load_image(url, policy)


# -- limits --------------------------------------------------------------------------------------


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(MediaError, match="40x30 = 1200 pixels, over the limit of 1000 .--max-image-pixels"):
        decode_image(encode(picture(), "PNG"), MediaPolicy(max_pixels=1000))


def _png_bomb(side: int) -> bytes:
    """A 1-bit greyscale PNG of side x side pixels, all zero: a few hundred KB that decode to side^2 pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_without_decoding():
    bomb = _png_bomb(30000)  # 900 M pixels in well under a megabyte
    assert len(bomb) < 1_000_000
    t0 = time.perf_counter()
    with pytest.raises(MediaError, match="--max-image-pixels"):
        decode_image(bomb, POLICY)
    assert time.perf_counter() - t0 < 1.0


def test_byte_limit():
    data = encode(picture(200, 200), "PNG")
    small = MediaPolicy(max_bytes=10_000)
    with pytest.raises(MediaError, match="over the limit of 10000 .--max-image-bytes"):
        decode_image(data, small)
    with pytest.raises(MediaError, match="--max-image-bytes"):
        load_image(data_url(data), small)  # refused from the base64 length, before decoding it


# -- http(s) -------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    png = encode(picture(), "PNG")

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self._send(200, self.png, {"Content-Length": str(len(self.png)), "Content-Type": "image/png"})
        elif self.path == "/stream-big":  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\x00" * 10_000)
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"\x00" * 10)
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif self.path == "/same-host":
            self._send(302, b"", {"Location": "/img.png", "Content-Length": "0"})
        elif self.path == "/other-host":
            self._send(302, b"", {"Location": f"http://localhost:{port}/img.png", "Content-Length": "0"})
        else:
            self._send(404, b"no", {"Content-Length": "2"})

    def _send(self, status, body, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


ALLOW_LOCAL = MediaPolicy(allowed_domains=("127.0.0.1",), fetch_timeout=2.0)


def test_http_refused_by_default_naming_the_flag(http_base):
    with pytest.raises(MediaError, match="--allowed-media-domains"):
        load_image(f"{http_base}/img.png", POLICY)


def test_http_host_not_listed(http_base):
    with pytest.raises(MediaError, match="'127.0.0.1' is not in --allowed-media-domains"):
        load_image(f"{http_base}/img.png", MediaPolicy(allowed_domains=("example.com",)))


def test_http_allowed_host(http_base):
    loaded = load_image(f"{http_base}/img.png", ALLOW_LOCAL)
    assert loaded.content_hash == decode_image(_Handler.png, POLICY).content_hash
    assert load_image(f"{http_base}/same-host", ALLOW_LOCAL).content_hash == loaded.content_hash


def test_http_redirect_to_another_host_is_refused(http_base):
    with pytest.raises(MediaError, match="redirects to another host"):
        load_image(f"{http_base}/other-host", ALLOW_LOCAL)


def test_http_limits(http_base):
    with pytest.raises(MediaError, match="--max-image-bytes"):
        load_image(f"{http_base}/stream-big", MediaPolicy(allowed_domains=("127.0.0.1",), max_bytes=50_000))
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(f"{http_base}/missing", ALLOW_LOCAL)
    t0 = time.perf_counter()
    with pytest.raises(MediaError, match="--media-fetch-timeout"):
        load_image(f"{http_base}/slow", MediaPolicy(allowed_domains=("127.0.0.1",), fetch_timeout=0.5))
    assert time.perf_counter() - t0 < 2.0


# -- file:// -------------------------------------------------------------------------------------


@pytest.fixture()
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(encode(picture(), "PNG"))
    (tmp_path / "secret.png").write_bytes(encode(picture(seed=3), "PNG"))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "sub" / "ok.png", root / "inner-link.png")
    return root


def test_file_refused_by_default_naming_the_flag(media_root):
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        load_image(f"file://{media_root}/sub/ok.png", POLICY)


def test_file_inside_root(media_root):
    policy = MediaPolicy(allowed_local_path=media_root)
    assert load_image(f"file://{media_root}/sub/ok.png", policy).image.size == (40, 30)
    assert load_image(f"file://{media_root}/inner-link.png", policy).image.size == (40, 30)


@pytest.mark.parametrize("name,message", [
    ("sub/../../secret.png", "outside --allowed-local-media-path"),
    ("link.png", "outside --allowed-local-media-path"),
    ("sub", "not a regular file"),
    ("missing.png", "does not exist"),
])
def test_file_escapes_and_non_files(media_root, name, message):
    with pytest.raises(MediaError, match=message):
        load_image(f"file://{media_root}/{name}", MediaPolicy(allowed_local_path=media_root))


def test_file_fifo_and_remote_host(media_root):
    os.mkfifo(media_root / "pipe")
    policy = MediaPolicy(allowed_local_path=media_root)
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(f"file://{media_root}/pipe", policy)
    with pytest.raises(MediaError, match="local path"):
        load_image(f"file://otherhost{media_root}/sub/ok.png", policy)
