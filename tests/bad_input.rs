//! The bad-input catalogue: malformed input at every public entry point, one named case per
//! input, so a failure names the input.
//!
//! Each case asserts the error *variant* (never message text), that nothing panics (every case
//! runs under `catch_unwind`), and, where a store is involved, that the store is unchanged: a
//! full snapshot (every row, by `list` pages, plus the affinity of every broker involved) is
//! taken before and after. Store-level cases run against the memory store, SQLite, and (when a
//! Postgres is at hand) Postgres; hub-level cases against hubs on memory and SQLite.

mod support;

#[cfg(feature = "postgres")]
#[path = "support/pg.rs"]
mod pg;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use broker_dispatch::fsm::{
    Affinity, BrokerId, Dispatch, DispatchId, DispatchState, EventKind, IdError, NodeId, SessionId,
    Timestamp,
};
use broker_dispatch::hub::{Command, Hub, HubConfig};
use broker_dispatch::store::{
    CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, MemoryStore, NewDispatch, Outcome, Store,
    SweepParams, MAX_ARGS_BYTES, MAX_BATCH,
};
use broker_dispatch::transport::Notice;
use broker_dispatch::{Error, StoreError};
use futures::FutureExt;
use parking_lot::Mutex;
use serde_json::json;
use support::{Ledger, Recorder};

const T0: i64 = 1_700_000_000_000_000;

fn at(offset_micros: i64) -> Option<Timestamp> {
    Some(Timestamp::from_micros(T0 + offset_micros))
}
fn b(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}
fn n(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}
fn s(x: &str) -> SessionId {
    SessionId::new(x).unwrap()
}

type CaseResult = Result<(), String>;
/// A named case that needs no runtime.
type SyncCase = (&'static str, Box<dyn Fn() -> CaseResult>);
/// A named connect attempt: DSN, options, and the error variant it must produce.
#[cfg(feature = "postgres")]
type ConnectCase<O, E> = (&'static str, String, O, fn(&E) -> bool);
type BoxFut<'a> = Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

/// Fails with the value when it is not what `pat` expects.
macro_rules! expect {
    ($value:expr, $pat:pat) => {
        match $value {
            $pat => Ok(()),
            other => Err(format!("expected {}, got {other:?}", stringify!($pat))),
        }
    };
}

/// Runs every case, each under `catch_unwind`, and fails once, naming every case that failed.
fn run_sync(cases: Vec<SyncCase>) -> usize {
    let mut failures = Vec::new();
    let count = cases.len();
    for (name, case) in cases {
        match std::panic::catch_unwind(AssertUnwindSafe(case)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{name}: {e}")),
            Err(_) => failures.push(format!("{name}: panicked")),
        }
    }
    assert!(
        failures.is_empty(),
        "bad-input cases failed:\n{}",
        failures.join("\n")
    );
    count
}

// ---------------------------------------------------------------------------------------------
// Identifiers and wire formats (no store).

#[test]
fn identifiers_and_wire_formats() {
    let long = "x".repeat(257);
    let long_multibyte = "é".repeat(129); // 258 bytes, 129 chars
    let mut cases: Vec<SyncCase> = Vec::new();
    macro_rules! id_cases {
        ($ty:ident, $prefix:literal) => {
            let l = long.clone();
            let m = long_multibyte.clone();
            cases.push((
                concat!($prefix, " empty"),
                Box::new(|| expect!($ty::new(""), Err(IdError::Empty { .. }))),
            ));
            cases.push((
                concat!($prefix, " 257 bytes"),
                Box::new(move || {
                    expect!($ty::new(l.clone()), Err(IdError::TooLong { len: 257, .. }))
                }),
            ));
            cases.push((
                concat!($prefix, " 258 bytes in 129 chars"),
                Box::new(move || {
                    expect!($ty::new(m.clone()), Err(IdError::TooLong { len: 258, .. }))
                }),
            ));
            cases.push((
                concat!($prefix, " newline"),
                Box::new(|| expect!($ty::new("a\nb"), Err(IdError::ControlChar { .. }))),
            ));
            cases.push((
                concat!($prefix, " NUL"),
                Box::new(|| expect!($ty::new("a\0b"), Err(IdError::ControlChar { .. }))),
            ));
            cases.push((
                concat!($prefix, " DEL"),
                Box::new(|| expect!($ty::new("a\u{7f}"), Err(IdError::ControlChar { .. }))),
            ));
            cases.push((
                concat!($prefix, " C1 control (NEL)"),
                Box::new(|| expect!($ty::new("a\u{85}"), Err(IdError::ControlChar { .. }))),
            ));
            cases.push((
                concat!($prefix, " from JSON, empty"),
                Box::new(|| {
                    let e = serde_json::from_str::<$ty>("\"\"")
                        .err()
                        .ok_or("accepted")?;
                    expect!(e.classify(), serde_json::error::Category::Data)
                }),
            ));
        };
    }
    id_cases!(BrokerId, "BrokerId");
    id_cases!(NodeId, "NodeId");
    id_cases!(SessionId, "SessionId");
    let l = long.clone();
    cases.push((
        "DispatchId::parse empty",
        Box::new(|| expect!(DispatchId::parse(""), Err(IdError::NotUuid(_)))),
    ));
    cases.push((
        "DispatchId::parse not a uuid",
        Box::new(|| expect!(DispatchId::parse("not-a-uuid"), Err(IdError::NotUuid(_)))),
    ));
    cases.push((
        "DispatchId::parse 257 bytes",
        Box::new(move || expect!(DispatchId::parse(&l), Err(IdError::NotUuid(_)))),
    ));
    cases.push((
        "DispatchId::parse NUL",
        Box::new(|| expect!(DispatchId::parse("\0"), Err(IdError::NotUuid(_)))),
    ));
    cases.push((
        "DispatchId::parse trailing garbage",
        Box::new(|| {
            expect!(
                DispatchId::parse("0190a0b0-0000-7000-8000-000000000000x"),
                Err(IdError::NotUuid(_))
            )
        }),
    ));
    cases.push((
        "DispatchId::parse bad hex digit",
        Box::new(|| {
            expect!(
                DispatchId::parse("0190a0b0-0000-7000-8000-00000000000g"),
                Err(IdError::NotUuid(_))
            )
        }),
    ));
    cases.push((
        "DispatchId::parse error quotes at most 64 chars",
        Box::new(|| match DispatchId::parse(&"z".repeat(10_000)) {
            Err(IdError::NotUuid(shown)) if shown.chars().count() <= 64 => Ok(()),
            other => Err(format!("{other:?}")),
        }),
    ));
    cases.push((
        "op empty",
        Box::new(|| {
            expect!(
                broker_dispatch::fsm::check_op(""),
                Err(IdError::Empty { .. })
            )
        }),
    ));
    let l = long.clone();
    cases.push((
        "op 257 bytes",
        Box::new(move || {
            expect!(
                broker_dispatch::fsm::check_op(&l),
                Err(IdError::TooLong { .. })
            )
        }),
    ));
    cases.push((
        "op control char",
        Box::new(|| {
            expect!(
                broker_dispatch::fsm::check_op("st\tart"),
                Err(IdError::ControlChar { .. })
            )
        }),
    ));

    // Bytes entering through serde.
    let sample = sample_dispatch();
    let valid = serde_json::to_vec(&sample).unwrap();
    let syntax = |bytes: Vec<u8>| -> Box<dyn Fn() -> CaseResult> {
        Box::new(move || {
            let e = serde_json::from_slice::<Dispatch>(&bytes)
                .err()
                .ok_or("accepted")?;
            expect!(
                e.classify(),
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof
            )
        })
    };
    let mut invalid_utf8 = valid.clone();
    let pos = invalid_utf8
        .windows(4)
        .position(|w| w == b"\"op\"")
        .unwrap()
        + 7;
    invalid_utf8[pos] = 0xff;
    cases.push(("Dispatch JSON with invalid UTF-8", syntax(invalid_utf8)));
    cases.push((
        "Dispatch JSON truncated",
        syntax(valid[..valid.len() / 2].to_vec()),
    ));
    cases.push(("Dispatch JSON empty", syntax(Vec::new())));
    let data = |text: String| -> Box<dyn Fn() -> CaseResult> {
        Box::new(move || {
            let e = serde_json::from_str::<Dispatch>(&text)
                .err()
                .ok_or("accepted")?;
            expect!(e.classify(), serde_json::error::Category::Data)
        })
    };
    let valid_text = String::from_utf8(valid.clone()).unwrap();
    cases.push((
        "Dispatch JSON unknown state",
        data(valid_text.replace("\"pending\"", "\"zombie\"")),
    ));
    cases.push((
        "Dispatch JSON negative attempt",
        data(valid_text.replace("\"attempt\":0", "\"attempt\":-1")),
    ));
    cases.push((
        "Dispatch JSON broker with NUL",
        data(valid_text.replace("\"broker\":\"b1\"", "\"broker\":\"b\\u0000\"")),
    ));
    cases.push((
        "Dispatch JSON id not a uuid",
        data(valid_text.replacen(&sample.id.to_string(), "nope", 1)),
    ));
    let notice =
        |bytes: Vec<u8>, want: serde_json::error::Category| -> Box<dyn Fn() -> CaseResult> {
            Box::new(move || {
                let e = serde_json::from_slice::<Notice>(&bytes)
                    .err()
                    .ok_or("accepted")?;
                if e.classify() == want {
                    Ok(())
                } else {
                    Err(format!("{:?}, not {want:?}", e.classify()))
                }
            })
        };
    use serde_json::error::Category;
    cases.push((
        "Notice invalid UTF-8",
        notice(
            b"{\"t\":\"signal\",\"broker\":\"\xff\xfe\"}".to_vec(),
            Category::Syntax,
        ),
    ));
    cases.push((
        "Notice unknown tag",
        notice(br#"{"t":"shout"}"#.to_vec(), Category::Data),
    ));
    cases.push((
        "Notice signal with empty broker",
        notice(br#"{"t":"signal","broker":""}"#.to_vec(), Category::Data),
    ));
    cases.push((
        "Notice signal with control char",
        notice(
            b"{\"t\":\"signal\",\"broker\":\"a\\nb\"}".to_vec(),
            Category::Data,
        ),
    ));
    cases.push((
        "Notice event with bad uuid",
        notice(br#"{"t":"event","id":"xyz"}"#.to_vec(), Category::Data),
    ));
    cases.push((
        "Notice truncated",
        notice(br#"{"t":"sig"#.to_vec(), Category::Eof),
    ));
    let count = run_sync(cases);
    eprintln!("identifier and wire-format cases: {count}");
}

fn sample_dispatch() -> Dispatch {
    NewDispatch::new(b("b1"), "op", json!({"k": "v"})).into_dispatch(Timestamp::from_micros(T0))
}

// ---------------------------------------------------------------------------------------------
// Hub configuration.

#[tokio::test]
async fn hub_configs_are_checked_before_anything_starts() {
    let zero = Duration::ZERO;
    let d = HubConfig::default;
    let configs: Vec<(&'static str, HubConfig)> = vec![
        ("zero lease", HubConfig { lease: zero, ..d() }),
        (
            "zero freshness",
            HubConfig {
                freshness: zero,
                ..d()
            },
        ),
        (
            "zero wait_window",
            HubConfig {
                wait_window: zero,
                ..d()
            },
        ),
        (
            "zero wait_hard_cap",
            HubConfig {
                wait_hard_cap: Some(zero),
                ..d()
            },
        ),
        (
            "zero send_ttl",
            HubConfig {
                send_ttl: zero,
                ..d()
            },
        ),
        (
            "zero poll_interval",
            HubConfig {
                poll_interval: zero,
                ..d()
            },
        ),
        (
            "zero sweep_interval",
            HubConfig {
                sweep_interval: zero,
                ..d()
            },
        ),
        (
            "zero retention",
            HubConfig {
                retention: zero,
                ..d()
            },
        ),
        (
            "zero execute_timeout",
            HubConfig {
                execute_timeout: zero,
                ..d()
            },
        ),
        (
            "zero store_timeout",
            HubConfig {
                store_timeout: zero,
                ..d()
            },
        ),
        (
            "zero shutdown_timeout",
            HubConfig {
                shutdown_timeout: zero,
                ..d()
            },
        ),
        (
            "lease of 999 µs",
            HubConfig {
                lease: Duration::from_micros(999),
                ..d()
            },
        ),
        (
            "poll_interval of 1 ns",
            HubConfig {
                poll_interval: Duration::from_nanos(1),
                ..d()
            },
        ),
        (
            "store_timeout of 999 µs",
            HubConfig {
                store_timeout: Duration::from_micros(999),
                ..d()
            },
        ),
        (
            "wait_hard_cap of 999 µs",
            HubConfig {
                wait_hard_cap: Some(Duration::from_micros(999)),
                ..d()
            },
        ),
        (
            "zero max_attempts",
            HubConfig {
                max_attempts: 0,
                ..d()
            },
        ),
        (
            "zero claim_batch",
            HubConfig {
                claim_batch: 0,
                ..d()
            },
        ),
        (
            "claim_batch above MAX_BATCH",
            HubConfig {
                claim_batch: MAX_BATCH + 1,
                ..d()
            },
        ),
    ];
    let mut failures = Vec::new();
    let count = configs.len() + 2;
    for (name, config) in configs {
        if let Err(e) = expect!(config.validate(), Err(Error::InvalidInput(_))) {
            failures.push(format!("{name} (validate): {e}"));
        }
        let started = Hub::builder(n("n1"))
            .store(Arc::new(MemoryStore::new()))
            .executor(recorder("n1"))
            .config(config)
            .start()
            .await;
        if let Err(e) = expect!(started, Err(Error::InvalidInput(_))) {
            failures.push(format!("{name} (start): {e}"));
        }
    }
    let no_store = Hub::builder(n("n1")).executor(recorder("n1")).start().await;
    if let Err(e) = expect!(no_store, Err(Error::InvalidInput(_))) {
        failures.push(format!("hub without a store: {e}"));
    }
    let no_exec = Hub::builder(n("n1"))
        .store(Arc::new(MemoryStore::new()))
        .start()
        .await;
    if let Err(e) = expect!(no_exec, Err(Error::InvalidInput(_))) {
        failures.push(format!("hub without an executor: {e}"));
    }
    assert!(
        failures.is_empty(),
        "bad-input cases failed:\n{}",
        failures.join("\n")
    );
    eprintln!("hub config cases: {count}");
}

fn recorder(node: &str) -> Arc<Recorder> {
    Arc::new(Recorder::new(
        &n(node),
        &Arc::new(Mutex::new(Ledger::default())),
    ))
}

// ---------------------------------------------------------------------------------------------
// Store entry points.

/// What the fixture holds: one row or affinity per situation a bad call can meet.
struct Fixture {
    /// Pending, on broker `b-pending`, with idempotency key `key-1`.
    pending: Dispatch,
    /// Done at attempt 1, and the holder's handle (as a snapshot) that finished it.
    done_holder: Dispatch,
    /// In progress at attempt 2; `stale_holder` is attempt 1's snapshot.
    current_holder: Dispatch,
    stale_holder: Dispatch,
    /// In progress at its only attempt (max_attempts 1).
    last_attempt: Dispatch,
    /// Broker `b-aff` is held by node `n1`, session `s2` (connected at T0 + 100 µs, after `s1`).
    affinity: Affinity,
}

const LONG_LEASE: Duration = Duration::from_secs(3600);

fn new_row(broker: &str, created: i64) -> NewDispatch {
    NewDispatch {
        now: at(created),
        ..NewDispatch::new(b(broker), "op", json!({ "broker": broker }))
    }
}

fn claim_on(broker: &str, lease: Duration, now: i64) -> ClaimParams {
    ClaimParams {
        broker: b(broker),
        node: n("n1"),
        limit: 10,
        lease,
        now: at(now),
    }
}

async fn claim_one(store: &dyn Store, broker: &str, lease: Duration, now: i64) -> Claimed {
    let mut got = store
        .claim(claim_on(broker, lease, now))
        .await
        .expect("claim");
    assert_eq!(got.len(), 1, "claim {broker}");
    got.pop().unwrap()
}

async fn fixture(store: &dyn Store) -> Fixture {
    let pending = store
        .insert(NewDispatch {
            idempotency_key: Some("key-1".into()),
            ..new_row("b-pending", 0)
        })
        .await
        .expect("insert");
    store.insert(new_row("b-done", 1)).await.expect("insert");
    let done = claim_one(store, "b-done", LONG_LEASE, 10).await;
    let done_holder = done.dispatch().clone();
    store
        .finish(
            done,
            FinishParams {
                outcome: Outcome::Complete(json!("ok")),
                now: at(20),
            },
        )
        .await
        .expect("complete");
    // The shortest lease a store takes, lapsed long before the current holder's claim.
    store
        .insert(new_row("b-stale", -5_000))
        .await
        .expect("insert");
    let stale_holder = claim_one(store, "b-stale", Duration::from_millis(1), -4_000)
        .await
        .into_dispatch();
    let current_holder = claim_one(store, "b-stale", LONG_LEASE, 30)
        .await
        .into_dispatch();
    store
        .insert(NewDispatch {
            max_attempts: 1,
            ..new_row("b-one", 3)
        })
        .await
        .expect("insert");
    let last_attempt = claim_one(store, "b-one", LONG_LEASE, 10)
        .await
        .into_dispatch();
    for (session, when) in [("s1", 0), ("s2", 100)] {
        let out = store
            .connect(ConnectParams {
                broker: b("b-aff"),
                node: n("n1"),
                session: s(session),
                connected_at: Some(Timestamp::from_micros(T0 + when)),
                now: at(when),
            })
            .await
            .expect("connect");
        assert!(matches!(out, ConnectOutcome::Claimed(_)));
    }
    let affinity = store.affinity(&b("b-aff")).await.unwrap().unwrap();
    Fixture {
        pending,
        done_holder,
        current_holder,
        stale_holder,
        last_attempt,
        affinity,
    }
}

/// Every row (by pages of 2, to exercise paging) and the affinity of every broker the cases
/// touch.
async fn snapshot(store: &dyn Store) -> (Vec<Dispatch>, Vec<Option<Affinity>>) {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(ListFilter {
                after,
                limit: 2,
                ..ListFilter::default()
            })
            .await
            .expect("list");
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        rows.extend(page);
    }
    let mut affinity = Vec::new();
    for broker in ["b-aff", "b-pending", "b-done", "b-stale", "b-one", "b-none"] {
        affinity.push(store.affinity(&b(broker)).await.expect("affinity"));
    }
    (rows, affinity)
}

type StoreCase = Box<dyn for<'a> Fn(&'a dyn Store, &'a Fixture) -> BoxFut<'a> + Send + Sync>;

fn mk<F>(f: F) -> StoreCase
where
    F: for<'a> Fn(&'a dyn Store, &'a Fixture) -> BoxFut<'a> + Send + Sync + 'static,
{
    Box::new(f)
}

macro_rules! case {
    ($cases:ident, $name:literal, |$st:ident, $fx:ident| $body:expr) => {
        #[allow(unused_variables)]
        $cases.push(($name, mk(|$st, $fx| Box::pin(async move { $body }))));
    };
}

fn forged(d: &Dispatch) -> Claimed {
    Claimed::new(d.clone())
}

fn unknown(d: &Dispatch) -> Dispatch {
    Dispatch {
        id: DispatchId::new(),
        ..d.clone()
    }
}

fn hb(lease: Duration, now: Option<Timestamp>) -> HeartbeatParams {
    HeartbeatParams {
        lease,
        progress: None,
        now,
    }
}

fn fin(outcome: Outcome) -> FinishParams {
    FinishParams {
        outcome,
        now: at(1_000),
    }
}

fn aff(node: &str, session: &str, now: Option<Timestamp>) -> DisconnectParams {
    DisconnectParams {
        broker: b("b-aff"),
        node: n(node),
        session: s(session),
        now,
    }
}

/// Every bad call a store can get, with the variant it must answer.
fn store_cases() -> Vec<(&'static str, StoreCase)> {
    let mut c: Vec<(&'static str, StoreCase)> = Vec::new();
    // insert
    case!(c, "insert: empty op", |st, fx| expect!(
        st.insert(NewDispatch {
            op: String::new(),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: op of 257 bytes", |st, fx| expect!(
        st.insert(NewDispatch {
            op: "o".repeat(257),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: op with a control char", |st, fx| expect!(
        st.insert(NewDispatch {
            op: "st\u{7}art".into(),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: op with NUL", |st, fx| expect!(
        st.insert(NewDispatch {
            op: "a\0".into(),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: zero max_attempts", |st, fx| expect!(
        st.insert(NewDispatch {
            max_attempts: 0,
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: empty idempotency key", |st, fx| expect!(
        st.insert(NewDispatch {
            idempotency_key: Some(String::new()),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: idempotency key of 257 bytes", |st, fx| expect!(
        st.insert(NewDispatch {
            idempotency_key: Some("k".repeat(257)),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(
        c,
        "insert: args one byte over MAX_ARGS_BYTES",
        |st, fx| expect!(
            // A JSON string of n chars is n + 2 bytes.
            st.insert(NewDispatch {
                args: json!("a".repeat(MAX_ARGS_BYTES - 1)),
                ..new_row("b-new", 0)
            })
            .await,
            Err(StoreError::InvalidInput(_))
        )
    );
    case!(
        c,
        "insert: an existing id with another payload",
        |st, fx| expect!(
            st.insert(NewDispatch {
                id: fx.pending.id,
                args: json!("other"),
                ..new_row("b-pending", 0)
            })
            .await,
            Err(StoreError::Conflict(_))
        )
    );
    case!(
        c,
        "insert: an existing idempotency key with another payload",
        |st, fx| expect!(
            st.insert(NewDispatch {
                idempotency_key: Some("key-1".into()),
                ..new_row("b-other", 0)
            })
            .await,
            Err(StoreError::Conflict(_))
        )
    );
    // claim
    case!(c, "claim: zero limit", |st, fx| expect!(
        st.claim(ClaimParams {
            limit: 0,
            ..claim_on("b-pending", LONG_LEASE, 1_000)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "claim: limit above MAX_BATCH", |st, fx| expect!(
        st.claim(ClaimParams {
            limit: MAX_BATCH + 1,
            ..claim_on("b-pending", LONG_LEASE, 1_000)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "claim: zero lease", |st, fx| expect!(
        st.claim(claim_on("b-pending", Duration::ZERO, 1_000)).await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "claim: lease of 999 µs", |st, fx| expect!(
        st.claim(claim_on("b-pending", Duration::from_micros(999), 1_000))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "claim: lease of 1 ns", |st, fx| expect!(
        st.claim(claim_on("b-pending", Duration::from_nanos(1), 1_000))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: delay of 999 µs", |st, fx| expect!(
        st.insert(NewDispatch {
            delay: Some(Duration::from_micros(999)),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "insert: ttl of 1 ns", |st, fx| expect!(
        st.insert(NewDispatch {
            ttl: Some(Duration::from_nanos(1)),
            ..new_row("b-new", 0)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "sweep: retention of 999 µs", |st, fx| expect!(
        st.sweep(SweepParams {
            retention: Duration::from_micros(999),
            limit: 10,
            now: at(1_000)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "claim: now = i64::MIN claims nothing", |st, fx| {
        let got = st
            .claim(ClaimParams {
                now: Some(Timestamp::from_micros(i64::MIN)),
                ..claim_on("b-pending", LONG_LEASE, 0)
            })
            .await;
        expect!(got.as_deref().map(<[Claimed]>::len), Ok(0))
    });
    // heartbeat
    case!(c, "heartbeat: zero lease", |st, fx| expect!(
        st.heartbeat(&forged(&fx.current_holder), hb(Duration::ZERO, at(1_000)))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "heartbeat: lease of 999 µs", |st, fx| expect!(
        st.heartbeat(
            &forged(&fx.current_holder),
            hb(Duration::from_micros(999), at(1_000))
        )
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(
        c,
        "heartbeat: stale attempt, lease Duration::MAX at Timestamp::MAX",
        |st, fx| expect!(
            st.heartbeat(
                &forged(&fx.stale_holder),
                hb(Duration::MAX, Some(Timestamp::MAX))
            )
            .await,
            Err(StoreError::Fenced {
                presented: 1,
                current: 2
            })
        )
    );
    case!(c, "heartbeat: after finish", |st, fx| expect!(
        st.heartbeat(&forged(&fx.done_holder), hb(LONG_LEASE, at(1_000)))
            .await,
        Err(StoreError::Illegal {
            from: DispatchState::Done,
            event: EventKind::Heartbeat
        })
    ));
    case!(c, "heartbeat: a never-claimed row", |st, fx| expect!(
        st.heartbeat(&forged(&fx.pending), hb(LONG_LEASE, at(1_000)))
            .await,
        Err(StoreError::Illegal {
            from: DispatchState::Pending,
            event: EventKind::Heartbeat
        })
    ));
    case!(c, "heartbeat: unknown id", |st, fx| expect!(
        st.heartbeat(
            &forged(&unknown(&fx.current_holder)),
            hb(LONG_LEASE, at(1_000))
        )
        .await,
        Err(StoreError::NotFound(_))
    ));
    // finish
    case!(c, "finish: double complete", |st, fx| expect!(
        st.finish(forged(&fx.done_holder), fin(Outcome::Complete(json!(2))))
            .await,
        Err(StoreError::Illegal {
            from: DispatchState::Done,
            event: EventKind::Complete
        })
    ));
    case!(c, "finish: fail after done", |st, fx| expect!(
        st.finish(forged(&fx.done_holder), fin(Outcome::Fail("late".into())))
            .await,
        Err(StoreError::Illegal {
            from: DispatchState::Done,
            event: EventKind::Fail
        })
    ));
    case!(c, "finish: stale complete", |st, fx| expect!(
        st.finish(forged(&fx.stale_holder), fin(Outcome::Complete(json!(1))))
            .await,
        Err(StoreError::Fenced {
            presented: 1,
            current: 2
        })
    ));
    case!(c, "finish: stale release", |st, fx| expect!(
        st.finish(forged(&fx.stale_holder), fin(Outcome::Release))
            .await,
        Err(StoreError::Fenced {
            presented: 1,
            current: 2
        })
    ));
    case!(
        c,
        "finish: stale retry after Duration::MAX",
        |st, fx| expect!(
            st.finish(
                forged(&fx.stale_holder),
                fin(Outcome::Retry {
                    after: Duration::MAX
                })
            )
            .await,
            Err(StoreError::Fenced {
                presented: 1,
                current: 2
            })
        )
    );
    case!(c, "finish: retry without attempts left", |st, fx| expect!(
        st.finish(
            forged(&fx.last_attempt),
            fin(Outcome::Retry {
                after: Duration::ZERO
            })
        )
        .await,
        Err(StoreError::Illegal {
            from: DispatchState::InProgress,
            event: EventKind::Retry
        })
    ));
    case!(c, "finish: a never-claimed row", |st, fx| expect!(
        st.finish(forged(&fx.pending), fin(Outcome::Complete(json!(0))))
            .await,
        Err(StoreError::Illegal {
            from: DispatchState::Pending,
            event: EventKind::Complete
        })
    ));
    case!(c, "finish: unknown id", |st, fx| expect!(
        st.finish(
            forged(&unknown(&fx.current_holder)),
            fin(Outcome::Complete(json!(0)))
        )
        .await,
        Err(StoreError::NotFound(_))
    ));
    // cancel, get
    case!(c, "cancel: unknown id", |st, fx| expect!(
        st.cancel(CancelParams {
            id: DispatchId::new(),
            now: at(1_000)
        })
        .await,
        Err(StoreError::NotFound(_))
    ));
    case!(c, "cancel: a done row at Timestamp::MAX", |st, fx| expect!(
        st.cancel(CancelParams {
            id: fx.done_holder.id,
            now: Some(Timestamp::MAX)
        })
        .await,
        Err(StoreError::Illegal {
            from: DispatchState::Done,
            event: EventKind::Cancel
        })
    ));
    case!(c, "cancel: an in-progress row", |st, fx| expect!(
        st.cancel(CancelParams {
            id: fx.current_holder.id,
            now: at(1_000)
        })
        .await,
        Err(StoreError::Illegal {
            from: DispatchState::InProgress,
            event: EventKind::Cancel
        })
    ));
    case!(c, "get: unknown id", |st, fx| expect!(
        st.get(DispatchId::new()).await,
        Ok(None)
    ));
    // list, sweep
    case!(c, "list: zero limit", |st, fx| expect!(
        st.list(ListFilter {
            limit: 0,
            ..ListFilter::default()
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "list: limit above MAX_BATCH", |st, fx| expect!(
        st.list(ListFilter {
            limit: MAX_BATCH + 1,
            ..ListFilter::default()
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "sweep: zero limit", |st, fx| expect!(
        st.sweep(SweepParams {
            retention: LONG_LEASE,
            limit: 0,
            now: at(1_000)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(c, "sweep: limit above MAX_BATCH", |st, fx| expect!(
        st.sweep(SweepParams {
            retention: LONG_LEASE,
            limit: MAX_BATCH + 1,
            now: at(1_000)
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(
        c,
        "sweep: now = i64::MIN, retention Duration::MAX",
        |st, fx| {
            let r = st
                .sweep(SweepParams {
                    retention: Duration::MAX,
                    limit: 10,
                    now: Some(Timestamp::from_micros(i64::MIN)),
                })
                .await
                .map_err(|e| format!("{e:?}"))?;
            if r.expired.is_empty() && r.exhausted.is_empty() && r.purged == 0 {
                Ok(())
            } else {
                Err(format!("swept something at the dawn of time: {r:?}"))
            }
        }
    );
    // affinity
    case!(
        c,
        "connect: connected_at older than the current owner",
        |st, fx| expect!(
            st.connect(ConnectParams {
                broker: b("b-aff"),
                node: n("n2"),
                session: s("s9"),
                connected_at: Some(Timestamp::from_micros(
                    fx.affinity.connected_at.as_micros() - 1
                )),
                now: at(1_000),
            })
            .await,
            Ok(ConnectOutcome::Superseded(_))
        )
    );
    case!(c, "connect: connected_at 2 s after now", |st, fx| expect!(
        st.connect(ConnectParams {
            broker: b("b-aff"),
            node: n("n2"),
            session: s("s9"),
            connected_at: Some(Timestamp::from_micros(T0 + 1_000 + 2_000_000)),
            now: at(1_000),
        })
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    case!(
        c,
        "connect: connected_at = Timestamp::MAX by the store's clock",
        |st, fx| expect!(
            st.connect(ConnectParams {
                broker: b("b-aff"),
                node: n("n2"),
                session: s("s9"),
                connected_at: Some(Timestamp::MAX),
                now: None,
            })
            .await,
            Err(StoreError::InvalidInput(_))
        )
    );
    case!(c, "connect: connected_at = i64::MIN", |st, fx| expect!(
        st.connect(ConnectParams {
            broker: b("b-aff"),
            node: n("n2"),
            session: s("s9"),
            connected_at: Some(Timestamp::from_micros(i64::MIN)),
            now: at(1_000),
        })
        .await,
        Ok(ConnectOutcome::Superseded(_))
    ));
    case!(
        c,
        "connect: the released older session again",
        |st, fx| expect!(
            st.connect(ConnectParams {
                broker: b("b-aff"),
                node: n("n1"),
                session: s("s1"),
                connected_at: Some(Timestamp::from_micros(T0)),
                now: at(1_000),
            })
            .await,
            Ok(ConnectOutcome::Superseded(_))
        )
    );
    case!(c, "disconnect: mismatched session", |st, fx| expect!(
        st.disconnect(aff("n1", "s1", at(1_000))).await,
        Ok(false)
    ));
    case!(c, "disconnect: mismatched node", |st, fx| expect!(
        st.disconnect(aff("n2", "s2", at(1_000))).await,
        Ok(false)
    ));
    case!(c, "disconnect: unknown broker", |st, fx| expect!(
        st.disconnect(DisconnectParams {
            broker: b("b-none"),
            ..aff("n1", "s2", at(1_000))
        })
        .await,
        Ok(false)
    ));
    case!(c, "touch: mismatched session", |st, fx| expect!(
        st.touch(aff("n1", "s1", at(1_000))).await,
        Ok(false)
    ));
    case!(c, "touch: mismatched node", |st, fx| expect!(
        st.touch(aff("n2", "s2", at(1_000))).await,
        Ok(false)
    ));
    case!(c, "touch: unknown broker", |st, fx| expect!(
        st.touch(DisconnectParams {
            broker: b("b-none"),
            ..aff("n1", "s2", at(1_000))
        })
        .await,
        Ok(false)
    ));
    case!(
        c,
        "touch: the holder at now = i64::MIN moves nothing back",
        |st, fx| expect!(
            st.touch(aff("n1", "s2", Some(Timestamp::from_micros(i64::MIN))))
                .await,
            Ok(true)
        )
    );
    c
}

/// Runs every store case on `store` (fixture first), comparing a snapshot around each.
async fn run_store_cases(label: &str, store: &dyn Store) -> usize {
    let fx = fixture(store).await;
    let cases = store_cases();
    let count = cases.len();
    let mut failures = Vec::new();
    for (name, case) in cases {
        let before = snapshot(store).await;
        let outcome = AssertUnwindSafe(case(store, &fx)).catch_unwind().await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("[{label}] {name}: {e}")),
            Err(_) => failures.push(format!("[{label}] {name}: panicked")),
        }
        let after = snapshot(store).await;
        if before != after {
            failures.push(format!("[{label}] {name}: changed the store"));
        }
    }
    assert!(
        failures.is_empty(),
        "bad-input cases failed:\n{}",
        failures.join("\n")
    );
    count
}

#[tokio::test]
async fn store_entry_points_on_memory() {
    let n = run_store_cases("memory", &MemoryStore::new()).await;
    eprintln!("store cases on memory: {n}");
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn store_entry_points_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = broker_dispatch::store::SqliteStore::open(dir.path().join("d.db")).unwrap();
    let n = run_store_cases("sqlite", &store).await;
    eprintln!("store cases on sqlite: {n}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn store_entry_points_on_postgres() {
    let Some(db) = pg::fresh() else { return };
    let store = pg_store(&db).await;
    let n = run_store_cases("postgres", &store).await;
    eprintln!("store cases on postgres: {n}");
}

#[cfg(feature = "postgres")]
async fn pg_store(db: &pg::TestDb) -> broker_dispatch::store::PgStore {
    use broker_dispatch::store::{PgStore, PgStoreOptions};
    let store = PgStore::connect(
        &db.dsn,
        PgStoreOptions {
            schema: db.schema.clone(),
            channel_prefix: db.schema.clone(),
            ..PgStoreOptions::default()
        },
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// Extreme timestamps and durations in valid calls: they change the store (that is their
/// job), so each runs on a fresh store and checks that nothing wrapped.
async fn run_extremes(
    label: &str,
    fresh: &dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>>>>,
) -> usize {
    let max = Timestamp::MAX;
    let min = Timestamp::from_micros(i64::MIN);
    let mut failures: Vec<String> = Vec::new();
    let mut count = 0;
    let mut check = |name: &str, r: CaseResult| {
        count += 1;
        if let Err(e) = r {
            failures.push(format!("[{label}] {name}: {e}"));
        }
    };

    let st = fresh().await;
    st.insert(new_row("b1", 0)).await.unwrap();
    let got = st
        .claim(ClaimParams {
            now: Some(max),
            ..claim_on("b1", LONG_LEASE, 0)
        })
        .await;
    check(
        "claim at Timestamp::MAX: the lease saturates",
        match got.as_deref() {
            Ok([c]) if c.dispatch().lease_until == Some(max) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    let st = fresh().await;
    st.insert(new_row("b1", 0)).await.unwrap();
    let c = claim_one(&*st, "b1", LONG_LEASE, 10).await;
    let r = st.heartbeat(&c, hb(Duration::MAX, at(20))).await;
    check(
        "heartbeat with lease Duration::MAX saturates",
        match &r {
            Ok(d) if d.lease_until == Some(max) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let r = st
        .finish(
            c,
            FinishParams {
                outcome: Outcome::Retry {
                    after: Duration::MAX,
                },
                now: at(30),
            },
        )
        .await;
    check(
        "retry after Duration::MAX saturates",
        match &r {
            Ok(d) if d.available_at == max && d.state == DispatchState::Pending => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    let st = fresh().await;
    st.insert(NewDispatch {
        deadline: Some(min),
        ..new_row("b1", 0)
    })
    .await
    .unwrap();
    let got = st.claim(claim_on("b1", LONG_LEASE, 10)).await;
    check(
        "deadline i64::MIN is never claimed",
        expect!(got.as_deref().map(<[Claimed]>::len), Ok(0)),
    );
    let r = st
        .sweep(SweepParams {
            retention: LONG_LEASE,
            limit: 10,
            now: at(20),
        })
        .await;
    check(
        "deadline i64::MIN is expired by the sweep",
        match &r {
            Ok(r) if r.expired.len() == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    let st = fresh().await;
    st.insert(NewDispatch {
        available_at: Some(max),
        ..new_row("b1", 0)
    })
    .await
    .unwrap();
    let got = st
        .claim(ClaimParams {
            now: Some(Timestamp::from_micros(i64::MAX - 1)),
            ..claim_on("b1", LONG_LEASE, 0)
        })
        .await;
    check(
        "available_at Timestamp::MAX is not claimable before it",
        expect!(got.as_deref().map(<[Claimed]>::len), Ok(0)),
    );

    let st = fresh().await;
    let params = |session: &str, when: Timestamp| ConnectParams {
        broker: b("b-aff"),
        node: n("n1"),
        session: s(session),
        connected_at: Some(when),
        now: at(0),
    };
    let first = st.connect(params("s-max", max)).await;
    let later = st
        .connect(params("s-now", Timestamp::from_micros(T0)))
        .await;
    check(
        "connect at Timestamp::MAX is refused and pins nothing",
        match (&first, &later) {
            (Err(StoreError::InvalidInput(_)), Ok(ConnectOutcome::Claimed(_))) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        failures.is_empty(),
        "extreme-value cases failed:\n{}",
        failures.join("\n")
    );
    count
}

#[tokio::test]
async fn extreme_times_on_memory_and_sqlite() {
    let n = run_extremes("memory", &|| {
        Box::pin(async { Arc::new(MemoryStore::new()) as Arc<dyn Store> })
    })
    .await;
    #[cfg(feature = "sqlite")]
    let n = n + run_extremes("sqlite", &|| {
        Box::pin(async {
            Arc::new(broker_dispatch::store::SqliteStore::open_in_memory().unwrap())
                as Arc<dyn Store>
        })
    })
    .await;
    eprintln!("extreme-value cases: {n}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn extreme_times_on_postgres() {
    if pg::fresh().is_none() {
        return;
    }
    let n = run_extremes("postgres", &|| {
        Box::pin(async {
            let db = pg::fresh().unwrap();
            Arc::new(pg_store(&db).await) as Arc<dyn Store>
        })
    })
    .await;
    eprintln!("extreme-value cases on postgres: {n}");
}

// ---------------------------------------------------------------------------------------------
// Hub entry points.

type HubCase = Box<dyn for<'a> Fn(&'a Hub) -> BoxFut<'a> + Send + Sync>;

fn mk_hub<F>(f: F) -> HubCase
where
    F: for<'a> Fn(&'a Hub) -> BoxFut<'a> + Send + Sync + 'static,
{
    Box::new(f)
}

macro_rules! hub_case {
    ($cases:ident, $name:literal, |$hub:ident| $body:expr) => {
        $cases.push(($name, mk_hub(|$hub| Box::pin(async move { $body }))));
    };
}

fn cmd(broker: &str, op: &str) -> Command {
    Command::new(b(broker), op, json!({}))
}

fn hub_cases() -> Vec<(&'static str, HubCase)> {
    let mut c: Vec<(&'static str, HubCase)> = Vec::new();
    hub_case!(c, "dispatch: empty op", |h| expect!(
        h.dispatch(cmd("b-remote", "")).await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "dispatch: op of 257 bytes", |h| expect!(
        h.dispatch(cmd("b-remote", &"o".repeat(257))).await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "dispatch: op with a control char", |h| expect!(
        h.dispatch(cmd("b-local", "a\u{1b}[2J")).await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "dispatch: zero max_attempts", |h| expect!(
        h.dispatch(cmd("b-local", "op").max_attempts(0)).await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "dispatch: empty idempotency key", |h| expect!(
        h.dispatch(cmd("b-remote", "op").idempotency_key("")).await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "dispatch: idempotency key of 257 bytes", |h| expect!(
        h.dispatch(cmd("b-remote", "op").idempotency_key("k".repeat(257)))
            .await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(
        c,
        "dispatch: oversized args to a parked broker",
        |h| expect!(
            h.dispatch(Command::new(
                b("b-remote"),
                "op",
                json!("a".repeat(MAX_ARGS_BYTES))
            ))
            .await,
            // Refused at the hub's door, whatever the route, before the store is asked.
            Err(Error::InvalidInput(_))
        )
    );
    hub_case!(c, "send: empty op", |h| expect!(
        h.send(cmd("b-local", "")).await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "send: zero max_attempts", |h| expect!(
        h.send(cmd("b-remote", "op").max_attempts(0)).await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "send: oversized args", |h| expect!(
        h.send(Command::new(
            b("b-local"),
            "op",
            json!("a".repeat(MAX_ARGS_BYTES))
        ))
        .await,
        Err(Error::InvalidInput(_))
    ));
    hub_case!(c, "wait: unknown id", |h| expect!(
        h.wait(DispatchId::new()).await,
        Err(Error::Store(StoreError::NotFound(_)))
    ));
    hub_case!(c, "get: unknown id", |h| expect!(
        h.get(DispatchId::new()).await,
        Ok(None)
    ));
    hub_case!(c, "connect_at: older than the current owner", |h| {
        let r = h
            .connect_at(b("b-local"), s("s1"), (), Timestamp::from_micros(T0))
            .await;
        expect!(r, Err(Error::Superseded))?;
        expect!(h.is_connected(&b("b-local")), true)
    });
    hub_case!(c, "connect_at: i64::MIN", |h| expect!(
        h.connect_at(b("b-local"), s("s0"), (), Timestamp::from_micros(i64::MIN))
            .await,
        Err(Error::Superseded)
    ));
    hub_case!(c, "connect_at: Timestamp::MAX cannot pin the broker", |h| {
        let r = h
            .connect_at(b("b-pinned"), s("s-max"), (), Timestamp::MAX)
            .await;
        expect!(r, Err(Error::Store(StoreError::InvalidInput(_))))?;
        expect!(h.is_connected(&b("b-pinned")), false)
    });
    hub_case!(c, "disconnect: mismatched session", |h| {
        expect!(h.disconnect(&b("b-local"), &s("s1")).await, Ok(false))?;
        expect!(h.is_connected(&b("b-local")), true)
    });
    hub_case!(c, "disconnect: unknown broker", |h| expect!(
        h.disconnect(&b("b-none"), &s("s2")).await,
        Ok(false)
    ));
    c
}

fn quick_config() -> HubConfig {
    HubConfig {
        lease: Duration::from_secs(5),
        wait_window: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        sweep_interval: Duration::from_millis(100),
        ..HubConfig::default()
    }
}

async fn run_hub_cases(label: &str, store: Arc<dyn Store>) -> usize {
    let hub = Hub::builder(n("h1"))
        .store(Arc::clone(&store))
        .executor(recorder("h1"))
        .config(quick_config())
        .start()
        .await
        .expect("start");
    hub.connect_at(b("b-local"), s("s2"), (), Timestamp::from_micros(T0 + 100))
        .await
        .expect("connect");
    let cases = hub_cases();
    let mut count = cases.len();
    let mut failures = Vec::new();
    for (name, case) in cases {
        let before = snapshot(&*store).await;
        match AssertUnwindSafe(case(&hub)).catch_unwind().await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("[{label}] {name}: {e}")),
            Err(_) => failures.push(format!("[{label}] {name}: panicked")),
        }
        // The affinity refresher may advance `last_seen`; compare everything else.
        let (rows, affinity) = before;
        let (rows_after, affinity_after) = snapshot(&*store).await;
        let strip = |a: Vec<Option<Affinity>>| -> Vec<_> {
            a.into_iter()
                .map(|a| a.map(|a| (a.broker, a.node, a.session, a.connected_at)))
                .collect()
        };
        if rows != rows_after || strip(affinity) != strip(affinity_after) {
            failures.push(format!("[{label}] {name}: changed the store"));
        }
    }
    // A stopped hub refuses everything; a second hub without brokers, so stopping it changes
    // nothing in the store.
    let stopped = Hub::builder(n("h2"))
        .store(Arc::clone(&store))
        .executor(recorder("h2"))
        .config(quick_config())
        .start()
        .await
        .expect("start");
    stopped.shutdown().await.expect("shutdown");
    let before = snapshot(&*store).await.0;
    for (name, r) in [
        (
            "dispatch after shutdown",
            stopped.dispatch(cmd("b-local", "op")).await.map(|_| ()),
        ),
        (
            "send after shutdown",
            stopped.send(cmd("b-local", "op")).await.map(|_| ()),
        ),
        (
            "connect after shutdown",
            stopped.connect(b("b-new"), s("s1"), ()).await,
        ),
    ] {
        count += 1;
        if let Err(e) = expect!(r, Err(Error::ShuttingDown)) {
            failures.push(format!("[{label}] {name}: {e}"));
        }
    }
    if snapshot(&*store).await.0 != before {
        failures.push(format!(
            "[{label}] calls on a stopped hub changed the store"
        ));
    }
    hub.shutdown().await.expect("shutdown");
    assert!(
        failures.is_empty(),
        "bad-input cases failed:\n{}",
        failures.join("\n")
    );
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_entry_points_on_memory_and_sqlite() {
    let n = run_hub_cases("memory", Arc::new(MemoryStore::new())).await;
    #[cfg(feature = "sqlite")]
    let n = n + {
        let dir = tempfile::tempdir().unwrap();
        let store = broker_dispatch::store::SqliteStore::open(dir.path().join("h.db")).unwrap();
        run_hub_cases("sqlite", Arc::new(store)).await
    };
    eprintln!("hub cases: {n}");
}

/// Durations far beyond any sensible setting are valid (only zero is refused), so the hub must
/// saturate them rather than panic: a send with a TTL of `Duration::MAX`, waited on with an
/// unbounded window, and a shutdown with an unbounded grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_with_every_duration_at_max_runs_and_stops() {
    let max = Duration::MAX;
    let config = HubConfig {
        lease: max,
        freshness: max,
        wait_window: max,
        wait_hard_cap: None,
        send_ttl: max,
        poll_interval: max,
        sweep_interval: max,
        retention: max,
        execute_timeout: max,
        store_timeout: max,
        shutdown_timeout: max,
        ..HubConfig::default()
    };
    let store = Arc::new(MemoryStore::new());
    // Polling never comes with these settings: the in-process transport carries the events.
    let hub = Hub::builder(n("h1"))
        .store(store.clone())
        .transport(Arc::new(broker_dispatch::transport::MemoryTransport::new()))
        .executor(recorder("h1"))
        .config(config)
        .start()
        .await
        .expect("start");
    let bounded = |what: &'static str| move |e| panic!("{what} hung: {e:?}");
    let run = async {
        // Sent before the broker connects, so each wait really waits (and computes its
        // jittered poll); several, because the jitter only overflows when it stretches.
        for i in 0..12 {
            let broker = format!("b{i}");
            let receipt = hub.send(cmd(&broker, "op")).await.expect("send");
            assert_eq!(receipt.dispatch.deadline, Some(Timestamp::MAX));
            let (out, connected) = tokio::join!(hub.wait(receipt.id), async {
                tokio::task::yield_now().await;
                hub.connect(b(&broker), s("s1"), ()).await
            });
            connected.expect("connect");
            assert_eq!(out.expect("wait")["node"], "h1");
        }
        let local = hub.dispatch(cmd("b0", "op")).await.expect("local dispatch");
        assert_eq!(local["node"], "h1");
        hub.shutdown().await.expect("shutdown");
    };
    tokio::time::timeout(
        Duration::from_secs(20),
        AssertUnwindSafe(run).catch_unwind(),
    )
    .await
    .unwrap_or_else(bounded("the hub"))
    .expect("nothing panics");
}

// ---------------------------------------------------------------------------------------------
// Opening stores.

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_open_refuses_what_is_not_a_database_and_touches_nothing() {
    use broker_dispatch::store::{SqliteOptions, SqliteStore};
    let dir = tempfile::tempdir().unwrap();
    let not_db = dir.path().join("notes.txt");
    let text = "not a database\n".repeat(300);
    std::fs::write(&not_db, &text).unwrap();
    let real = dir.path().join("real.db");
    drop(SqliteStore::open(&real).unwrap());
    let truncated = dir.path().join("truncated.db");
    let bytes = std::fs::read(&real).unwrap();
    std::fs::write(&truncated, &bytes[..100.min(bytes.len())]).unwrap();
    let missing_dir = dir.path().join("no-such-dir");
    let missing_file = dir.path().join("missing.db");

    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep')")
        .unwrap();
    let fg = foreign.clone();
    let d = dir.path().to_path_buf();
    let nd = not_db.clone();
    let tr = truncated.clone();
    let md = missing_dir.clone();
    let mf = missing_file.clone();
    let txt = text.clone();
    let cases: Vec<SyncCase> = vec![
        (
            "open a directory",
            Box::new(move || expect!(SqliteStore::open(&d), Err(StoreError::Backend(_)))),
        ),
        (
            "open a file that is not a database",
            Box::new(move || {
                expect!(SqliteStore::open(&nd), Err(StoreError::Backend(_)))?;
                expect!(std::fs::read_to_string(&nd).ok() == Some(txt.clone()), true)
            }),
        ),
        (
            "open a truncated database",
            Box::new(move || expect!(SqliteStore::open(&tr), Err(StoreError::Backend(_)))),
        ),
        (
            "open a path in a missing directory",
            Box::new(move || {
                expect!(
                    SqliteStore::open(md.join("d.db")),
                    Err(StoreError::Backend(_))
                )?;
                expect!(md.exists(), false)
            }),
        ),
        (
            "open read-only a missing file",
            Box::new(move || {
                expect!(
                    SqliteOptions::new().read_only(true).open(&mf),
                    Err(StoreError::Backend(_))
                )?;
                expect!(mf.exists(), false)
            }),
        ),
        (
            "open an empty path",
            Box::new(|| expect!(SqliteStore::open(""), Err(StoreError::InvalidInput(_)))),
        ),
        (
            "open another application's database",
            Box::new(move || {
                let before = std::fs::read(&fg).map_err(|e| e.to_string())?;
                expect!(SqliteStore::open(&fg), Err(StoreError::InvalidInput(_)))?;
                expect!(std::fs::read(&fg).ok() == Some(before), true)
            }),
        ),
        (
            "open a path with NUL",
            Box::new(|| {
                expect!(
                    SqliteStore::open("bad\0name.db"),
                    Err(StoreError::Backend(_) | StoreError::InvalidInput(_))
                )
            }),
        ),
    ];
    let n = run_sync(cases);
    assert_eq!(
        std::fs::read(&truncated).unwrap(),
        &bytes[..100.min(bytes.len())],
        "the truncated file was rewritten"
    );
    eprintln!("sqlite open cases: {n}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_dsns_and_options_are_typed_within_a_bound() {
    use broker_dispatch::store::{PgStore, PgStoreOptions};
    use broker_dispatch::transport::{PgTransport, PgTransportOptions};
    use broker_dispatch::TransportError;
    let quick = || PgStoreOptions {
        connect_timeout: Duration::from_secs(2),
        ..PgStoreOptions::default()
    };
    // A port nothing listens on: bound, then released.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed = format!("postgres://u@127.0.0.1:{closed_port}/db");
    let store_cases: Vec<ConnectCase<PgStoreOptions, StoreError>> = vec![
        ("store: empty DSN", String::new(), quick(), |e| {
            matches!(e, StoreError::InvalidInput(_))
        }),
        ("store: garbage DSN", "garbage".into(), quick(), |e| {
            matches!(e, StoreError::InvalidInput(_))
        }),
        (
            "store: wrong scheme",
            "mysql://u@127.0.0.1/db".into(),
            quick(),
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: port out of range",
            "postgres://u@127.0.0.1:99999999/db".into(),
            quick(),
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: key=value with a bad port",
            "host=127.0.0.1 port=notaport".into(),
            quick(),
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: bad connect_timeout parameter",
            "postgres://u@127.0.0.1/db?connect_timeout=soon".into(),
            quick(),
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        ("store: unreachable port", closed.clone(), quick(), |e| {
            matches!(e, StoreError::Unavailable(_))
        }),
        (
            "store: bad schema name",
            closed.clone(),
            PgStoreOptions {
                schema: "Bad Schema".into(),
                ..quick()
            },
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: bad channel prefix",
            closed.clone(),
            PgStoreOptions {
                channel_prefix: "bad-prefix".into(),
                ..quick()
            },
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: zero statement_timeout",
            closed.clone(),
            PgStoreOptions {
                statement_timeout: Some(Duration::ZERO),
                ..quick()
            },
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: statement_timeout under 1 ms",
            closed.clone(),
            PgStoreOptions {
                statement_timeout: Some(Duration::from_micros(999)),
                ..quick()
            },
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: zero connect_timeout",
            closed.clone(),
            PgStoreOptions {
                connect_timeout: Duration::ZERO,
                ..quick()
            },
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
        (
            "store: connect_timeout under 1 ms",
            closed.clone(),
            PgStoreOptions {
                connect_timeout: Duration::from_micros(999),
                ..quick()
            },
            |e| matches!(e, StoreError::InvalidInput(_)),
        ),
    ];
    let mut failures = Vec::new();
    let mut count = 0;
    for (name, dsn, options, ok) in store_cases {
        count += 1;
        let started = std::time::Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(10),
            AssertUnwindSafe(PgStore::connect(&dsn, options)).catch_unwind(),
        )
        .await
        {
            Err(_) => failures.push(format!("{name}: no answer within 10 s")),
            Ok(Err(_)) => failures.push(format!("{name}: panicked")),
            Ok(Ok(Ok(_))) => failures.push(format!("{name}: connected")),
            Ok(Ok(Err(e))) if ok(&e) => {}
            Ok(Ok(Err(e))) => failures.push(format!(
                "{name}: wrong variant {e:?} after {:?}",
                started.elapsed()
            )),
        }
    }
    let topts = || PgTransportOptions {
        connect_timeout: Duration::from_secs(2),
        ..PgTransportOptions::default()
    };
    let transport_cases: Vec<ConnectCase<PgTransportOptions, TransportError>> = vec![
        ("transport: empty DSN", String::new(), topts(), |e| {
            matches!(e, TransportError::Backend(_))
        }),
        ("transport: garbage DSN", "garbage".into(), topts(), |e| {
            matches!(e, TransportError::Backend(_))
        }),
        (
            "transport: unreachable port",
            closed.clone(),
            topts(),
            |e| matches!(e, TransportError::Unavailable(_)),
        ),
        (
            "transport: bad channel prefix",
            closed.clone(),
            PgTransportOptions {
                channel_prefix: "Bad".into(),
                ..topts()
            },
            |e| matches!(e, TransportError::Payload(_)),
        ),
    ];
    for (name, dsn, options, ok) in transport_cases {
        count += 1;
        match tokio::time::timeout(
            Duration::from_secs(10),
            AssertUnwindSafe(PgTransport::connect(&dsn, options)).catch_unwind(),
        )
        .await
        {
            Err(_) => failures.push(format!("{name}: no answer within 10 s")),
            Ok(Err(_)) => failures.push(format!("{name}: panicked")),
            Ok(Ok(Ok(_))) => failures.push(format!("{name}: connected")),
            Ok(Ok(Err(e))) if ok(&e) => {}
            Ok(Ok(Err(e))) => failures.push(format!("{name}: wrong variant {e:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "bad-input cases failed:\n{}",
        failures.join("\n")
    );
    eprintln!("postgres DSN and option cases: {count}");
}

/// Garbage on the notification channels (sent with `pg_notify` by a foreign session): each is
/// ignored, the listener stays on the same connection, nothing is written, and the next
/// dispatch still completes, carried by notices alone (polling is slower than the bound).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_notify_payloads_are_ignored_and_notices_keep_flowing() {
    use broker_dispatch::store::{PgStore, PgStoreOptions};
    use broker_dispatch::transport::{PgTransport, PgTransportOptions};
    let Some(db) = pg::fresh() else { return };
    let config = HubConfig {
        poll_interval: Duration::from_secs(120),
        sweep_interval: Duration::from_secs(120),
        wait_window: Duration::from_secs(60),
        ..quick_config()
    };
    let mut hubs = Vec::new();
    let mut transports = Vec::new();
    let mut store = None;
    for name in ["owner", "origin"] {
        let s = PgStore::connect(
            &db.dsn,
            PgStoreOptions {
                schema: db.schema.clone(),
                channel_prefix: db.schema.clone(),
                ..PgStoreOptions::default()
            },
        )
        .await
        .unwrap();
        s.migrate().await.unwrap();
        let t = PgTransport::connect(
            &db.dsn,
            PgTransportOptions {
                channel_prefix: db.schema.clone(),
                ..PgTransportOptions::default()
            },
        )
        .await
        .unwrap();
        transports.push(t.clone());
        store.get_or_insert_with(|| s.clone());
        hubs.push(
            Hub::builder(n(name))
                .store(Arc::new(s))
                .transport(Arc::new(t))
                .executor(recorder(name))
                .config(config.clone())
                .start()
                .await
                .unwrap(),
        );
    }
    let store = store.unwrap();
    hubs[0].connect(b("nb"), s("s1"), ()).await.unwrap();
    let admin = pg::client(&db.dsn).await;
    let signal = format!("{}_signal", db.schema);
    let event = format!("{}_event", db.schema);
    let pids: Vec<_> = transports.iter().map(PgTransport::listener_pid).collect();
    let cases: Vec<(&'static str, &String, String)> = vec![
        ("signal with a newline", &signal, "bad\nbroker".into()),
        ("signal of 300 bytes", &signal, "b".repeat(300)),
        ("signal of 7999 bytes", &signal, "x".repeat(7999)),
        ("signal with DEL", &signal, "b\u{7f}".into()),
        (
            "signal with an escape sequence",
            &signal,
            "\u{1b}[2J".into(),
        ),
        ("event that is not a uuid", &event, "not-a-uuid".into()),
        ("event that is empty", &event, String::new()),
        (
            "event with a bad hex digit",
            &event,
            "0190a0b0-0000-7000-8000-00000000000g".into(),
        ),
        (
            "event that is JSON",
            &event,
            r#"{"t":"event","id":"x"}"#.into(),
        ),
    ];
    let count = cases.len();
    let mut failures = Vec::new();
    for (i, (name, channel, payload)) in cases.into_iter().enumerate() {
        let before = snapshot(&store).await.0;
        admin
            .execute("SELECT pg_notify($1, $2)", &[channel, &payload])
            .await
            .unwrap();
        let out = tokio::time::timeout(
            Duration::from_secs(15),
            hubs[1].dispatch(Command::new(b("nb"), "op", json!({ "case": i }))),
        )
        .await;
        match out {
            Ok(Ok(v)) if v["node"] == "owner" => {}
            other => failures.push(format!("{name}: the next dispatch got {other:?}")),
        }
        let after = snapshot(&store).await.0;
        let new: Vec<_> = after.iter().filter(|d| !before.contains(d)).collect();
        if after.len() != before.len() + 1 || new.len() != 1 || new[0].args != json!({ "case": i })
        {
            failures.push(format!(
                "{name}: the store changed beyond the one dispatch: {new:?}"
            ));
        }
        let now: Vec<_> = transports.iter().map(PgTransport::listener_pid).collect();
        if now != pids {
            failures.push(format!(
                "{name}: a listener reconnected ({pids:?} -> {now:?})"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "bad-input cases failed:\n{}",
        failures.join("\n")
    );
    eprintln!("malformed NOTIFY cases: {count}");
}
