//! [`Replies`]: the reply correlator every request/response protocol over one socket needs.
//!
//! An executor sends a request on the broker's socket and waits for the answer; the socket's
//! reader task receives answers for many executions at once. `Replies` pairs them by
//! `(dispatch id, attempt)`, the key that is unique per execution: a late answer to an earlier
//! attempt never reaches a later one.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::fsm::{Attempt, DispatchId};

/// Pairs answers arriving on a broker's socket with the executions waiting for them.
///
/// One per connection (keep it beside the socket's writer in the handle given to
/// [`Hub::connect`](super::Hub::connect)). The executor calls [`expect`](Self::expect)
/// *before* it sends the request, then awaits the [`Reply`]; the socket's reader calls
/// [`deliver`](Self::deliver) with each answer; when the socket closes, call
/// [`close`](Self::close) so every waiter hears [`ReplyError::Closed`] instead of waiting for
/// its timeout. A dropped [`Reply`] (the execution timed out or was stopped) removes its entry,
/// so the map never holds more than the executions in flight.
///
/// ```
/// use broker_dispatch::fsm::DispatchId;
/// use broker_dispatch::hub::{Replies, ReplyError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let replies = Replies::<String>::new();
/// let id = DispatchId::new();
/// let reply = replies.expect(id, 1).unwrap(); // before sending the request
/// // ... the socket's reader task, on an answer for (id, 1):
/// assert!(replies.deliver(id, 1, "done".to_owned()));
/// assert_eq!(reply.await, Ok("done".to_owned()));
/// // An answer nobody waits for (late, duplicate, unknown) is refused, not stored.
/// assert!(!replies.deliver(id, 1, "again".to_owned()));
/// # }
/// ```
pub struct Replies<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    waiting: Mutex<Waiting<T>>,
}

struct Waiting<T> {
    senders: HashMap<(DispatchId, Attempt), oneshot::Sender<T>>,
    closed: bool,
}

impl<T> Clone for Replies<T> {
    fn clone(&self) -> Self {
        Replies {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> Default for Replies<T> {
    fn default() -> Self {
        Replies {
            inner: Arc::new(Inner {
                waiting: Mutex::new(Waiting {
                    senders: HashMap::new(),
                    closed: false,
                }),
            }),
        }
    }
}

impl<T> fmt::Debug for Replies<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.inner.waiting.lock();
        f.debug_struct("Replies")
            .field("waiting", &w.senders.len())
            .field("closed", &w.closed)
            .finish()
    }
}

/// Why a [`Reply`] has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// The connection closed ([`Replies::close`]) before the answer came.
    #[error("the connection closed before the reply came")]
    Closed,
    /// Another waiter already expects an answer for this `(id, attempt)`.
    #[error("a reply for this dispatch attempt is already expected")]
    AlreadyExpected,
}

impl<T> Replies<T> {
    /// An empty correlator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Expects one answer for `(id, attempt)`. Call it before sending the request, so an
    /// answer that comes back at once is not missed.
    ///
    /// # Errors
    ///
    /// [`ReplyError::Closed`] once [`close`](Self::close) was called;
    /// [`ReplyError::AlreadyExpected`] while another [`Reply`] for the same key is alive.
    pub fn expect(&self, id: DispatchId, attempt: Attempt) -> Result<Reply<T>, ReplyError> {
        let mut w = self.inner.waiting.lock();
        if w.closed {
            return Err(ReplyError::Closed);
        }
        let key = (id, attempt);
        if w.senders.get(&key).is_some_and(|tx| !tx.is_closed()) {
            return Err(ReplyError::AlreadyExpected);
        }
        let (tx, rx) = oneshot::channel();
        w.senders.insert(key, tx);
        Ok(Reply {
            rx,
            key,
            owner: Arc::downgrade(&self.inner),
        })
    }

    /// Hands `value` to whoever expects `(id, attempt)`. Returns `false`, dropping the value,
    /// when nobody does (an answer after its waiter gave up, a duplicate, an unknown key).
    pub fn deliver(&self, id: DispatchId, attempt: Attempt, value: T) -> bool {
        let tx = self.inner.waiting.lock().senders.remove(&(id, attempt));
        match tx {
            Some(tx) => tx.send(value).is_ok(),
            None => false,
        }
    }

    /// The connection closed: every current waiter gets [`ReplyError::Closed`], and so does
    /// every later [`expect`](Self::expect).
    pub fn close(&self) {
        let mut w = self.inner.waiting.lock();
        w.closed = true;
        // Dropping the senders wakes their receivers with an error.
        w.senders.clear();
    }

    /// How many answers are expected now.
    pub fn len(&self) -> usize {
        self.inner.waiting.lock().senders.len()
    }

    /// Whether no answer is expected now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One expected answer: a future that resolves to it. Dropping it withdraws the expectation.
///
/// # Cancel safety
///
/// Dropping it removes its entry from the [`Replies`]; an answer delivered afterwards is
/// refused.
pub struct Reply<T> {
    rx: oneshot::Receiver<T>,
    key: (DispatchId, Attempt),
    owner: std::sync::Weak<Inner<T>>,
}

impl<T> fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply").field("key", &self.key).finish()
    }
}

impl<T> Future for Reply<T> {
    type Output = Result<T, ReplyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| ReplyError::Closed))
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        // Closed first, so the entry's sender sees it (the field itself drops after this).
        self.rx.close();
        let Some(owner) = self.owner.upgrade() else {
            return;
        };
        let mut w = owner.waiting.lock();
        // Only this reply's own entry: a later `expect` of the same key may have replaced it
        // after this one's sender was used or dropped.
        if w.senders.get(&self.key).is_some_and(|tx| tx.is_closed()) {
            w.senders.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> DispatchId {
        DispatchId::new()
    }

    #[tokio::test]
    async fn answers_reach_only_their_own_attempt() {
        let r = Replies::new();
        let d = id();
        let first = r.expect(d, 1).unwrap();
        let second = r.expect(d, 2).unwrap();
        assert!(r.deliver(d, 2, "two"));
        assert!(r.deliver(d, 1, "one"));
        assert_eq!(second.await, Ok("two"));
        assert_eq!(first.await, Ok("one"));
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_reply_withdraws_and_a_late_answer_is_refused() {
        let r = Replies::new();
        let d = id();
        drop(r.expect(d, 1).unwrap());
        assert!(r.is_empty());
        assert!(!r.deliver(d, 1, 5));
        // The key can be expected again.
        let again = r.expect(d, 1).unwrap();
        assert!(r.deliver(d, 1, 6));
        assert_eq!(again.await, Ok(6));
    }

    #[tokio::test]
    async fn a_live_expectation_is_not_replaced() {
        let r = Replies::<u8>::new();
        let d = id();
        let _first = r.expect(d, 1).unwrap();
        assert_eq!(r.expect(d, 1).unwrap_err(), ReplyError::AlreadyExpected);
    }

    #[tokio::test]
    async fn close_fails_every_waiter_and_every_later_expectation() {
        let r = Replies::<u8>::new();
        let a = r.expect(id(), 1).unwrap();
        let b = r.expect(id(), 1).unwrap();
        r.close();
        assert_eq!(a.await, Err(ReplyError::Closed));
        assert_eq!(b.await, Err(ReplyError::Closed));
        assert_eq!(r.expect(id(), 1).unwrap_err(), ReplyError::Closed);
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn a_stale_drop_leaves_a_newer_expectation_alone() {
        let r = Replies::new();
        let d = id();
        let old = r.expect(d, 1).unwrap();
        assert!(r.deliver(d, 1, 1));
        // The old reply's sender is used; a new expectation of the same key takes the slot.
        let new = r.expect(d, 1).unwrap();
        drop(old);
        assert_eq!(
            r.len(),
            1,
            "the newer expectation survived the older one's drop"
        );
        assert!(r.deliver(d, 1, 2));
        assert_eq!(new.await, Ok(2));
    }
}
