//! Shared pieces of Lockstep, used by both the coordinator and the workers: the wire protocol
//! (generated in [`wire`], in the project's own checked types in [`protocol`]) and its
//! authentication, the layered job configuration, MNIST loading, the models, the
//! optimizers with explicit state, the flat tensor codecs and the checkpoint format.
//!
//! Everything that must be *identical* on every replica lives here, so that the coordinator
//! and each worker compute bit-for-bit the same optimizer step from the same gradient.

pub mod address;
pub mod auth;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod logging;
pub mod memory;
pub mod mnist;
pub mod model;
pub mod optim;
pub mod protocol;
pub mod reduce;
pub mod schedule;
pub mod shutdown;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod wire;

/// Keeps freed memory inside the process. Every training step allocates and frees buffers of
/// hundreds of kilobytes (inputs, activations, gradients); with glibc's defaults each one is a
/// fresh `mmap` whose pages fault in again on first touch, which costs more than the matmuls.
/// Call once at the start of `main`, before threads start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator thresholds; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Fixes the thread count of candle's CPU kernels for the life of the process. candle asks for
/// it on every CPU matrix product, and unless `RAYON_NUM_THREADS` is set it works it out afresh
/// each time by reading `/proc/cpuinfo` (20,320 reads, 8% of the time, in one evaluation of the
/// `cnn` preset). This works it out once, the same way (the physical cores), and sets the
/// variable, which rayon's global pool then also takes for its size; an explicit setting is
/// left alone. Call once at the start of `main`, before threads start.
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    }
}

/// Version of the wire protocol in `proto/lockstep.proto`; a worker of another version is
/// refused at `Join` with a message naming both.
///
/// 4: `Heartbeat.sent_unix_ms`, which nothing read, is gone.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest gRPC message either side accepts or sends. Gradients of the largest preset (`cnn`,
/// 1.2M parameters) are about 5 MB; state transfers are chunked well below this.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Size of one chunk of a streamed training state.
pub const STATE_CHUNK_BYTES: usize = 1024 * 1024;

/// Largest training state (parameters + optimizer state) accepted over `FetchState`/`PushState`.
pub const MAX_STATE_BYTES: u64 = 1 << 30;
