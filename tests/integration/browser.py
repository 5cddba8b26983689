"""Headless Chromium for the tests: Debian's ``/usr/bin/chromium`` driven by Playwright, and a PNG reader.

Small and shared (desktop sessions, the gateway). Never a downloaded browser: Playwright launches
``executable_path=/usr/bin/chromium``. As root Chromium needs ``--no-sandbox``; the other flags keep it from
reaching out (updates, sync, QUIC) so that a test's traffic stays on loopback or inside the bed's namespaces.

A browser that must reach a bed host's loopback (``127.0.0.1:PORT`` inside the ``workspace`` namespace) runs inside
that namespace: :func:`browser_in` starts a Playwright driver there with ``nsenter --net`` (its own Node process
started by the Python client, so it inherits the namespace) and connects to it.

:func:`read_png` decodes a screenshot (8-bit RGB/RGBA, non-interlaced, as Chromium writes them) with the standard
library only; :func:`share` measures how much of a region has colours that pass a test.
"""
from __future__ import annotations

import contextlib
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import playwright
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "output" / "screenshots"  # git-ignored (tests/output/)

Pixel = Tuple[int, int, int]


def artifact(name: str) -> Path:
    """Where a test keeps a screenshot (tests/output/screenshots/, git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


@contextlib.contextmanager
def browser(netns: Optional[str] = None) -> Iterator[object]:
    """A Playwright ``Browser`` on Debian's Chromium; inside network namespace ``netns`` (a path) when given."""
    saved = os.environ.get("PLAYWRIGHT_NODEJS_PATH")
    if netns:
        # the driver (node) is started by sync_playwright(): run it through nsenter so that it, and the Chromium it
        # launches, live in the namespace. Playwright runs PLAYWRIGHT_NODEJS_PATH with the driver's script as argv.
        wrapper = _nsenter_node(netns)
        os.environ["PLAYWRIGHT_NODEJS_PATH"] = str(wrapper)
    try:
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                yield b
            finally:
                b.close()
    finally:
        if netns:
            if saved is None:
                os.environ.pop("PLAYWRIGHT_NODEJS_PATH", None)
            else:
                os.environ["PLAYWRIGHT_NODEJS_PATH"] = saved


def _nsenter_node(netns: str) -> Path:
    node = Path(playwright.__file__).resolve().parent / "driver" / "node"
    wrapper = ARTIFACTS.parent / f"node-in-{Path(netns).name}.sh"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec nsenter --net={netns} -- {node} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


# ---------------------------------------------------------------- screenshots


def read_png(data: bytes) -> Tuple[int, int, List[bytearray], int]:
    """``(width, height, rows, bytes per pixel)`` of an 8-bit RGB or RGBA, non-interlaced PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, width = 8, b"", 0
    height = bpp = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or ctype not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: List[bytearray] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(line)
        prev = line
    return width, height, rows, bpp


def share(png: bytes, box: Tuple[int, int, int, int], test: Callable[[Pixel], bool], step: int = 2) -> float:
    """The share (0..1) of pixels in ``box`` = (x0, y0, x1, y1), sampled every ``step`` pixels, passing ``test``."""
    width, height, rows, bpp = read_png(png)
    x0, y0, x1, y1 = box
    hit = total = 0
    for y in range(max(0, y0), min(height, y1), step):
        row = rows[y]
        for x in range(max(0, x0), min(width, x1), step):
            i = x * bpp
            total += 1
            hit += bool(test((row[i], row[i + 1], row[i + 2])))
    return hit / total if total else 0.0


def colours(png: bytes, box: Tuple[int, int, int, int], step: int = 4) -> Sequence[Tuple[Pixel, int]]:
    """The most frequent colours in ``box`` (for failure messages)."""
    width, height, rows, bpp = read_png(png)
    counts: dict = {}
    for y in range(max(0, box[1]), min(height, box[3]), step):
        for x in range(max(0, box[0]), min(width, box[2]), step):
            i = x * bpp
            key = (rows[y][i], rows[y][i + 1], rows[y][i + 2])
            counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:8]
