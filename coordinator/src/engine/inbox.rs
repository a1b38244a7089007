//! The engine's one way of waiting: the next event from the service, a tick every
//! [`LIVENESS_CHECK`] so the caller can look for silent workers even when nothing arrives, or
//! the caller's deadline. Every wait in the engine goes through [`Inbox::next`].

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::JobError;
use crate::membership::MemberId;
use crate::service::Event;

/// How often a waiting engine looks for silent workers.
pub const LIVENESS_CHECK: Duration = Duration::from_millis(200);

/// What a wait produced.
#[derive(Debug)]
pub enum Next {
    /// An event to handle.
    Event(Event),
    /// Time to check liveness; nothing arrived.
    Tick,
    /// The deadline passed.
    Deadline,
}

/// The service → engine event queue.
pub struct Inbox {
    events: mpsc::UnboundedReceiver<Event>,
    /// Events read ahead by [`Inbox::take_left`], handed out first, in order.
    pending: VecDeque<Event>,
    next_tick: Instant,
}

impl Inbox {
    /// Wraps the receiving end of the service's events.
    pub fn new(events: mpsc::UnboundedReceiver<Event>) -> Self {
        Self {
            events,
            pending: VecDeque::new(),
            next_tick: Instant::now() + LIVENESS_CHECK,
        }
    }

    /// Waits for the next event, the next liveness tick, or `deadline`, whichever comes first.
    /// Ticks come on time even while events keep arriving, so a stream of messages from some
    /// workers never hides the silence of another.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Result<Next, JobError> {
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            return Ok(Next::Deadline);
        }
        if self.next_tick <= now {
            self.next_tick = now + LIVENESS_CHECK;
            return Ok(Next::Tick);
        }
        if let Some(event) = self.pending.pop_front() {
            return Ok(Next::Event(event));
        }
        let wake = match deadline {
            Some(d) if d < self.next_tick => d,
            _ => self.next_tick,
        };
        match tokio::time::timeout_at(wake, self.events.recv()).await {
            Ok(Some(event)) => Ok(Next::Event(event)),
            Ok(None) => Err(JobError::Other(anyhow::anyhow!(
                "the coordinator's event queue closed"
            ))),
            Err(_) if deadline.is_some_and(|d| d <= Instant::now()) => Ok(Next::Deadline),
            Err(_) => {
                self.next_tick = Instant::now() + LIVENESS_CHECK;
                Ok(Next::Tick)
            }
        }
    }
}

impl Inbox {
    /// The reason of a `Leave` from `member` that has arrived but not been handled yet, taken
    /// out of the queue. A worker that leaves on purpose says why and then closes its stream;
    /// the engine may notice the closed stream first (a send fails), and should still give
    /// the worker's own reason.
    pub fn take_left(&mut self, member: MemberId) -> Option<String> {
        while let Ok(event) = self.events.try_recv() {
            self.pending.push_back(event);
        }
        let at = self
            .pending
            .iter()
            .position(|e| matches!(e, Event::Left { member: m, .. } if *m == member))?;
        match self.pending.remove(at) {
            Some(Event::Left { reason, .. }) => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_come_even_while_events_keep_arriving_and_deadlines_end_the_wait() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inbox = Inbox::new(rx);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut ticks = 0;
        let mut events = 0;
        loop {
            tx.send(Event::Interrupted("test")).unwrap();
            match inbox.next(Some(deadline)).await.unwrap() {
                Next::Event(_) => {
                    events += 1;
                    tokio::time::advance(Duration::from_millis(50)).await;
                }
                Next::Tick => ticks += 1,
                Next::Deadline => break,
            }
        }
        assert!(events >= 15, "{events} events");
        assert!(ticks >= 4, "only {ticks} ticks in 1 s of steady events");
    }

    #[tokio::test]
    async fn a_queued_leave_is_taken_out_and_the_other_events_keep_their_order() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inbox = Inbox::new(rx);
        tx.send(Event::Interrupted("first")).unwrap();
        tx.send(Event::Left {
            member: 7,
            reason: "a signal".into(),
        })
        .unwrap();
        tx.send(Event::Interrupted("last")).unwrap();
        assert_eq!(inbox.take_left(8), None);
        assert_eq!(inbox.take_left(7).as_deref(), Some("a signal"));
        assert_eq!(inbox.take_left(7), None);
        for expected in ["first", "last"] {
            match inbox.next(None).await.unwrap() {
                Next::Event(Event::Interrupted(s)) => assert_eq!(s, expected),
                other => panic!("{other:?}"),
            }
        }
    }
}
