#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets, byte for byte in the input formats the targets
decode: for `datapath` (corpus/datapath/) meaningful rings and operation sequences, for `shim`
(corpus/shim/) vhost-user message streams as QEMU sends them. The fuzzer mutates from these.
Run from vhost-net-batch/fuzz: python3 seeds/make_seeds.py
(corpus/datapath/guest_reposts_held_chains is not generated here: it is an input the fuzzer
found, kept because it once tripped the checks.)"""
import os
import struct

DATA = 0x10000


class B:
    def __init__(self):
        self.b = bytearray()

    def u8(self, v):
        self.b += bytes([v & 0xff])
        return self

    def u16(self, v):
        self.b += struct.pack("<H", v & 0xffff)
        return self

    def u32(self, v):
        self.b += struct.pack("<I", v & 0xffffffff)
        return self

    def u64(self, v):
        self.b += struct.pack("<Q", v & 0xffffffffffffffff)
        return self

    # gen_desc: flags byte, optional next, address, length.
    def desc(self, addr, length, nxt=False, write_dir=True, default_write=True, indirect=False,
             next_idx=None, table_slot=None):
        f = 1 if nxt else 0
        # The target sets WRITE iff ((f >> 1) & 3 != 0) == default_write.
        if write_dir == default_write:
            f |= 0b010
        if indirect:
            f |= 0b111 << 3
        if next_idx is not None:
            f |= 3 << 6
        self.u8(f)
        if next_idx is not None:
            self.u16(next_idx)
        if table_slot is not None:
            self.u8(5).u8(table_slot)
        else:
            self.u8(7).u64(addr)
        if indirect:
            self.u8(3).u32(length)
        else:
            self.u8(7).u32(length)
        return self


def header(b, layout=0, pattern=1, features=0):
    b.u8(layout).u8(pattern).u8(features)


def queue(b, size_log2, event_idx, descs, write, used_event=0, avail_flags=0, start=None):
    b.u8(size_log2).u8(1 if event_idx else 0)
    if start is None:
        b.u8(0)
    else:
        b.u8(3).u16(start)
    b.u8(len(descs))
    for d in descs:
        d(b, write)
    b.u8(avail_flags).u16(used_event)


def D(addr, length, nxt=False, write=None, indirect=False, next_idx=None, table_slot=None):
    def f(b, default_write):
        w = default_write if write is None else write
        b.desc(addr, length, nxt, w, default_write, indirect, next_idx, table_slot)
    return f


def avail(b, size, heads, jump=None):
    b.u8(len(heads))
    for h in heads:
        if h < 0xe0 and h < size:
            b.u8(h)
        else:
            b.u8(0xff).u16(h)
    if jump is None:
        b.u8(0)
    else:
        b.u8(7).u16(jump)


def tx(b, budget=256, hold=None, script=b""):
    b.u8(0)
    b.u8(6).u16(budget)
    if hold is None:
        b.u8(0)
    else:
        b.u8(1).u8(hold)
    b.u8(len(script))
    b.b += script


def rx(b, budget=256, events=()):
    """events: ('f', len) frame, ('c', len) control frame, 'again', 'fail'"""
    b.u8(2)
    b.u8(6).u16(budget)
    b.u8(len(events))
    for e in events:
        if e == "again":
            b.u8(6).u8(0).u8(0)
        elif e == "fail":
            b.u8(7).u8(0).u8(0)
        else:
            kind, ln = e
            k = 0 if kind == "f" else 5
            if ln < 4096:
                b.u8(k | 2 << 3).u16(ln).u8(0x5a)
            else:
                # Length mode 3: u16 + header length + u8.
                b.u8(k | 3 << 3).u16(ln - 12).u8(0).u8(0x5a)


def deliver(b, n):
    b.u8(5).u8(0).u16(n).u8(0x33)


def op(b, code):
    b.u8(code)


def notify(b, rx_q, which):
    b.u8(7).u8(1 if rx_q else 0).u8(which)


def post(b, rx_q, size, heads):
    b.u8(8).u8(1 if rx_q else 0).u8(0)
    b.u8(len(heads))
    for h in heads:
        b.u8(h if h < 0xe0 else 0xff)
        if h >= 0xe0:
            b.u16(h)


def tables(b, explicit=(), long=None):
    n = len(explicit) + (1 if long else 0)
    b.u8(n)
    for slot, write, descs in explicit:
        b.u8(slot).u8(len(descs)).u8(1 if write else 0)
        for d in descs:
            d(b, write)
    if long:
        count, base, stride, length, write = long
        b.u8(4).u16(count - 1).u8(7).u64(base).u8(stride).u8(length).u8(1 if write else 0)


def seeds():
    out = {}
    TABLE0 = 0x6000

    # 1. Mergeable RX buffers and two-descriptor TX chains; TX, RX with small, large and control
    # frames, a reply, signalling.
    b = B()
    header(b, layout=0, pattern=1, features=0)
    queue(b, 4, False, [D(DATA + 0x1000 * k, 2048) for k in range(8)], True)
    txd = []
    for k in range(4):
        txd.append(D(DATA + 0x20000 + 0x1000 * k, 12, nxt=True, next_idx=2 * k + 1))
        txd.append(D(DATA + 0x20000 + 0x1000 * k + 0x100, 100 + 300 * k))
    queue(b, 4, True, txd, False, used_event=1)
    tables(b)
    avail(b, 16, list(range(8)))
    avail(b, 16, [0, 2, 4, 6])
    tx(b)
    rx(b, events=[("f", 60), ("f", 1500), ("f", 5000), ("c", 64), "again", ("f", 100)])
    deliver(b, 64)
    notify(b, True, 0)
    notify(b, False, 2)
    rx(b, events=[("f", 70)])
    out["basic"] = b.b

    # 2. A frame larger than all buffers stays pending, the guest posts more, then the ring
    # stops with another frame pending.
    b = B()
    header(b, layout=1, pattern=0, features=0)
    queue(b, 3, False, [D(DATA + 0x800 * k, 1500) for k in range(8)], True)
    queue(b, 3, False, [], False)
    tables(b)
    avail(b, 8, [0, 1])
    avail(b, 8, [])
    rx(b, events=[("f", 4000), ("f", 60)])
    post(b, True, 8, [2, 3])
    rx(b)
    post(b, True, 8, [4])
    rx(b, events=[("f", 9000)])
    deliver(b, 40)
    op(b, 6)  # abandon
    rx(b, events=[("f", 50)])
    out["pending_abandon"] = b.b

    # 3. Legacy header, no mergeable buffers, indirect tables on both rings, a hole.
    b = B()
    header(b, layout=2, pattern=2, features=2)
    queue(b, 2, False, [D(TABLE0, 16 * 3, indirect=True, table_slot=0), D(DATA + 0x100, 1600)], True)
    queue(b, 2, True, [D(0, 16 * 2, indirect=True, table_slot=1), D(DATA + 0x3000, 80)], False)
    tables(b, explicit=[
        (0, True, [D(DATA + 0x4000, 10, nxt=True), D(DATA + 0x5000, 500, nxt=True), D(0x2ff00, 2000)]),
        (1, False, [D(DATA + 0x6000, 10, nxt=True), D(DATA + 0x6040, 54)]),
    ])
    avail(b, 4, [0, 1])
    avail(b, 4, [0, 1, 5])
    tx(b, budget=1)
    tx(b, script=bytes([6]))
    tx(b, script=bytes([7, 0]))
    rx(b, events=[("f", 2000), ("f", 3000), ("f", 8), "fail"])
    out["legacy_indirect"] = b.b

    # 4. A long generated indirect table (more segments than one read takes).
    b = B()
    header(b, layout=1, pattern=1, features=0)
    queue(b, 1, True, [D(0x10000, 16 * 1100, indirect=True, table_slot=4), D(DATA + 0x30000, 4096)], True)
    queue(b, 1, False, [D(0x10000, 16 * 1100, indirect=True, table_slot=4)], False)
    tables(b, long=(1100, 0x28000, 16, 16, True))
    avail(b, 2, [0, 1])
    avail(b, 2, [0])
    rx(b, events=[("f", 300), ("f", 300)])
    tx(b)
    out["many_segments"] = b.b

    # 5. Wrapping indices, EVENT_IDX, TX hold, bad heads and a corrupt avail index.
    b = B()
    header(b, layout=0, pattern=0, features=1)
    queue(b, 5, True, [D(DATA + 0x1000 * k, 1024, nxt=(k % 2 == 0)) for k in range(16)], True,
          start=0xfffe, used_event=0xffff)
    queue(b, 5, True, [D(DATA + 0x20000 + 0x100 * k, 64) for k in range(16)], False, start=0xfff0)
    tables(b)
    avail(b, 32, [0, 2, 300, 4, 6])
    avail(b, 32, [1, 2, 3, 40000, 5, 6, 7, 8, 9, 10])
    tx(b, budget=4, hold=8)
    tx(b, hold=1)
    rx(b, budget=2, events=[("f", 100)] * 4)
    rx(b, events=[("f", 100)] * 4)
    notify(b, True, 1)
    notify(b, False, 4)
    b.u8(8).u8(0).u8(3).u8(0).u16(0x4000)  # TX avail index jumps
    tx(b)
    out["wrap_event_idx"] = b.b

    # Reproducers of the bugs the target found (each failed before its fix).
    # 6. A malformed chain met while a mergeable frame collects buffers, then the ring stops:
    # abandoning the frame gave back a chain already completed.
    b = B()
    header(b, layout=0, pattern=0, features=0)
    queue(b, 3, False, [D(DATA, 1500), D(DATA + 0x1000, 1500, write=False), D(DATA + 0x2000, 1500)], True)
    queue(b, 3, False, [], False)
    tables(b)
    avail(b, 8, [0, 1, 2])
    avail(b, 8, [])
    rx(b, events=[("f", 4000)])
    op(b, 6)  # abandon
    out["regress_abandon_after_bad_chain"] = b.b

    # 7. Control frames from the tap beyond the RX budget.
    b = B()
    header(b, layout=0, pattern=0, features=0)
    queue(b, 3, False, [D(DATA + 0x1000 * k, 2048) for k in range(4)], True)
    queue(b, 3, False, [], False)
    tables(b)
    avail(b, 8, [0, 1, 2, 3])
    avail(b, 8, [])
    rx(b, budget=2, events=[("c", 60)] * 5)
    out["regress_rx_control_budget"] = b.b

    # 8. More control frames on TX than the control inbox holds (the pattern puts the control
    # EtherType in every 64-byte block).
    b = B()
    header(b, layout=0, pattern=2, features=0)
    queue(b, 4, False, [], True)
    queue(b, 4, False, [D(DATA + 0x40 * k, 60) for k in range(12)], False)
    tables(b)
    avail(b, 16, [])
    avail(b, 16, list(range(12)))
    tx(b)
    out["regress_tx_control_inbox"] = b.b
    return out


def vhost_user(request, payload=b"", flags=1):
    return struct.pack("<III", request, flags, len(payload)) + payload


def shim_seeds():
    """Input: fds with the first part, split offset (u16), fds with the second part, stream."""
    u64 = lambda v: struct.pack("<Q", v)
    get_features = vhost_user(1)
    set_owner = vhost_user(3)
    proto = vhost_user(16, u64(1 << 3 | 1 << 0))  # REPLY_ACK | MQ
    early_enable = vhost_user(18, u64(1 << 32), flags=1 | 8)
    set_features = vhost_user(2, u64(1 << 30 | 1 << 32 | 1 << 15))
    set_features_no_proto = vhost_user(2, u64(1 << 32))
    mem_table = vhost_user(5, struct.pack("<II", 1, 0) + u64(0) + u64(1 << 20) + u64(0x7f0000000000) + u64(0))
    vring_kick = vhost_user(12, u64(0))
    reset = vhost_user(4)
    qemu = get_features + set_owner + proto + early_enable + set_features + mem_table + vring_kick
    out = {}

    def seed(name, stream, split=0, fds_a=0, fds_b=0):
        out[name] = bytes([fds_a]) + struct.pack("<H", split) + bytes([fds_b]) + stream

    seed("qemu_start", qemu)
    # The memory table and the kick carry descriptors.
    k = len(qemu) - len(mem_table) - len(vring_kick)
    seed("qemu_start_fds", qemu, split=k, fds_b=1)
    seed("no_protocol_features", early_enable + set_features_no_proto + get_features)
    seed("reset_rearms", set_features + reset + early_enable + set_features)
    seed("oversized", get_features + struct.pack("<III", 5, 1, 1 << 20))
    seed("truncated", qemu[:-5])
    seed("split_header", qemu, split=len(get_features) + 5, fds_b=2)
    seed("too_many_fds", mem_table + get_features, split=len(mem_table), fds_a=40)
    return out


if __name__ == "__main__":
    for target, corpus in (("datapath", seeds()), ("shim", shim_seeds())):
        d = f"corpus/{target}"
        os.makedirs(d, exist_ok=True)
        for name, data in corpus.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(bytes(data))
            print(f"{d}/{name}: {len(data)} bytes")
