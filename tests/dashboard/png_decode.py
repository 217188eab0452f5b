#!/usr/bin/env python3
"""An independent check of the PNG writer (harness/src/png.cpp): Python's zlib, not ours.

  png_decode.py image IMAGE.png OUT.json   checks the signature, every chunk CRC, IHDR, PLTE, the zlib
                                         stream (Adler-32 included), the row filters, and writes
                                         {"width", "height", "palette", "pixels": [[index...]...]}
  png_decode.py zlib RAW COMPRESSED      decompresses COMPRESSED and compares with RAW
Exit 1 with the reason on any defect.
"""
import json
import struct
import sys
import zlib


def fail(msg):
    print("png_decode:", msg)
    sys.exit(1)


def decode(path):
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        fail(f"{path}: bad signature {data[:8]!r}")
    pos, chunks = 8, []
    while pos < len(data):
        if pos + 12 > len(data):
            fail(f"{path}: truncated chunk at byte {pos}")
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        if zlib.crc32(kind + body) != crc:
            fail(f"{path}: CRC of chunk {kind!r} is {crc:#x}, expected {zlib.crc32(kind + body):#x}")
        chunks.append((kind, body))
        pos += 12 + n
    kinds = [k for k, _ in chunks]
    if kinds[0] != b"IHDR" or kinds[-1] != b"IEND":
        fail(f"{path}: chunks {kinds}")
    w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    if (depth, ctype, comp, filt, inter) != (8, 3, 0, 0, 0):
        fail(f"{path}: IHDR depth/type {(depth, ctype, comp, filt, inter)}, expected 8-bit palette")
    plte = b"".join(b for k, b in chunks if k == b"PLTE")
    palette = [list(plte[i:i + 3]) for i in range(0, len(plte), 3)]
    try:
        raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    except zlib.error as e:
        fail(f"{path}: IDAT is not a valid zlib stream: {e}")
    if len(raw) != h * (w + 1):
        fail(f"{path}: {len(raw)} bytes of image data, expected {h} rows x {w + 1}")
    pixels = []
    for y in range(h):
        row = raw[y * (w + 1):(y + 1) * (w + 1)]
        if row[0] != 0:
            fail(f"{path}: row {y} uses filter {row[0]}")
        if max(row[1:]) >= len(palette):
            fail(f"{path}: row {y} indexes colour {max(row[1:])} of a {len(palette)}-colour palette")
        pixels.append(list(row[1:]))
    return {"width": w, "height": h, "palette": palette, "pixels": pixels}


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "image":
        json.dump(decode(sys.argv[2]), open(sys.argv[3], "w"))
    elif len(sys.argv) == 4 and sys.argv[1] == "zlib":
        raw, comp = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
        try:
            out = zlib.decompress(comp)
        except zlib.error as e:
            fail(f"{sys.argv[3]}: not a valid zlib stream: {e}")
        if out != raw:
            fail(f"{sys.argv[3]}: decompresses to {len(out)} bytes that differ from the {len(raw)} raw bytes")
    else:
        fail(__doc__)
    print("ok")


if __name__ == "__main__":
    main()
