//! [`RedisTransport`]: wake-ups over Redis publish/subscribe.
//!
//! Built on the `redis` crate (tokio, `aio`, `connection-manager`) rather than `fred`: it is the
//! common driver, already speaks plain pub/sub, and its `ConnectionManager` reconnects the
//! publishing side by itself, so the transport owns only the listener's reconnect loop.
//!
//! Each transport instance keeps one dedicated pub/sub connection that subscribes to two
//! channels, `{prefix}:signal` (payload: a broker id; an empty payload is a
//! [`Notice::Resync`]) and `{prefix}:event` (payload: a dispatch id), and fans what it hears out
//! to every [`Subscription`] of the instance through a bounded mailbox per subscription (as
//! [`MemoryTransport`]'s): a subscriber that falls behind gets one [`Notice::Resync`] instead of
//! an ever longer queue. The driver hands pub/sub messages over through an unbounded channel
//! of its own; the listener task empties it as fast as messages arrive and never waits on a
//! subscriber (a full mailbox overflows into a resync instead), so nothing piles up there
//! either. Publishing goes through a separate, multiplexed connection.
//!
//! `SUBSCRIBE` returns once the server has confirmed it, so the transport is live when its
//! constructor returns. The listener pings the server every `ping_interval`; when the
//! connection drops or a ping goes unanswered, it reconnects with capped, jittered exponential
//! backoff and, once subscribed again, tells every subscriber [`Notice::Resync`]: notices sent
//! during the gap are lost.
//!
//! **Redis Cluster.** Point every hub's transport at any one node (a plain `redis://` URL; the
//! transport does not use the cluster client). Classic `PUBLISH` is forwarded over the cluster
//! bus to every node (Redis 7 keeps this behaviour), so a subscriber on one node hears a
//! publisher on another; each notice crosses the bus once per node, which is cheap for
//! id-sized hints. When the node a listener is connected to fails, its connection drops and the
//! listener reconnects (to whatever the URL resolves to) and resyncs. Sharded pub/sub
//! (`SPUBLISH`/`SSUBSCRIBE`, Redis 7) behaves differently: a message stays within the shard
//! owning the channel's hash slot, and a subscriber must be connected to that shard; this
//! transport does not use it.
//!
//! TLS (`rediss://`) needs one of the `redis` crate's TLS features, which an application can
//! enable on its own `redis` dependency (Cargo unifies features); credentials go in the URL.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{MemoryTransport, Notice, Subscription, Transport};
use crate::error::{BoxError, TransportError};
use crate::fsm::{BrokerId, DispatchId};

/// The longest channel prefix accepted, in bytes.
const MAX_PREFIX_LEN: usize = 128;

/// Checks a channel prefix: `[A-Za-z0-9_.:-]`, non-empty, so channel names need no escaping
/// and stay readable in `PUBSUB CHANNELS`.
pub(crate) fn check_channel_prefix(prefix: &str) -> Result<(), TransportError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    if !ok {
        return Err(TransportError::Payload(format!(
            "channel prefix must match [A-Za-z0-9_.:-]+ and be at most {MAX_PREFIX_LEN} bytes, \
             got {prefix:?}"
        )));
    }
    Ok(())
}

/// How a [`RedisTransport`] connects.
#[derive(Debug, Clone)]
pub struct RedisTransportOptions {
    /// The channels are `{prefix}:signal` and `{prefix}:event`. Every node of one cluster must
    /// use the same prefix; clusters sharing a Redis server must not.
    pub channel_prefix: String,
    /// How long one connection attempt may take, how long a publish or a ping may wait for its
    /// reply, and how long [`Transport::subscribe`] waits for a listener that is reconnecting.
    pub connect_timeout: Duration,
    /// How often the listener pings the server, so a silently dead connection is noticed.
    pub ping_interval: Duration,
    /// The first reconnect delay; it doubles after each failed attempt.
    pub min_backoff: Duration,
    /// The largest reconnect delay.
    pub max_backoff: Duration,
}

impl Default for RedisTransportOptions {
    fn default() -> Self {
        RedisTransportOptions {
            channel_prefix: "broker_dispatch".to_owned(),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
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
    /// Subscribed to both channels.
    Listening,
    /// The very first attempt failed (reported to the constructor, which then gives up).
    Failed { retryable: bool, message: String },
}

/// Redis pub/sub transport (`redis` feature). Clone it to share one listener.
///
/// Build one per hub with [`RedisTransport::connect`] (a URL) or
/// [`RedisTransport::connect_with`] (a configured [`::redis::Client`]); both return once the
/// listener is subscribed. Dropping the last clone stops the listener and ends every
/// subscription.
#[derive(Clone)]
pub struct RedisTransport {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: ConnectionManager,
    server: String,
    bus: MemoryTransport,
    state: watch::Receiver<Listen>,
    signal: String,
    event: String,
    timeout: Duration,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
        self.bus.close();
    }
}

impl fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTransport")
            .field("server", &self.inner.server)
            .field("signal", &self.inner.signal)
            .field("event", &self.inner.event)
            .field("listener", &*self.inner.state.borrow())
            .finish_non_exhaustive()
    }
}

fn redis_error(e: ::redis::RedisError) -> TransportError {
    if is_retryable(&e) {
        TransportError::Unavailable(Box::new(e))
    } else {
        TransportError::Backend(Box::new(e))
    }
}

fn is_retryable(e: &::redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

fn timed_out(what: &str, d: Duration) -> TransportError {
    TransportError::Unavailable(format!("{what} took longer than {d:?}").into())
}

impl RedisTransport {
    /// Connects to the server at `url` (`redis://[user:password@]host[:port][/db]`): a
    /// multiplexed connection for publishing and the dedicated pub/sub connection. Returns once
    /// both channels are subscribed.
    ///
    /// # Errors
    ///
    /// As [`connect_with`](Self::connect_with); also [`TransportError::Backend`] for a
    /// malformed URL.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no connection behind.
    pub async fn connect(
        url: &str,
        options: RedisTransportOptions,
    ) -> Result<Self, TransportError> {
        let client =
            ::redis::Client::open(url).map_err(|e| TransportError::Backend(Box::new(e)))?;
        Self::connect_with(client, options).await
    }

    /// Connects with a configured client (credentials, database, protocol, TLS where the
    /// `redis` crate's TLS features are enabled).
    ///
    /// # Errors
    ///
    /// [`TransportError::Payload`] for a bad channel prefix; [`TransportError::Unavailable`] if
    /// the server cannot be reached, or does not answer, within `options.connect_timeout`;
    /// [`TransportError::Backend`] for refused credentials and other server errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no connection behind.
    pub async fn connect_with(
        client: ::redis::Client,
        options: RedisTransportOptions,
    ) -> Result<Self, TransportError> {
        check_channel_prefix(&options.channel_prefix)?;
        let server = client.get_connection_info().addr.to_string();
        let timeout = options.connect_timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(2)
            .set_max_delay(u64::try_from(options.max_backoff.as_millis()).unwrap_or(u64::MAX));
        let publisher = tokio::time::timeout(
            timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| timed_out("connecting to Redis", timeout))?
        .map_err(redis_error)?;
        let signal = format!("{}:signal", options.channel_prefix);
        let event = format!("{}:event", options.channel_prefix);
        let bus = MemoryTransport::new();
        let (state_tx, mut state) = watch::channel(Listen::Connecting);
        let min_backoff = options.min_backoff.max(Duration::from_millis(1));
        let task = tokio::spawn(listen_loop(Listener {
            client,
            signal: signal.clone(),
            event: event.clone(),
            bus: bus.clone(),
            state: state_tx,
            timeout,
            ping_interval: options.ping_interval.max(Duration::from_millis(1)),
            min_backoff,
            max_backoff: options.max_backoff.max(min_backoff),
        }));
        let transport = RedisTransport {
            inner: Arc::new(Inner {
                publisher,
                server,
                bus,
                state: state.clone(),
                signal,
                event,
                timeout,
                task,
            }),
        };
        // The first attempt is bounded by the connect timeout; its verdict is final here.
        let first = state
            .wait_for(|s| !matches!(s, Listen::Connecting))
            .await
            .map(|s| s.clone());
        match first {
            Ok(Listen::Listening) => Ok(transport),
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

    /// The server's address (`host:port`, or a socket path), as the client was given it.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// Whether the pub/sub connection is subscribed right now (for monitoring).
    pub fn is_listening(&self) -> bool {
        *self.inner.state.borrow() == Listen::Listening
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// Subscribes, returning once the pub/sub connection is subscribed, so every notice
    /// published after this returns is delivered (or followed by a [`Notice::Resync`] if the
    /// connection drops).
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
            self.inner.timeout,
            state.wait_for(|s| *s == Listen::Listening),
        )
        .await;
        match live {
            Ok(Ok(_)) => Ok(sub),
            Ok(Err(_)) => Err(TransportError::Closed),
            Err(_) => Err(TransportError::Unavailable(
                "the Redis pub/sub connection is down and did not come back in time".into(),
            )),
        }
    }

    /// Sends `PUBLISH channel id`. [`Notice::Resync`] travels as an empty signal.
    ///
    /// # Errors
    ///
    /// [`TransportError::Unavailable`] when the server cannot be reached or does not answer
    /// within the connect timeout.
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
        let mut conn = self.inner.publisher.clone();
        let mut cmd = ::redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        let send = cmd.query_async::<i64>(&mut conn);
        tokio::time::timeout(self.inner.timeout, send)
            .await
            .map_err(|_| timed_out("PUBLISH", self.inner.timeout))?
            .map_err(redis_error)?;
        Ok(())
    }
}

/// The listener task's configuration and outputs.
struct Listener {
    client: ::redis::Client,
    signal: String,
    event: String,
    bus: MemoryTransport,
    state: watch::Sender<Listen>,
    timeout: Duration,
    ping_interval: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
}

/// Somewhere between half and all of `d`, so replicas that lost the server together do not
/// reconnect in lockstep.
fn jittered(d: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let half = d / 2;
    let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(random % span.saturating_add(1))
}

/// Why one connection's life ended.
enum Ended {
    /// Before it was subscribed.
    Setup(TransportError),
    /// After it was subscribed (the connection dropped, or a ping went unanswered).
    Lost(String),
    /// The transport was dropped.
    Closed,
}

async fn listen_loop(l: Listener) {
    let mut backoff = l.min_backoff;
    let mut connected_before = false;
    loop {
        match listen_once(&l, connected_before).await {
            Ended::Closed => return,
            Ended::Lost(why) => {
                connected_before = true;
                backoff = l.min_backoff;
                tracing::warn!(channel = %l.signal, why, "Redis pub/sub connection lost; reconnecting");
            }
            Ended::Setup(e) => {
                if !connected_before {
                    l.state.send_replace(Listen::Failed {
                        retryable: e.is_retryable(),
                        message: e.to_string(),
                    });
                    return;
                }
                tracing::warn!(channel = %l.signal, error = %e, "Redis pub/sub reconnect failed; retrying");
            }
        }
        l.state.send_replace(Listen::Connecting);
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(l.max_backoff);
    }
}

/// One connection's life: connect, subscribe, forward messages until it ends.
async fn listen_once(l: &Listener, resync: bool) -> Ended {
    let setup = async {
        let pubsub = tokio::time::timeout(l.timeout, l.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out("connecting to Redis", l.timeout))?
            .map_err(redis_error)?;
        let (mut sink, stream) = pubsub.split();
        tokio::time::timeout(l.timeout, sink.subscribe(&[&l.signal, &l.event]))
            .await
            .map_err(|_| timed_out("SUBSCRIBE", l.timeout))?
            .map_err(redis_error)?;
        Ok::<_, TransportError>((sink, stream))
    };
    let (mut sink, mut stream) = match setup.await {
        Ok(s) => s,
        Err(e) => return Ended::Setup(e),
    };
    l.state.send_replace(Listen::Listening);
    if resync {
        metrics::counter!("broker_dispatch_transport_reconnects_total", "transport" => "redis")
            .increment(1);
        l.bus.inject_resync();
    }
    let mut ping = tokio::time::interval(l.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return Ended::Lost("the connection closed".to_owned());
                };
                if let Some(notice) = parse(l, &message) {
                    // The bus only refuses once closed, when the transport is dropped.
                    if l.bus.publish(notice).await.is_err() {
                        return Ended::Closed;
                    }
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(l.timeout, sink.ping::<::redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Ended::Lost(format!("ping failed: {e}")),
                    Err(_) => return Ended::Lost(format!("no answer to a ping within {:?}", l.timeout)),
                }
            }
        }
    }
}

/// Turns a message into a notice; what does not parse is logged and ignored.
fn parse(l: &Listener, m: &::redis::Msg) -> Option<Notice> {
    let channel = m.get_channel_name();
    let Ok(payload) = std::str::from_utf8(m.get_payload_bytes()) else {
        tracing::warn!(channel, "ignoring a Redis message that is not UTF-8");
        return None;
    };
    let notice = if channel == l.signal {
        if payload.is_empty() {
            Ok(Notice::Resync)
        } else {
            BrokerId::new(payload)
                .map(|broker| Notice::Signal { broker })
                .map_err(|e| e.to_string())
        }
    } else if channel == l.event {
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
            tracing::warn!(channel, payload = %shown, %error, "ignoring a Redis message that does not parse");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_plain_channel_names() {
        for good in ["broker_dispatch", "hub:prod-1", "a.b"] {
            assert!(check_channel_prefix(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a b", "a*", "a\nb", "ä", &"x".repeat(129)] {
            assert!(
                matches!(check_channel_prefix(bad), Err(TransportError::Payload(_))),
                "{bad:?}"
            );
        }
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
