//! Shared memory between the `tcp` backend's ranks when they run on one host, as NCCL's and
//! gloo's shared-memory transports do: the gradients skip the sockets (two kernel copies each
//! way and a wake-up per buffer-full), and the star's second half (rank 0 sending the average
//! back) is gone.
//!
//! Every rank writes its shard gradients into the shard's slot of one mapped segment, publishes
//! a step counter, and waits for the other ranks' counters (a short spin, then a futex). Each
//! rank then runs the coordinator's [`average_in_shard_order`] over its part of the values (a
//! reduce-scatter: rank r of w sums values `len·r/w .. len·(r+1)/w` of every slot) into the
//! segment's average, publishes a second counter with what it found wrong if anything, and waits
//! for the other parts; the optimizer then reads the whole average in place. Each value is the
//! same sum in the same order as over the whole buffer, so every rank, and a tcp or grpc job,
//! gets the same bits, and every rank names the same culprit for a value that is not finite.
//! Slots and averages are double-buffered by the counter's parity: a rank writes step `n + 2`'s
//! only after every rank has published `n + 1`'s gradients, which each does only after it has
//! applied step `n`.
//!
//! The tcp links stay open beside it: rank 0 offers the segment over them (its path and a nonce
//! written in it, so a rank maps the file rank 0 made, on the same host), unlinks it once every
//! rank has answered, and while waiting a rank watches its link(s) for the peer going away, so
//! that a dead rank fails the step at once, as it does over the sockets. Any rank that cannot map
//! the segment (another host or container, another user, a `/dev/shm` too small) makes the whole
//! collective stay on the sockets.
//!
//! [`average_in_shard_order`]: lockstep_common::reduce::average_in_shard_order

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where segments are made: the host's shared-memory file system.
pub const DIR: &str = "/dev/shm";
const MAGIC: &[u8; 8] = b"LSSHM\x00\x00\x01";
/// The header's size; each rank's control block starts after it.
const HEADER: usize = 64;
/// A control block's alignment (two cache lines, so that the adjacent-line prefetcher does not
/// make two ranks' counters share).
const BLOCK_ALIGN: usize = 128;
/// Bytes of a step record's fixed part: epoch, step, shards held, padding.
const RECORD_FIXED: usize = 8 + 8 + 4 + 4;
/// How long a waiting rank spins on a counter before it sleeps on the futex.
const SPIN: Duration = Duration::from_micros(50);
/// How long one futex sleep lasts at most, between checks of the links and the deadline.
const NAP: Duration = Duration::from_millis(2);

/// Where everything lives in a segment for `world` ranks, `shards` shards per step and `len`
/// gradient values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Ranks.
    pub world: u32,
    /// Shards per step.
    pub shards: u32,
    /// Gradient length in values.
    pub len: usize,
    record: usize,
    block: usize,
    data: usize,
    averages: usize,
    size: usize,
}

impl Layout {
    /// The layout, or `None` when its size does not fit the address space.
    pub fn new(world: u32, shards: u32, len: usize) -> Option<Self> {
        let round = |n: usize, to: usize| n.checked_add(to - 1).map(|n| n / to * to);
        let record = round(RECORD_FIXED + 4 * shards as usize, 8)?;
        let block = round(128 + 2 * record, BLOCK_ALIGN)?;
        let data = round(HEADER + block.checked_mul(world as usize)?, 4096)?;
        let slots = 2usize.checked_mul(shards as usize)?.checked_mul(len)?;
        let averages = data.checked_add(slots.checked_mul(4)?)?;
        let size = averages.checked_add(len.checked_mul(8)?)?;
        Some(Self {
            world,
            shards,
            len,
            record,
            block,
            data,
            averages,
            size,
        })
    }

    /// The segment's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    fn counter(&self, rank: u32) -> usize {
        HEADER + rank as usize * self.block
    }

    /// The counter of a rank's part of the average, on the next cache line; its statuses
    /// follow it.
    fn reduced(&self, rank: u32) -> usize {
        self.counter(rank) + 64
    }

    fn status(&self, rank: u32, parity: usize) -> usize {
        self.reduced(rank) + 8 + parity * 16
    }

    fn record_at(&self, rank: u32, parity: usize) -> usize {
        self.counter(rank) + 128 + parity * self.record
    }

    fn average(&self, parity: usize) -> usize {
        self.averages + parity * self.len * 4
    }

    /// The values of the average rank `rank` sums.
    pub fn part(&self, rank: u32) -> std::ops::Range<usize> {
        let (r, w) = (rank as usize, self.world.max(1) as usize);
        self.len * r / w..self.len * (r + 1) / w
    }

    fn slot(&self, parity: usize, shard: u32) -> usize {
        self.data + (parity * self.shards as usize + shard as usize) * self.len * 4
    }
}

/// A shared mapping, unmapped when the last holder lets go of it: the segment, or an average
/// handed to the optimizer.
struct Mapping {
    base: *mut u8,
    size: usize,
}

// Plain memory; which rank writes which bytes when is the protocol above.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.base.is_null() {
            sys::unmap(self.base, self.size);
        }
    }
}

/// A step's average in the segment, as the optimizer reads it. Valid until the same parity
/// comes round again two steps later, which no rank reaches before every rank has applied it.
pub struct SharedAverage {
    map: Arc<Mapping>,
    at: usize,
    len: usize,
}

impl std::ops::Deref for SharedAverage {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        assert!(self.at + self.len * 4 <= self.map.size && self.at.is_multiple_of(4));
        // SAFETY: in bounds and aligned (page-aligned mapping, offsets multiples of 4); every
        // rank finished writing it before the second barrier.
        unsafe { std::slice::from_raw_parts(self.map.base.add(self.at).cast(), self.len) }
    }
}

/// What a rank publishes in a step, and the others wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Barrier {
    /// Its shard gradients, in their slots.
    Gradients,
    /// Its part of the average.
    Part,
}

impl std::fmt::Display for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Barrier::Gradients => "shard gradients",
            Barrier::Part => "part of the average",
        })
    }
}

/// One rank's mapping of a segment.
pub struct Segment {
    map: Arc<Mapping>,
    layout: Layout,
    /// Rank 0 until it unlinks the file.
    path: Option<PathBuf>,
    /// The step counter this rank last published.
    published: u32,
}

/// What rank 0 tells the other ranks: the segment's path and the nonce written in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The file.
    pub path: PathBuf,
    /// The nonce in its header.
    pub nonce: [u8; 16],
}

impl Offer {
    /// The form sent over a link: `shm1 <path> <nonce, hex>`.
    pub fn to_text(&self) -> String {
        format!("shm1 {} {}", self.path.display(), hex::encode(self.nonce))
    }

    /// Parses [`Offer::to_text`]'s form; only paths directly under [`DIR`] are taken.
    pub fn parse(text: &str) -> Result<Self> {
        let parts: Vec<&str> = text.split(' ').collect();
        let ["shm1", path, nonce] = parts.as_slice() else {
            bail!("not a shared-memory offer");
        };
        let path = PathBuf::from(path);
        let name_ok = path.parent() == Some(Path::new(DIR))
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("lockstep-"));
        if !name_ok {
            bail!("a shared-memory path outside {DIR}");
        }
        let nonce = hex::decode(nonce)
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .context("a shared-memory nonce that is not 32 hex digits")?;
        Ok(Self { path, nonce })
    }
}

impl Segment {
    /// Rank 0: creates and maps a segment for `layout` in [`DIR`], its space reserved up front
    /// (a tmpfs that runs out later would kill the process with SIGBUS instead of an error).
    pub fn create(layout: Layout) -> Result<(Self, Offer)> {
        let nonce: [u8; 16] = rand::random();
        let path = PathBuf::from(DIR).join(format!(
            "lockstep-{}-{}",
            std::process::id(),
            hex::encode(&nonce[..8])
        ));
        let file = sys::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // From here on the file is removed again on any failure (the segment's drop).
        let mut segment = Self {
            map: Arc::new(Mapping {
                base: std::ptr::null_mut(),
                size: layout.size,
            }),
            layout,
            path: Some(path.clone()),
            published: 0,
        };
        sys::reserve(&file, layout.size)
            .with_context(|| format!("reserving {} MiB in {DIR}", layout.size.div_ceil(1 << 20)))?;
        segment.map = Arc::new(Mapping {
            base: sys::map(&file, layout.size)?,
            size: layout.size,
        });
        let header = segment.bytes_mut(0, HEADER);
        header[..8].copy_from_slice(MAGIC);
        header[8..24].copy_from_slice(&nonce);
        header[24..28].copy_from_slice(&layout.world.to_le_bytes());
        header[28..32].copy_from_slice(&layout.shards.to_le_bytes());
        header[32..40].copy_from_slice(&(layout.len as u64).to_le_bytes());
        Ok((segment, Offer { path, nonce }))
    }

    /// Another rank: maps the segment of `offer`, which must be the one rank 0 made for
    /// `layout` (its size, header and nonce).
    pub fn open(offer: &Offer, layout: Layout) -> Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(&offer.path)
            .with_context(|| format!("opening {}", offer.path.display()))?;
        let size = file.metadata()?.len();
        if size != layout.size as u64 {
            bail!(
                "{} has {size} bytes, {} expected",
                offer.path.display(),
                layout.size
            );
        }
        let segment = Self {
            map: Arc::new(Mapping {
                base: sys::map(&file, layout.size)?,
                size: layout.size,
            }),
            layout,
            path: None,
            published: 0,
        };
        let header = segment.bytes(0, HEADER);
        let mut expected = [0u8; 40];
        expected[..8].copy_from_slice(MAGIC);
        expected[8..24].copy_from_slice(&offer.nonce);
        expected[24..28].copy_from_slice(&layout.world.to_le_bytes());
        expected[28..32].copy_from_slice(&layout.shards.to_le_bytes());
        expected[32..40].copy_from_slice(&(layout.len as u64).to_le_bytes());
        if header[..40] != expected {
            bail!(
                "{} is not the segment rank 0 offered for this collective",
                offer.path.display()
            );
        }
        Ok(segment)
    }

    /// Rank 0: removes the file once every rank has mapped it (or given up); the mappings
    /// stay, and nothing is left behind in [`DIR`] when the processes end.
    pub fn unlink(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing {}: {e}", path.display());
            }
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        assert!(at + len <= self.layout.size, "inside the segment");
        // SAFETY: in bounds of the live mapping; the protocol keeps writers away.
        unsafe { std::slice::from_raw_parts(self.map.base.add(at), len) }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= self.layout.size, "inside the segment");
        // SAFETY: in bounds of the live mapping; the protocol gives these bytes to this rank
        // alone until it publishes them.
        unsafe { std::slice::from_raw_parts_mut(self.map.base.add(at), len) }
    }

    fn counter(&self, rank: u32) -> &AtomicU32 {
        self.word(self.layout.counter(rank))
    }

    fn reduced(&self, rank: u32) -> &AtomicU32 {
        self.word(self.layout.reduced(rank))
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        assert!(at + 4 <= self.layout.size);
        // SAFETY: aligned (block starts are multiples of 128 in a page-aligned mapping) and in
        // bounds; every access to the counters is atomic.
        unsafe { &*(self.map.base.add(at) as *const AtomicU32) }
    }

    /// The counter of the next step to publish: its parity names the slots to write.
    pub fn next_counter(&self) -> u32 {
        self.published.wrapping_add(1)
    }

    /// The slot of `shard` for the step counted `counter`, to write this rank's gradient into.
    pub fn slot_mut(&mut self, counter: u32, shard: u32) -> Result<&mut [u8]> {
        if shard >= self.layout.shards {
            bail!(
                "shard {shard}, but the shared memory holds {} shards per step",
                self.layout.shards
            );
        }
        let at = self.layout.slot(parity(counter), shard);
        Ok(self.bytes_mut(at, self.layout.len * 4))
    }

    /// The slot of `shard` for the step counted `counter`, as published.
    pub fn slot(&self, counter: u32, shard: u32) -> &[u8] {
        let at = self.layout.slot(parity(counter), shard);
        self.bytes(at, self.layout.len * 4)
    }

    /// Publishes this rank's step `counter` (written slots; `epoch`, `step` and the shard
    /// indices it holds in the record) and wakes the ranks waiting for it.
    pub fn publish(
        &mut self,
        rank: u32,
        counter: u32,
        epoch: u64,
        step: u64,
        shards: &[u32],
    ) -> Result<()> {
        if shards.len() > self.layout.shards as usize {
            bail!(
                "{} shards, but a step has {}",
                shards.len(),
                self.layout.shards
            );
        }
        let at = self.layout.record_at(rank, parity(counter));
        let record = self.bytes_mut(at, self.layout.record);
        record[..8].copy_from_slice(&epoch.to_le_bytes());
        record[8..16].copy_from_slice(&step.to_le_bytes());
        record[16..20].copy_from_slice(&(shards.len() as u32).to_le_bytes());
        for (i, s) in shards.iter().enumerate() {
            record[RECORD_FIXED + 4 * i..RECORD_FIXED + 4 * i + 4]
                .copy_from_slice(&s.to_le_bytes());
        }
        let word = self.counter(rank);
        word.store(counter, Ordering::Release);
        sys::wake(word);
        self.published = counter;
        Ok(())
    }

    /// Rank `rank`'s record of the step counted `counter`, once published: its epoch, step and
    /// the shards it holds.
    pub fn record(&self, rank: u32, counter: u32) -> (u64, u64, Vec<u32>) {
        let at = self.layout.record_at(rank, parity(counter));
        let record = self.bytes(at, self.layout.record);
        let u64_at = |i: usize| u64::from_le_bytes(record[i..i + 8].try_into().expect("8 bytes"));
        let k = u32::from_le_bytes(record[16..20].try_into().expect("4 bytes"))
            .min(self.layout.shards) as usize;
        let shards = record[RECORD_FIXED..RECORD_FIXED + 4 * k]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        (u64_at(0), u64_at(8), shards)
    }

    /// Waits until rank `rank` has published `what` of the step counted `counter` (or of a
    /// later one): `Ok(true)`, or `Ok(false)` at `deadline`. `check` runs between naps: it
    /// fails when the wait must end (the peer is gone, the coordinator interrupted).
    pub fn wait_for(
        &self,
        what: Barrier,
        rank: u32,
        counter: u32,
        deadline: Instant,
        check: impl FnMut() -> Result<()>,
    ) -> Result<bool> {
        let word = match what {
            Barrier::Gradients => self.counter(rank),
            Barrier::Part => self.reduced(rank),
        };
        wait_on(word, counter, deadline, check)
    }

    /// This rank's part of the average of the step counted `counter`, to sum into.
    #[allow(clippy::mut_from_ref)]
    pub fn part_mut(&self, rank: u32, counter: u32) -> &mut [f32] {
        let part = self.layout.part(rank);
        let at = self.layout.average(parity(counter)) + part.start * 4;
        let bytes = self.bytes_mut(at, part.len() * 4);
        // SAFETY: 4-aligned (see `SharedAverage`), and these values are this rank's alone
        // until it publishes them.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), part.len()) }
    }

    /// Publishes this rank's part of the average of the step counted `counter`, with what was
    /// wrong with it if anything (the shard and the value that are not finite).
    pub fn publish_part(&mut self, rank: u32, counter: u32, status: Option<(u32, u64)>) {
        let at = self.layout.status(rank, parity(counter));
        let record = self.bytes_mut(at, 16);
        let (flag, part, index) = status.map_or((0u32, 0u32, 0u64), |(p, i)| (1, p, i));
        record[..4].copy_from_slice(&flag.to_le_bytes());
        record[4..8].copy_from_slice(&part.to_le_bytes());
        record[8..16].copy_from_slice(&index.to_le_bytes());
        let word = self.reduced(rank);
        word.store(counter, Ordering::Release);
        sys::wake(word);
    }

    /// What rank `rank` found wrong with its part of the step counted `counter`, once
    /// published: the shard and the index of a value that is not finite.
    pub fn part_status(&self, rank: u32, counter: u32) -> Option<(u32, u64)> {
        let at = self.layout.status(rank, parity(counter));
        let record = self.bytes(at, 16);
        let flag = u32::from_le_bytes(record[..4].try_into().expect("4 bytes"));
        (flag != 0).then(|| {
            (
                u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")),
                u64::from_le_bytes(record[8..16].try_into().expect("8 bytes")),
            )
        })
    }

    /// The whole average of the step counted `counter`, once every part is published.
    pub fn average(&self, counter: u32) -> SharedAverage {
        SharedAverage {
            map: self.map.clone(),
            at: self.layout.average(parity(counter)),
            len: self.layout.len,
        }
    }
}

/// Waits until `word` reaches `counter` (or passes it: it wraps); see [`Segment::wait_for`].
fn wait_on(
    word: &AtomicU32,
    counter: u32,
    deadline: Instant,
    mut check: impl FnMut() -> Result<()>,
) -> Result<bool> {
    // Reached when the counter is at `counter` or past it (it wraps).
    let reached = |v: u32| v.wrapping_sub(counter) as i32 >= 0;
    let spin_until = Instant::now() + SPIN;
    loop {
        if reached(word.load(Ordering::Acquire)) {
            return Ok(true);
        }
        if Instant::now() >= spin_until {
            break;
        }
        for _ in 0..32 {
            std::hint::spin_loop();
        }
    }
    loop {
        let seen = word.load(Ordering::Acquire);
        if reached(seen) {
            return Ok(true);
        }
        check()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        sys::wait(word, seen, left.min(NAP));
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

fn parity(counter: u32) -> usize {
    (counter & 1) as usize
}

/// Whether a link's peer has gone (closed, reset, or sent something: nothing travels on the
/// links while the ranks share memory, so any byte is the peer closing, e.g. TLS's
/// close_notify). Does not block.
pub fn peer_gone(socket: &std::net::TcpStream) -> bool {
    sys::peer_gone(socket)
}

#[cfg(target_os = "linux")]
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use anyhow::Result;

    pub fn create(path: &Path) -> io::Result<File> {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    }

    pub fn reserve(file: &File, size: usize) -> io::Result<()> {
        // SAFETY: a valid descriptor; posix_fallocate returns the error instead of errno.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) } {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    pub fn map(file: &File, size: usize) -> Result<*mut u8> {
        // SAFETY: a fresh shared mapping of a file of at least `size` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .map_err(|e| anyhow::anyhow!("mapping shared memory: {e}"));
        }
        Ok(p.cast())
    }

    pub fn unmap(base: *mut u8, size: usize) {
        // SAFETY: the mapping made by `map` with this size, unmapped once.
        unsafe { libc::munmap(base.cast(), size) };
    }

    pub fn wake(word: &AtomicU32) {
        // SAFETY: futex on a valid, aligned word of a shared mapping (not FUTEX_PRIVATE: the
        // waiters are other processes).
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
        }
    }

    pub fn wait(word: &AtomicU32, seen: u32, at_most: Duration) {
        let timeout = libc::timespec {
            tv_sec: at_most.as_secs() as libc::time_t,
            tv_nsec: at_most.subsec_nanos() as libc::c_long,
        };
        // SAFETY: as in `wake`; returns at once when the word is no longer `seen`, on a wake,
        // a signal or the timeout, all of which the caller re-checks.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                seen,
                &timeout as *const libc::timespec,
            );
        }
    }

    pub fn peer_gone(socket: &std::net::TcpStream) -> bool {
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a local buffer on a valid socket.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            );
        }
        true
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::fs::File;
    use std::io;
    use std::path::Path;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use anyhow::{bail, Result};

    fn unsupported() -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "shared memory is used on Linux only",
        )
    }

    pub fn create(_: &Path) -> io::Result<File> {
        Err(unsupported())
    }

    pub fn reserve(_: &File, _: usize) -> io::Result<()> {
        Err(unsupported())
    }

    pub fn map(_: &File, _: usize) -> Result<*mut u8> {
        bail!(unsupported())
    }

    pub fn unmap(_: *mut u8, _: usize) {}

    pub fn wake(_: &AtomicU32) {}

    pub fn wait(_: &AtomicU32, _: u32, at_most: Duration) {
        std::thread::sleep(at_most);
    }

    pub fn peer_gone(_: &std::net::TcpStream) -> bool {
        false
    }
}
