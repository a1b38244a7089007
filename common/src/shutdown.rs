//! How a Lockstep process stops: one cancellation token that Ctrl-C, SIGTERM or the program
//! itself cancels (the first reason is kept), and the tasks spawned through it, which the
//! process waits for, within a bound, before it exits.
//!
//! Both binaries use it. The coordinator cancels once the job has ended and its workers have
//! their last message: its gRPC and HTTP servers stop accepting and finish what they are
//! sending. A worker cancels on a signal, wherever it is: joining, training or rejoining.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

pub use tokio_util::sync::CancellationToken;

/// A process's way to stop; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
    reason: Arc<OnceLock<String>>,
}

impl Shutdown {
    /// Nothing cancelled, no tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels on the first Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send), with
    /// the signal's name as the reason. Call it once, inside the runtime: from then on the
    /// process no longer dies of those signals, it stops through this token.
    pub fn cancel_on_signals(&self) {
        let me = self.clone();
        self.spawn_until_cancelled(async move {
            let signal = signalled().await;
            me.cancel(signal);
        });
    }

    /// Cancels, saying why; a later reason does not replace the first.
    pub fn cancel(&self, reason: impl Into<String>) {
        let _ = self.reason.set(reason.into());
        self.token.cancel();
    }

    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Waits for the cancellation and says why it came.
    pub async fn cancelled(&self) -> String {
        self.token.cancelled().await;
        self.reason().unwrap_or_else(|| "a shutdown".to_string())
    }

    /// Why it was cancelled; `None` before.
    pub fn reason(&self) -> Option<String> {
        self.reason.get().cloned()
    }

    /// The token itself, for APIs that take a future (`token().cancelled_owned()`).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Spawns `task`, which [`Shutdown::drain`] waits for.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Spawns `task` to run until it ends or the shutdown is cancelled, whichever is first.
    pub fn spawn_until_cancelled<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = token.cancelled() => {}
            }
        })
    }

    /// Cancels with `reason` (unless already cancelled) and waits up to `within` for the
    /// spawned tasks to end; `false` when some were still running then (a peer that never
    /// closes its connection must not hold the process).
    pub async fn drain(&self, reason: &str, within: Duration) -> bool {
        self.cancel(reason);
        self.tasks.close();
        tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok()
    }
}

/// Resolves on Ctrl-C or SIGTERM with the signal's name.
pub async fn signalled() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return "Ctrl-C",
                _ = term.recv() => return "SIGTERM",
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_reason_is_kept_and_waiters_hear_it() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.is_cancelled());
        assert_eq!(shutdown.reason(), None);
        let waiter = tokio::spawn({
            let s = shutdown.clone();
            async move { s.cancelled().await }
        });
        shutdown.cancel("SIGTERM");
        shutdown.clone().cancel("finished");
        assert!(shutdown.is_cancelled());
        assert_eq!(waiter.await.unwrap(), "SIGTERM");
        assert_eq!(shutdown.cancelled().await, "SIGTERM");
    }

    #[tokio::test]
    async fn drain_waits_for_tasks_that_stop_on_cancellation() {
        let shutdown = Shutdown::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = shutdown.token();
        shutdown.spawn(async move {
            token.cancelled().await;
            // Work done after the cancellation, before the task ends: drain waits for it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send("flushed");
        });
        let forever = shutdown.spawn_until_cancelled(std::future::pending());
        assert!(shutdown.drain("finished", Duration::from_secs(5)).await);
        assert_eq!(rx.await.unwrap(), "flushed");
        assert!(forever.is_finished());
        assert_eq!(shutdown.reason().as_deref(), Some("finished"));
    }

    #[tokio::test]
    async fn drain_gives_up_on_a_task_that_never_ends() {
        let shutdown = Shutdown::new();
        let stuck = shutdown.spawn(std::future::pending::<()>());
        let started = std::time::Instant::now();
        assert!(!shutdown.drain("finished", Duration::from_millis(50)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!stuck.is_finished());
        stuck.abort();
    }

    #[tokio::test]
    async fn a_task_that_ends_first_does_not_cancel() {
        let shutdown = Shutdown::new();
        shutdown
            .spawn_until_cancelled(async {})
            .await
            .expect("the task ran");
        assert!(!shutdown.is_cancelled());
    }
}
