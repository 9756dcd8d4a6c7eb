//! [`PgTransport`]: wake-ups over Postgres LISTEN/NOTIFY.
//!
//! Each transport instance keeps one dedicated connection that LISTENs on two channels,
//! `{prefix}_signal` (payload: a broker id) and `{prefix}_event` (payload: a dispatch id), and
//! fans what it hears out to every subscription of the instance. Payloads carry ids only, far
//! below Postgres's 8000-byte limit. When the connection drops, the listener reconnects with
//! capped, jittered exponential backoff (250 ms doubling up to 10 s) and, once it LISTENs again,
//! tells every subscriber [`Notice::Resync`]: notices sent during the gap are lost, so they must
//! re-read what they care about. [`PgStore`](crate::store::PgStore) signals on the same channels
//! from inside its insert transaction, so a subscriber hears of a row only once it is committed.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls, Notification};

use super::{MemoryTransport, Notice, Subscription, Transport};
use crate::error::{BoxError, TransportError};
use crate::fsm::{BrokerId, DispatchId};
use crate::pg::{self, event_channel, resolve_channel_prefix, signal_channel};

/// How a [`PgTransport`] connects.
#[derive(Debug, Clone)]
pub struct PgTransportOptions {
    /// The schema of the store whose notices this transport carries
    /// ([`PgStoreOptions::schema`](crate::store::PgStoreOptions::schema)); it names the
    /// channels unless `channel_prefix` is set. Default `broker_dispatch`, the store's default.
    pub schema: String,
    /// The prefix of the channels (`{prefix}_signal`, `{prefix}_event`); empty (the default)
    /// means the schema's name. It must match the store's
    /// ([`PgStoreOptions::channel_prefix`](crate::store::PgStoreOptions::channel_prefix)),
    /// which defaults the same way, so give both the same `schema` and leave this empty.
    pub channel_prefix: String,
    /// The most pooled connections for publishing ([`PgTransport::connect`] only).
    pub pool_size: usize,
    /// How long one connection attempt may take, and how long [`Transport::subscribe`] waits for
    /// a listener that is reconnecting.
    pub connect_timeout: Duration,
    /// Idle time before TCP keepalive probes start on the LISTEN connection (so a silently dead
    /// peer is noticed), followed by 3 probes 5 s apart.
    pub keepalive_idle: Duration,
    /// The first reconnect delay; it doubles after each failed attempt.
    pub min_backoff: Duration,
    /// The largest reconnect delay.
    pub max_backoff: Duration,
}

impl Default for PgTransportOptions {
    fn default() -> Self {
        PgTransportOptions {
            schema: "broker_dispatch".to_owned(),
            channel_prefix: String::new(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            keepalive_idle: Duration::from_secs(15),
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// What the listener task is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    /// (Re)connecting.
    Connecting,
    /// LISTEN is active on the backend with this process id.
    Listening { pid: i32 },
    /// The very first attempt failed (reported to the constructor, which then gives up).
    Failed { retryable: bool, message: String },
}

/// LISTEN/NOTIFY transport (`postgres` feature). Clone it to share one listener.
///
/// Build one per hub with [`PgTransport::connect`] or [`PgTransport::from_pool`]; both return
/// once the listener is live. Dropping the last clone stops the listener and ends every
/// subscription.
#[derive(Clone)]
pub struct PgTransport {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    bus: MemoryTransport,
    state: watch::Receiver<Listen>,
    signal: String,
    event: String,
    connect_timeout: Duration,
    task: JoinHandle<()>,
}

impl PgTransport {
    /// The channel this transport hears signals on.
    pub(crate) fn signal_channel(&self) -> &str {
        &self.inner.signal
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
        self.bus.close();
    }
}

impl fmt::Debug for PgTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransport")
            .field("signal", &self.inner.signal)
            .field("event", &self.inner.event)
            .field("listener", &*self.inner.state.borrow())
            .finish_non_exhaustive()
    }
}

fn pg_error(e: tokio_postgres::Error) -> TransportError {
    if pg::is_retryable(&e) {
        TransportError::Unavailable(Box::new(e))
    } else {
        TransportError::Backend(Box::new(e))
    }
}

impl PgTransport {
    /// Connects to the database at `dsn` (without TLS): a small pool for publishing and the
    /// dedicated LISTEN connection. Returns once LISTEN is active.
    ///
    /// # Errors
    ///
    /// [`TransportError::Payload`] for a bad channel prefix; [`TransportError::Backend`] for a
    /// malformed DSN or a refused connection (authentication); [`TransportError::Unavailable`]
    /// if the server cannot be reached within `options.connect_timeout`.
    pub async fn connect(dsn: &str, options: PgTransportOptions) -> Result<Self, TransportError> {
        let mut config: tokio_postgres::Config = dsn
            .parse()
            .map_err(|e| TransportError::Backend(Box::new(e)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        let pool = pg::build_pool(config.clone(), options.pool_size, options.connect_timeout)
            .map_err(|e| TransportError::Backend(Box::new(e)))?;
        Self::from_pool(config, pool, options).await
    }

    /// Publishes through `pool` and listens on a dedicated connection made from `config`
    /// (without TLS). Returns once LISTEN is active.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn from_pool(
        mut config: tokio_postgres::Config,
        pool: Pool,
        options: PgTransportOptions,
    ) -> Result<Self, TransportError> {
        let prefix = resolve_channel_prefix(&options.channel_prefix, &options.schema)
            .map_err(TransportError::Payload)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        config.keepalives(true);
        config.keepalives_idle(options.keepalive_idle);
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        let signal = signal_channel(&prefix);
        let event = event_channel(&prefix);
        let bus = MemoryTransport::new();
        let (state_tx, mut state) = watch::channel(Listen::Connecting);
        let task = tokio::spawn(listen_loop(Listener {
            config,
            connect_timeout: options.connect_timeout,
            signal: signal.clone(),
            event: event.clone(),
            bus: bus.clone(),
            state: state_tx,
            min_backoff: options.min_backoff.max(Duration::from_millis(1)),
            max_backoff: options.max_backoff.max(options.min_backoff),
        }));
        let transport = PgTransport {
            inner: Arc::new(Inner {
                pool,
                bus,
                state: state.clone(),
                signal,
                event,
                connect_timeout: options.connect_timeout,
                task,
            }),
        };
        // The first attempt is bounded by the connect timeout; its verdict is final here.
        let first = state
            .wait_for(|s| !matches!(s, Listen::Connecting))
            .await
            .map(|s| s.clone());
        match first {
            Ok(Listen::Listening { .. }) => Ok(transport),
            Ok(Listen::Failed { retryable, message }) => {
                let source: BoxError = message.into();
                Err(if retryable {
                    TransportError::Unavailable(source)
                } else {
                    TransportError::Backend(source)
                })
            }
            Ok(Listen::Connecting) | Err(_) => Err(TransportError::Closed),
        }
    }

    /// The server process id of the LISTEN connection while it is listening: for monitoring,
    /// and for tests that terminate it (`pg_terminate_backend`) to exercise reconnection.
    pub fn listener_pid(&self) -> Option<i32> {
        match *self.inner.state.borrow() {
            Listen::Listening { pid } => Some(pid),
            _ => None,
        }
    }
}

#[async_trait]
impl Transport for PgTransport {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    /// Subscribes, returning once the LISTEN connection is active, so every notice committed
    /// after this returns is delivered (or followed by a [`Notice::Resync`] if the connection
    /// drops).
    ///
    /// # Errors
    ///
    /// [`TransportError::Unavailable`] if the listener is reconnecting and does not get back
    /// within the connect timeout; [`TransportError::Closed`] if the transport is shutting down.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no subscription behind.
    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        let sub = self.inner.bus.subscribe().await?;
        let mut state = self.inner.state.clone();
        let live = tokio::time::timeout(
            self.inner.connect_timeout,
            state.wait_for(|s| matches!(s, Listen::Listening { .. })),
        )
        .await;
        match live {
            Ok(Ok(_)) => Ok(sub),
            Ok(Err(_)) => Err(TransportError::Closed),
            Err(_) => Err(TransportError::Unavailable(
                "the LISTEN connection is down and did not come back in time".into(),
            )),
        }
    }

    /// Sends `SELECT pg_notify(channel, id)` on a pooled connection (autocommit: delivered at
    /// once). [`Notice::Resync`] travels as an empty signal.
    ///
    /// # Errors
    ///
    /// [`TransportError::Unavailable`] when the database cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have sent the notice.
    async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
        let (channel, payload) = match &notice {
            Notice::Signal { broker } => (&self.inner.signal, broker.as_str().to_owned()),
            Notice::Event { id } => (&self.inner.event, id.to_string()),
            Notice::Resync => (&self.inner.signal, String::new()),
        };
        let client = self.inner.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => pg_error(e),
            deadpool_postgres::PoolError::Timeout(_) => TransportError::Unavailable(Box::new(e)),
            other => TransportError::Backend(Box::new(other)),
        })?;
        let stmt = client
            .prepare_cached("SELECT pg_notify($1::text, $2::text)")
            .await
            .map_err(pg_error)?;
        client
            .execute(&stmt, &[channel, &payload])
            .await
            .map_err(pg_error)?;
        Ok(())
    }
}

/// The listener task's configuration and outputs.
struct Listener {
    config: tokio_postgres::Config,
    /// Bounds one whole connection attempt (TCP, startup, LISTEN): a server that accepts the
    /// connection and never answers must not hang the listener.
    connect_timeout: Duration,
    signal: String,
    event: String,
    bus: MemoryTransport,
    state: watch::Sender<Listen>,
    min_backoff: Duration,
    max_backoff: Duration,
}

/// Somewhere between half and all of `d`, so replicas that lost the database together do not
/// reconnect in lockstep.
fn jittered(d: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let half = d / 2;
    let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(random % span.saturating_add(1))
}

async fn listen_loop(l: Listener) {
    let mut backoff = l.min_backoff;
    let mut connected_before = false;
    loop {
        match listen_once(&l, connected_before).await {
            Ok(()) => {
                connected_before = true;
                backoff = l.min_backoff;
                tracing::warn!(channel = %l.signal, "LISTEN connection lost; reconnecting");
            }
            Err((established, failure)) => {
                if established {
                    connected_before = true;
                    backoff = l.min_backoff;
                }
                let (retryable, message) = match &failure {
                    ListenFailure::Pg(e) => {
                        (pg::is_retryable(e), format!("{e}: {}", source_text(e)))
                    }
                    ListenFailure::TimedOut => (
                        true,
                        format!("no answer from the server within {:?}", l.connect_timeout),
                    ),
                };
                if !connected_before {
                    l.state.send_replace(Listen::Failed { retryable, message });
                    return;
                }
                tracing::warn!(channel = %l.signal, error = %message, "LISTEN connection failed; reconnecting");
            }
        }
        l.state.send_replace(Listen::Connecting);
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(l.max_backoff);
    }
}

fn source_text(e: &tokio_postgres::Error) -> String {
    std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Why a connection attempt of the listener ended.
enum ListenFailure {
    Pg(tokio_postgres::Error),
    /// Connecting (or LISTENing) took longer than the connect timeout.
    TimedOut,
}

/// One connection's life: connect, LISTEN, forward notifications until it ends. `Ok` when an
/// established connection ended; `Err((established, failure))` otherwise.
async fn listen_once(l: &Listener, resync: bool) -> Result<(), (bool, ListenFailure)> {
    let connect = tokio::time::timeout(l.connect_timeout, l.config.connect(NoTls));
    let (client, mut connection) = match connect.await {
        Ok(r) => r.map_err(|e| (false, ListenFailure::Pg(e)))?,
        Err(_) => return Err((false, ListenFailure::TimedOut)),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Notification>();
    // The connection must be polled for queries to progress; it also yields the notifications.
    // It ends when the server goes away or when `client` is dropped.
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let setup = async {
        client
            .batch_execute(&format!("LISTEN \"{}\"; LISTEN \"{}\"", l.signal, l.event))
            .await?;
        let row = client.query_one("SELECT pg_backend_pid()", &[]).await?;
        Ok::<i32, tokio_postgres::Error>(row.get(0))
    };
    let pid = match tokio::time::timeout(l.connect_timeout, setup).await {
        Ok(r) => r.map_err(|e| (false, ListenFailure::Pg(e)))?,
        Err(_) => {
            driver.abort();
            return Err((false, ListenFailure::TimedOut));
        }
    };
    l.state.send_replace(Listen::Listening { pid });
    if resync {
        metrics::counter!("broker_dispatch_transport_reconnects_total", "transport" => "postgres")
            .increment(1);
        l.bus.inject_resync();
    }
    while let Some(n) = rx.recv().await {
        if let Some(notice) = parse(l, &n) {
            // The bus only refuses once closed, which happens when the transport is dropped.
            if l.bus.publish(notice).await.is_err() {
                return Ok(());
            }
        }
    }
    drop(client);
    match driver.await {
        Ok(Err(e)) => Err((true, ListenFailure::Pg(e))),
        _ => Ok(()),
    }
}

/// Turns a notification into a notice; what does not parse is logged and ignored.
fn parse(l: &Listener, n: &Notification) -> Option<Notice> {
    let payload = n.payload();
    let notice = if n.channel() == l.signal {
        if payload.is_empty() {
            Ok(Notice::Resync)
        } else {
            BrokerId::new(payload)
                .map(|broker| Notice::Signal { broker })
                .map_err(|e| e.to_string())
        }
    } else if n.channel() == l.event {
        DispatchId::parse(payload)
            .map(|id| Notice::Event { id })
            .map_err(|e| e.to_string())
    } else {
        Err("unexpected channel".to_owned())
    };
    match notice {
        Ok(notice) => Some(notice),
        Err(error) => {
            let shown: String = payload.chars().take(80).collect();
            tracing::warn!(channel = n.channel(), payload = %shown, %error, "ignoring a notification that does not parse");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_named_from_the_prefix() {
        assert_eq!(signal_channel("p"), "p_signal");
        assert_eq!(event_channel("p"), "p_event");
    }

    #[test]
    fn jitter_stays_within_half_and_all_of_the_step() {
        for ms in [1u64, 250, 10_000] {
            let d = Duration::from_millis(ms);
            for _ in 0..100 {
                let j = jittered(d);
                assert!(j >= d / 2 && j <= d, "{j:?} for {d:?}");
            }
        }
    }
}
