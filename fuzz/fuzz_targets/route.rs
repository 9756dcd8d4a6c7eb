//! Arbitrary route inputs: `route` never panics and matches the DESIGN §4 table, restated here.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use broker_dispatch::fsm::{
    route, Affinity, BrokerId, NodeId, Route, RouteInput, SessionId, Timestamp,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    this_node: Name,
    connected_here: bool,
    affinity: Option<AffinityInput>,
    now: i64,
    freshness_us: u64,
    has_http_endpoint: bool,
}

#[derive(Debug, Arbitrary)]
struct AffinityInput {
    node: Option<Name>,
    session: Name,
    connected_at: i64,
    last_seen: i64,
}

/// Names from a small pool (so owners often equal this node), or arbitrary text.
#[derive(Debug, Arbitrary)]
enum Name {
    Pool(u8),
    Text(String),
}

impl Name {
    fn id(&self) -> String {
        match self {
            Name::Pool(i) => format!("n{}", i % 3),
            Name::Text(s) if NodeId::new(s.as_str()).is_ok() => s.clone(),
            Name::Text(_) => "fallback".to_owned(),
        }
    }
}

/// The §4 table. "Fresh" is `now - last_seen < freshness`, with the age taken as zero when
/// `last_seen` is ahead of `now` (another node's clock may run ahead).
fn table(i: &Input, this: &NodeId, a: Option<&Affinity>) -> Route {
    if i.connected_here {
        return Route::Local;
    }
    if let Some(a) = a {
        if let Some(owner) = &a.node {
            let age = (i128::from(i.now) - i128::from(a.last_seen.as_micros())).max(0);
            if owner != this && age < i128::from(i.freshness_us) {
                return Route::Forward {
                    owner: owner.clone(),
                };
            }
        }
    }
    if i.has_http_endpoint {
        Route::Http
    } else {
        Route::Undeliverable
    }
}

fuzz_target!(|i: Input| {
    let this = NodeId::new(i.this_node.id()).unwrap();
    let affinity = i.affinity.as_ref().map(|a| Affinity {
        broker: BrokerId::new("broker").unwrap(),
        node: a.node.as_ref().map(|n| NodeId::new(n.id()).unwrap()),
        session: SessionId::new(a.session.id()).unwrap(),
        connected_at: Timestamp::from_micros(a.connected_at),
        last_seen: Timestamp::from_micros(a.last_seen),
    });
    let got = route(&RouteInput {
        this_node: &this,
        connected_here: i.connected_here,
        affinity: affinity.as_ref(),
        now: Timestamp::from_micros(i.now),
        freshness: Duration::from_micros(i.freshness_us),
        has_http_endpoint: i.has_http_endpoint,
    });
    assert_eq!(got, table(&i, &this, affinity.as_ref()), "input {i:?}");
});
