//! Per-frame cost of one data-path step, without DPDK or a tap: `TxPath::run` and
//! `RxPath::run` over `virtio_queue::mock` guest memory, with a tap that only copies
//! (`writev` gathers into a buffer, `readv` scatters a prepared frame). What is left is the
//! backend's own work per frame: avail ring reads, descriptor walks and checks, guest memory
//! translation, used ring writes.
//!
//! `rx-ahead` is the RX step reading ahead into its own buffers and copying from there, as it
//! does from a tap served by an `io_uring` (the tap's per-call saving is not in this figure,
//! the extra copy is).
//!
//! `cargo bench -p vhost-net-batch --bench datapath_step` (criterion; throughput in frames).
//! The ring is refilled outside the measured part, so each sample is one run over a full ring.

use std::hint::black_box;
use std::io;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vhost_net_batch::datapath::{HdrLayout, RxPath, TapIo, TxPath};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Twice the chains a step takes: virtio-queue 0.18's mock lays its used ring over the avail
/// ring's second half, so only the first half may hold chains.
const QSIZE: u16 = 512;
const BUF: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x100_0000;
/// Chains per step: one `BATCH_BUDGET` run.
const FRAMES: u16 = 256;

/// A tap that only copies: every write is taken whole, every read returns `frame`.
struct CopyTap {
    frame: Vec<u8>,
    sink: Vec<u8>,
    reads_left: usize,
    /// Say reads come many per call: the RX path reads ahead and copies (as with `io_uring`).
    batched: bool,
}

impl TapIo for CopyTap {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.reads_left == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.reads_left -= 1;
        let mut off = 0;
        for v in iov {
            let n = v.iov_len.min(self.frame.len() - off);
            // SAFETY: the data path's iovecs point into guest memory or its scratch buffer,
            // each at least `iov_len` bytes long.
            unsafe {
                std::ptr::copy_nonoverlapping(self.frame[off..].as_ptr(), v.iov_base.cast(), n)
            };
            off += n;
            if off == self.frame.len() {
                break;
            }
        }
        Ok(self.frame.len())
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.sink.clear();
        for v in iov {
            // SAFETY: the data path's iovecs point into guest memory, `iov_len` bytes each.
            self.sink.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
            });
        }
        Ok(self.sink.len())
    }

    fn batches_reads(&self) -> bool {
        self.batched
    }
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// A fresh ring of `FRAMES` one-descriptor chains: TX chains holding a virtio-net header and
/// a frame of `len` bytes, or RX buffers of 2,048 bytes.
fn ring(m: &GuestMemoryMmap<()>, tx: bool, len: usize) -> Queue {
    let vq = MockSplitQueue::new(m, QSIZE);
    let descs: Vec<_> = (0..FRAMES)
        .map(|i| {
            let addr = BUF + 0x1000 * u64::from(i);
            if tx {
                d(addr, (12 + len) as u32, 0)
            } else {
                d(addr, 2048, VRING_DESC_F_WRITE as u16)
            }
        })
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    vq.create_queue().unwrap()
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12 + len];
    f[12..18].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[24] = 0x08;
    f[25] = 0x00;
    f
}

fn bench(c: &mut Criterion) {
    let m: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut g = c.benchmark_group("datapath_step");
    g.throughput(Throughput::Elements(u64::from(FRAMES)));
    for len in [64usize, 1514] {
        let f = frame(len);
        for i in 0..u64::from(FRAMES) {
            m.write_slice(&f, GuestAddress(BUF + 0x1000 * i)).unwrap();
        }
        let mut tap = CopyTap {
            frame: f.clone(),
            sink: Vec::with_capacity(2048),
            reads_left: 0,
            batched: false,
        };
        let mut tx = TxPath::new();
        g.bench_function(format!("tx/{len}"), |b| {
            b.iter_batched_ref(
                || ring(&m, true, len),
                |q| {
                    let r = tx.run(q, &m, &mut tap, HdrLayout::default(), FRAMES as usize, None);
                    assert_eq!(r.counts.packets, u64::from(FRAMES));
                    black_box(r);
                },
                BatchSize::SmallInput,
            )
        });
        for (name, batched) in [("rx", false), ("rx-ahead", true)] {
            let mut rx = RxPath::new();
            tap.batched = batched;
            g.bench_function(format!("{name}/{len}"), |b| {
                b.iter_batched_ref(
                    || ring(&m, false, len),
                    |q| {
                        tap.reads_left = FRAMES as usize;
                        let r = rx.run(q, &m, &mut tap, HdrLayout::default(), FRAMES as usize);
                        assert_eq!(r.counts.packets, u64::from(FRAMES));
                        black_box(r);
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
