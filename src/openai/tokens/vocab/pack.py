#!/usr/bin/env python3
"""Packs an OpenAI `.tiktoken` vocabulary into the form spillway embeds.

usage: pack.py o200k_base.tiktoken o200k_base.zlib

A `.tiktoken` file has one token per line, `base64(bytes) rank`, ranks 0, 1, 2, ...
in order. The packed form is the tokens' bytes in rank order, each preceded by its
length in one byte, compressed with zlib at level 9. `vocab.rs`'s tests unpack it,
write the `.tiktoken` text again and check its SHA-256 against the one OpenAI
publishes, so the packed file is the vocabulary, byte for byte.
"""
import base64, sys, zlib

src, dst = sys.argv[1], sys.argv[2]
records = []
for number, line in enumerate(open(src, "rb").read().splitlines()):
    token, rank = line.split(b" ")
    if int(rank) != number:
        sys.exit(f"{src}: rank {int(rank)} on line {number + 1}: ranks must be 0, 1, 2, ... in order")
    token = base64.b64decode(token)
    if not 0 < len(token) < 256:
        sys.exit(f"{src}: token of rank {number} is {len(token)} bytes long")
    records.append(bytes([len(token)]) + token)
open(dst, "wb").write(zlib.compress(b"".join(records), 9))
