//! Support for the property tests of every decoder of untrusted bytes (IDX files, checkpoints,
//! state chunks, gradient buffers, tcp frames, configuration files, protocol messages): the one
//! proptest configuration they share, and an allocator probe that lets a test hold "a hostile
//! length is refused before anything that large is allocated", which no panic check can see.
//!
//! Built for this crate's own tests, and for other crates' tests through the `testing` feature,
//! which only dev-dependencies enable (`cargo build` leaves it out).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::test_runner::{Config, RngSeed};

/// The seed of every property test: CI runs the same cases every time, and a failure seen once
/// is seen again.
pub const SEED: u64 = 0x10c5_7e9f_0000_2026;

/// The proptest configuration of a property test of `cases` cases: a fixed seed, and no
/// regression files written into the source tree (a case that found a bug is kept as a named
/// regression test instead).
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(SEED),
        failure_persistence: None,
        ..Config::default()
    }
}

thread_local! {
    /// Largest single allocation (or reallocation target) this thread asked for while probed.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Bytes this thread asked for in all while probed.
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting what each thread asks for. A test binary that installs it
/// (`#[global_allocator] static A: Probe = Probe;`) can measure a call with [`allocations`].
pub struct Probe;

fn record(size: usize) {
    // `try_with`: allocations while a thread's locals are torn down are simply not counted.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = TOTAL.try_with(|t| t.set(t.get().saturating_add(size)));
}

// SAFETY: every call is passed unchanged to the system allocator; the counters are
// thread-local `Cell`s with constant initialisers, which neither allocate nor lock.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// What one call allocated on its thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocated {
    /// The largest single allocation, in bytes.
    pub largest: usize,
    /// All allocations together, in bytes (growth by reallocation counts each new size).
    pub total: usize,
}

/// Runs `f` and returns its result with what it allocated on this thread. Meaningful only in a
/// test binary whose global allocator is [`Probe`]; elsewhere it reports nothing allocated.
pub fn allocations<T>(f: impl FnOnce() -> T) -> (T, Allocated) {
    LARGEST.with(|l| l.set(0));
    TOTAL.with(|t| t.set(0));
    let out = f();
    let allocated = Allocated {
        largest: LARGEST.with(Cell::get),
        total: TOTAL.with(Cell::get),
    };
    (out, allocated)
}

#[cfg(test)]
#[global_allocator]
static PROBE: Probe = Probe;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_sees_a_large_allocation_and_only_on_its_own_thread() {
        let (v, seen) = allocations(|| vec![1u8; 3 << 20]);
        assert!(seen.largest >= 3 << 20, "{seen:?}");
        assert!(seen.total >= seen.largest, "{seen:?}");
        drop(v);
        let (_, seen) = allocations(|| {
            std::thread::spawn(|| vec![1u8; 3 << 20])
                .join()
                .map(|v| v.len())
        });
        assert!(
            seen.largest < 1 << 20,
            "another thread's allocation: {seen:?}"
        );
    }
}
