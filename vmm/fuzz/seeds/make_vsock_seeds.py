#!/usr/bin/env python3
"""Writes seed inputs for the vsock_packet target into seeds/vsock_packet/.

Without them the fuzzer rarely assembles a header the validator accepts inside a
readable chain (guest CID 3, host CID 2, STREAM, a known op) within a short run,
so no connection ever opens. Each seed is a well-formed tx queue of size 8
(flags byte: bits 0-2 = 3, bit 3 = offer rx buffers) carrying a conversation
with the host listener on guest port 0 or 1. Layout as in common.rs: byte 0 is
the flags byte, byte 1 + a is guest address a; descriptor table at 0, available
ring at 0x80, used ring at 0x98, packets from 0x400.
"""
import os
import struct

GUEST, HOST = 3, 2
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
SIZE = 8
AVAIL = 16 * SIZE


def header(op, src_port=1000, dst_port=0, length=0, flags=0, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", GUEST, HOST, src_port, dst_port, length, 1, op,
                       flags, buf_alloc, fwd_cnt)


def seed(packets, split=False, flags=SIZE.bit_length() - 1 | 0x8):
    """packets: list of (header bytes, payload bytes); split puts the payload in a
    second descriptor."""
    mem = bytearray(0x2000)
    descs, heads, at, i = [], [], 0x400, 0
    for hdr, payload in packets:
        heads.append(i)
        if split and payload:
            mem[at:at + len(hdr)] = hdr
            mem[at + 0x100:at + 0x100 + len(payload)] = payload
            descs.append((at, len(hdr), 1, i + 1))  # NEXT
            descs.append((at + 0x100, len(payload), 0, 0))
            i += 2
            at += 0x200
        else:
            body = hdr + payload
            mem[at:at + len(body)] = body
            descs.append((at, len(body), 0, 0))
            i += 1
            at += 0x100
    assert i <= SIZE
    for n, (addr, length, fl, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", mem, 16 * n, addr, length, fl, nxt)
    struct.pack_into("<HH", mem, AVAIL, 0, len(heads))
    for n, h in enumerate(heads):
        struct.pack_into("<H", mem, AVAIL + 4 + 2 * n, h)
    return bytes([flags]) + bytes(mem[:at])


SEEDS = {
    "conversation": seed([
        (header(REQUEST), b""),
        (header(RW, length=10), b"0123456789"),
        (header(CREDIT_REQUEST), b""),
        (header(CREDIT_UPDATE, fwd_cnt=300), b""),
        (header(SHUTDOWN, flags=3), b""),
        (header(RST), b""),
    ]),
    "split_payload_port1": seed([
        (header(REQUEST, dst_port=1), b""),
        (header(RW, dst_port=1, length=64), bytes(range(64))),
        (header(RW, dst_port=1, length=32), b"x" * 32),
    ], split=True),
    "out_of_state": seed([
        (header(REQUEST), b""),
        (header(RESPONSE), b""),
        (header(REQUEST), b""),
        (header(RW, length=4), b"late"),
        (header(SHUTDOWN, flags=2), b""),
    ]),
    "tiny_credit_no_rx": seed([
        (header(REQUEST, buf_alloc=1), b""),
        (header(RW, length=8, buf_alloc=1), b"abcdefgh"),
    ], flags=3),
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vsock_packet")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
