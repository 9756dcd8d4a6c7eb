//! [`NatsTransport`]: wake-ups over core NATS publish/subscribe.
//!
//! Each transport instance holds one NATS client and one subscription, to the wildcard
//! `{prefix}.*`, which covers the two subjects notices travel on: `{prefix}.signal` (payload: a
//! broker id; an empty payload is a [`Notice::Resync`]) and `{prefix}.event` (payload: a
//! dispatch id). What the subscription hears is fanned out to every [`Subscription`] of the
//! instance through a bounded mailbox per subscription (as [`MemoryTransport`]'s): a subscriber
//! that falls behind gets one [`Notice::Resync`] instead of an ever longer queue. The client's
//! own buffer for the subscription is bounded too (`NatsTransportOptions::buffer`); when the
//! server reports it overflowed (a slow consumer), every subscriber is told to resync.
//!
//! A subscription is live once the server has processed it. `async-nats`' `flush` only empties
//! the client's write buffer, so the transport proves liveness with a probe instead: it
//! publishes a random token on `{prefix}.probe` and waits until its own subscription hears it
//! back (the server handles one connection's operations in order). Other nodes ignore probes.
//!
//! The client reconnects by itself, with capped, jittered exponential backoff, and re-subscribes;
//! once a probe confirms the re-subscription, every subscriber gets [`Notice::Resync`]: notices
//! sent while the connection was down are lost.
//!
//! Why core NATS and not JetStream: notices are hints and the store is the truth. A lost notice
//! costs latency, never work, because every reconnect and every overflow ends in a resync (the
//! hub re-drains its brokers and re-reads what it waits on) and hubs poll as a fallback. A
//! persistent, acknowledged stream would add a server-side stream to provision, consumers to
//! clean up and a second copy of state that can disagree with the store, to guarantee delivery
//! of messages whose loss is already harmless.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{MemoryTransport, Notice, Subscription, Transport};
use crate::error::TransportError;
use crate::fsm::{BrokerId, DispatchId};

/// The longest subject prefix accepted, in bytes.
const MAX_PREFIX_LEN: usize = 128;

/// Checks a subject prefix: dot-separated tokens of `[A-Za-z0-9_-]`, so no prefix can contain a
/// wildcard or reach into another prefix's subjects.
pub(crate) fn check_subject_prefix(prefix: &str) -> Result<(), TransportError> {
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if prefix.len() > MAX_PREFIX_LEN || !prefix.split('.').all(token_ok) {
        return Err(TransportError::Payload(format!(
            "subject prefix must be dot-separated tokens of [A-Za-z0-9_-] and at most \
             {MAX_PREFIX_LEN} bytes, got {prefix:?}"
        )));
    }
    Ok(())
}

/// How a [`NatsTransport`] connects and buffers.
#[derive(Debug, Clone)]
pub struct NatsTransportOptions {
    /// The subjects are `{prefix}.signal` and `{prefix}.event`. Every node of one cluster must
    /// use the same prefix; clusters sharing a NATS server must not.
    pub subject_prefix: String,
    /// How long connecting may take (TCP, TLS and the NATS handshake together), and how long a
    /// publish may wait for room in the client's outgoing queue.
    pub connect_timeout: Duration,
    /// The first reconnect delay; it doubles after each failed attempt.
    pub min_backoff: Duration,
    /// The largest reconnect delay.
    pub max_backoff: Duration,
    /// How many messages the client buffers for the subscription before the server drops them
    /// (and every subscriber is told to resync).
    pub buffer: usize,
}

impl Default for NatsTransportOptions {
    fn default() -> Self {
        NatsTransportOptions {
            subject_prefix: "broker_dispatch".to_owned(),
            connect_timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            buffer: 65_536,
        }
    }
}

/// Core NATS transport (`nats` feature). Clone it to share one client and subscription.
///
/// Build one per hub with [`NatsTransport::connect`], or [`NatsTransport::connect_with`] to pass
/// credentials, TLS and other settings through `async-nats`' own
/// [`ConnectOptions`](async_nats::ConnectOptions). Both return once the subscription is live
/// on the server. Dropping the last clone closes the client and ends every subscription.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    bus: MemoryTransport,
    signal: String,
    event: String,
    connect_timeout: Duration,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
        self.bus.close();
    }
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsTransport")
            .field("signal", &self.inner.signal)
            .field("event", &self.inner.event)
            .field("state", &self.inner.client.connection_state())
            .finish_non_exhaustive()
    }
}

/// What the connection reports to the listener task.
#[derive(Debug)]
enum Change {
    /// The client (re)connected; the first one is the initial connection.
    Connected,
    /// The client's buffer for a subscription overflowed: messages were dropped.
    Dropped,
}

impl NatsTransport {
    /// Connects to the server(s) at `url` (`nats://host:4222`; several, comma-separated, for
    /// a NATS cluster) with default client settings. Returns once the subscription is live.
    ///
    /// # Errors
    ///
    /// As [`connect_with`](Self::connect_with).
    pub async fn connect(url: &str, options: NatsTransportOptions) -> Result<Self, TransportError> {
        Self::connect_with(url, async_nats::ConnectOptions::new(), options).await
    }

    /// Connects with the caller's client settings (credentials, TLS, name, ping interval, …).
    /// The transport installs its own event callback, reconnect delay, connection timeout and
    /// subscription capacity (from `options`), replacing any set on `client`.
    ///
    /// # Errors
    ///
    /// [`TransportError::Payload`] for a bad subject prefix; [`TransportError::Unavailable`]
    /// if the server cannot be reached, or does not complete the handshake, within
    /// `options.connect_timeout`; [`TransportError::Backend`] for a malformed URL, refused
    /// credentials or a TLS failure.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no client behind.
    pub async fn connect_with(
        url: &str,
        client: async_nats::ConnectOptions,
        options: NatsTransportOptions,
    ) -> Result<Self, TransportError> {
        check_subject_prefix(&options.subject_prefix)?;
        let addrs = url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Backend(Box::new(e)))?;
        let min = options.min_backoff.max(Duration::from_millis(1));
        let max = options.max_backoff.max(min);
        let (changes_tx, changes) = mpsc::channel::<Change>(16);
        let client = client
            .connection_timeout(options.connect_timeout)
            .subscription_capacity(options.buffer.max(1))
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, min, max))
            .event_callback(move |event| {
                let changes = changes_tx.clone();
                async move {
                    let change = match event {
                        async_nats::Event::Connected => Change::Connected,
                        async_nats::Event::SlowConsumer(_) => Change::Dropped,
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS connection lost; reconnecting");
                            return;
                        }
                        other => {
                            tracing::debug!(event = %other, "NATS client event");
                            return;
                        }
                    };
                    // A full queue already holds a change that ends in a resync.
                    let _ = changes.try_send(change);
                }
            });
        let timeout = options.connect_timeout;
        let client = match tokio::time::timeout(timeout, client.connect(addrs)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(connect_error(e)),
            Err(_) => {
                return Err(TransportError::Unavailable(
                    format!("no NATS handshake with {url} within {timeout:?}").into(),
                ))
            }
        };
        let prefix = &options.subject_prefix;
        let wildcard = format!("{prefix}.*");
        let probe = format!("{prefix}.probe");
        let live = async {
            let mut sub = client
                .subscribe(wildcard)
                .await
                .map_err(|e| TransportError::Unavailable(Box::new(e)))?;
            let token = new_token();
            send_probe(&client, &probe, &token).await?;
            // Whatever arrives before the probe precedes every subscriber: nobody misses it.
            while let Some(m) = sub.next().await {
                if m.subject.as_str() == probe && *m.payload == *token.as_bytes() {
                    return Ok(sub);
                }
            }
            Err(TransportError::Closed)
        };
        let sub = match tokio::time::timeout(timeout, live).await {
            Ok(sub) => sub?,
            Err(_) => {
                return Err(TransportError::Unavailable(
                    format!("the NATS server did not confirm the subscription within {timeout:?}")
                        .into(),
                ))
            }
        };
        let bus = MemoryTransport::new();
        let signal = format!("{prefix}.signal");
        let event = format!("{prefix}.event");
        let task = tokio::spawn(listen(Listener {
            client: client.clone(),
            sub,
            changes,
            bus: bus.clone(),
            signal: signal.clone(),
            event: event.clone(),
            probe,
            probe_timeout: timeout,
        }));
        Ok(NatsTransport {
            inner: Arc::new(Inner {
                client,
                bus,
                signal,
                event,
                connect_timeout: timeout,
                task,
            }),
        })
    }

    /// The underlying client: for monitoring (`connection_state`, `statistics`), and for tests
    /// that force a reconnect.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }
}

/// A token no other probe uses.
fn new_token() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

async fn send_probe(
    client: &async_nats::Client,
    probe: &str,
    token: &str,
) -> Result<(), TransportError> {
    client
        .publish(probe.to_owned(), token.to_owned().into_bytes().into())
        .await
        .map_err(|e| TransportError::Unavailable(Box::new(e)))?;
    client
        .flush()
        .await
        .map_err(|e| TransportError::Unavailable(Box::new(e)))
}

fn connect_error(e: async_nats::ConnectError) -> TransportError {
    use async_nats::ConnectErrorKind as K;
    match e.kind() {
        K::Dns | K::TimedOut | K::Io | K::MaxReconnects => TransportError::Unavailable(Box::new(e)),
        K::ServerParse | K::Authentication | K::AuthorizationViolation | K::Tls => {
            TransportError::Backend(Box::new(e))
        }
    }
}

/// The delay before reconnect attempt `attempts` (1-based): nothing for the first, then `min`
/// doubling up to `max`, each jittered to between half and all of the step, so replicas that
/// lost the server together do not reconnect in lockstep.
fn reconnect_delay(attempts: usize, min: Duration, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(20);
    jittered(min.saturating_mul(1 << doublings).min(max))
}

/// Somewhere between half and all of `d`.
fn jittered(d: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let half = d / 2;
    let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(random % span.saturating_add(1))
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    /// Subscribes. The NATS subscription is live from construction on, so every notice
    /// published after this returns is delivered, or followed by a [`Notice::Resync`] once the
    /// client has reconnected.
    ///
    /// # Errors
    ///
    /// [`TransportError::Closed`] if the transport is shutting down.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        self.inner.bus.subscribe().await
    }

    /// Publishes the id on its subject. [`Notice::Resync`] travels as an empty signal.
    ///
    /// # Errors
    ///
    /// [`TransportError::Unavailable`] if the client's outgoing queue stays full for the
    /// connect timeout (the server is unreachable and the queue filled up).
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have sent the notice.
    async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
        let (subject, payload) = match &notice {
            Notice::Signal { broker } => (&self.inner.signal, broker.as_str().to_owned()),
            Notice::Event { id } => (&self.inner.event, id.to_string()),
            Notice::Resync => (&self.inner.signal, String::new()),
        };
        let send = self
            .inner
            .client
            .publish(subject.clone(), payload.into_bytes().into());
        match tokio::time::timeout(self.inner.connect_timeout, send).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TransportError::Unavailable(Box::new(e))),
            Err(_) => Err(TransportError::Unavailable(
                "the NATS client's outgoing queue stayed full".into(),
            )),
        }
    }
}

/// The listener task's inputs and outputs.
struct Listener {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    changes: mpsc::Receiver<Change>,
    bus: MemoryTransport,
    signal: String,
    event: String,
    probe: String,
    probe_timeout: Duration,
}

async fn listen(mut l: Listener) {
    // The initial connection's event may arrive after the constructor returned: it is not a
    // reconnect.
    let mut initial_seen = false;
    // The probe sent after a reconnect, and when to stop waiting for it.
    let mut pending: Option<(String, tokio::time::Instant)> = None;
    loop {
        let probe_deadline = pending.as_ref().map(|(_, at)| *at);
        tokio::select! {
            message = l.sub.next() => {
                let Some(message) = message else {
                    // The client gave up for good (closed, or out of reconnect attempts): end
                    // every subscription, so the hub notices instead of waiting in silence.
                    tracing::error!("the NATS subscription ended; closing the transport");
                    l.bus.close();
                    return;
                };
                if message.subject.as_str() == l.probe {
                    let ours = pending
                        .as_ref()
                        .is_some_and(|(token, _)| *message.payload == *token.as_bytes());
                    if ours {
                        // The server has the re-subscription: whoever re-reads on this resync
                        // cannot miss a notice published after the re-read.
                        pending = None;
                        l.bus.inject_resync();
                    }
                    continue;
                }
                if let Some(notice) = parse(&l, &message) {
                    // The bus only refuses once closed, when the transport is dropped.
                    if l.bus.publish(notice).await.is_err() {
                        return;
                    }
                }
            }
            change = l.changes.recv() => {
                match change {
                    Some(Change::Connected) if !initial_seen => initial_seen = true,
                    Some(Change::Connected) => {
                        metrics::counter!(
                            "broker_dispatch_transport_reconnects_total",
                            "transport" => "nats"
                        )
                        .increment(1);
                        let token = new_token();
                        if let Err(e) = send_probe(&l.client, &l.probe, &token).await {
                            tracing::warn!(error = %e, "NATS probe after reconnect not sent");
                        }
                        pending = Some((token, tokio::time::Instant::now() + l.probe_timeout));
                    }
                    Some(Change::Dropped) => {
                        tracing::warn!("NATS dropped notices (slow consumer); resyncing");
                        l.bus.inject_resync();
                    }
                    None => {
                        // The client's event task ended with its connection handler: the
                        // client is gone for good, whichever of its two channels says so first.
                        tracing::error!("the NATS client stopped; closing the transport");
                        l.bus.close();
                        return;
                    }
                }
            }
            () = sleep_until(probe_deadline), if probe_deadline.is_some() => {
                tracing::warn!("no NATS probe back after reconnect; resyncing anyway");
                pending = None;
                l.bus.inject_resync();
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

/// Turns a message into a notice; what does not parse is logged and ignored.
fn parse(l: &Listener, m: &async_nats::Message) -> Option<Notice> {
    let subject = m.subject.as_str();
    let payload = match std::str::from_utf8(&m.payload) {
        Ok(p) => p,
        Err(_) => {
            tracing::warn!(subject, "ignoring a NATS message that is not UTF-8");
            return None;
        }
    };
    let notice = if subject == l.signal {
        if payload.is_empty() {
            Ok(Notice::Resync)
        } else {
            BrokerId::new(payload)
                .map(|broker| Notice::Signal { broker })
                .map_err(|e| e.to_string())
        }
    } else if subject == l.event {
        DispatchId::parse(payload)
            .map(|id| Notice::Event { id })
            .map_err(|e| e.to_string())
    } else {
        Err("unexpected subject".to_owned())
    };
    match notice {
        Ok(notice) => Some(notice),
        Err(error) => {
            let shown: String = payload.chars().take(80).collect();
            tracing::warn!(subject, payload = %shown, %error, "ignoring a NATS message that does not parse");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_plain_subject_tokens() {
        for good in ["broker_dispatch", "hub.prod-1", "A.b.C"] {
            assert!(check_subject_prefix(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "a.",
            ".a",
            "a..b",
            "a.*",
            "a.>",
            "a b",
            "ä",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(check_subject_prefix(bad), Err(TransportError::Payload(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn reconnect_delay_is_capped_and_jittered() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(10));
        assert_eq!(reconnect_delay(1, min, max), Duration::ZERO);
        for attempts in 2..100 {
            let d = reconnect_delay(attempts, min, max);
            assert!(d >= min / 2 && d <= max, "{d:?} at {attempts}");
        }
        assert!(reconnect_delay(60, min, max) >= max / 2);
    }
}
