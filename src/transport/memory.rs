//! [`MemoryTransport`]: fan-out between hubs in one process.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use futures::Stream;

use super::{Notice, Subscription, Transport};
use crate::error::TransportError;
use crate::sync::{Arc, Mutex};

/// In-process fan-out: every subscriber receives every notice published after it subscribed.
///
/// Each subscription has a bounded mailbox with permit semantics: a notice pushed before the
/// subscriber polls is kept, and the wake-up is never lost (model-checked with loom). A mailbox that
/// overflows is emptied and yields one [`Notice::Resync`], so a slow subscriber costs bounded memory
/// and loses no work. Clone it to share one bus between hubs.
#[derive(Debug, Clone)]
pub struct MemoryTransport {
    bus: Arc<Mutex<Bus>>,
}

#[derive(Debug)]
struct Bus {
    mailboxes: Vec<Arc<Mailbox>>,
    capacity: usize,
    closed: bool,
}

#[derive(Debug)]
struct Mailbox {
    state: Mutex<MailboxState>,
}

#[derive(Debug, Default)]
struct MailboxState {
    queue: VecDeque<Notice>,
    overflowed: bool,
    closed: bool,
    dropped: bool,
    waker: Option<Waker>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// Notices a subscriber may have queued before it is told to resync instead.
    pub const DEFAULT_CAPACITY: usize = 65_536;

    /// A bus with the default mailbox capacity.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A bus whose mailboxes hold at most `capacity` notices (at least 1) before overflowing
    /// into a [`Notice::Resync`].
    pub fn with_capacity(capacity: usize) -> Self {
        MemoryTransport {
            bus: Arc::new(Mutex::new(Bus {
                mailboxes: Vec::new(),
                capacity: capacity.max(1),
                closed: false,
            })),
        }
    }

    /// Ends every subscription (their streams return `None`) and refuses new ones.
    pub fn close(&self) {
        let mut bus = self.bus.lock();
        bus.closed = true;
        for m in bus.mailboxes.drain(..) {
            m.close();
        }
    }

    /// Forces every subscriber to resync, as if notices were lost (for tests of the fallback).
    pub fn inject_resync(&self) {
        let bus = self.bus.lock();
        for m in &bus.mailboxes {
            m.overflow();
        }
    }

    pub(crate) fn deliver(&self, notice: &Notice) -> Result<(), TransportError> {
        let mut bus = self.bus.lock();
        if bus.closed {
            return Err(TransportError::Closed);
        }
        let capacity = bus.capacity;
        bus.mailboxes.retain(|m| m.push(notice, capacity));
        Ok(())
    }
}

impl Mailbox {
    /// Queues a notice and wakes the subscriber. Returns `false` if the subscription is gone.
    fn push(&self, notice: &Notice, capacity: usize) -> bool {
        let waker = {
            let mut st = self.state.lock();
            if st.dropped {
                return false;
            }
            if st.queue.len() >= capacity {
                st.queue.clear();
                st.overflowed = true;
            } else if !st.overflowed {
                st.queue.push_back(notice.clone());
            }
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    fn overflow(&self) {
        let waker = {
            let mut st = self.state.lock();
            st.queue.clear();
            st.overflowed = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn close(&self) {
        let waker = {
            let mut st = self.state.lock();
            st.closed = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Notice>> {
        let mut st = self.state.lock();
        if st.overflowed {
            st.overflowed = false;
            return Poll::Ready(Some(Notice::Resync));
        }
        if let Some(n) = st.queue.pop_front() {
            return Poll::Ready(Some(n));
        }
        if st.closed {
            return Poll::Ready(None);
        }
        // Registered under the same lock `push` takes, so a push either happened before this
        // poll (and was seen above) or will find this waker: no lost wake-up.
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

struct MailboxStream {
    mailbox: Arc<Mailbox>,
}

impl Stream for MailboxStream {
    type Item = Notice;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notice>> {
        self.mailbox.poll_recv(cx)
    }
}

impl Drop for MailboxStream {
    fn drop(&mut self) {
        let mut st = self.mailbox.state.lock();
        st.dropped = true;
        st.queue.clear();
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        let mailbox = Arc::new(Mailbox {
            state: Mutex::new(MailboxState::default()),
        });
        {
            let mut bus = self.bus.lock();
            if bus.closed {
                return Err(TransportError::Closed);
            }
            bus.mailboxes.push(Arc::clone(&mailbox));
        }
        Ok(Subscription::new(MailboxStream { mailbox }))
    }

    async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
        self.deliver(&notice)
    }
}
