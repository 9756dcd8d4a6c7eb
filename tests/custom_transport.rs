//! The transport conformance suite run against `examples/custom_transport.rs`, a transport
//! written outside the crate: what a third party does to prove their transport.

#![cfg(feature = "conformance")]

#[allow(dead_code)]
#[path = "../examples/custom_transport.rs"]
mod custom_transport;

use async_trait::async_trait;
use broker_dispatch::transport::conformance::{Capabilities, TransportHarness};
use custom_transport::{TcpHub, TcpTransport};

struct TcpHarness {
    hub: TcpHub,
}

#[async_trait]
impl TransportHarness for TcpHarness {
    type Transport = TcpTransport;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivers: true,
            can_drop_connection: true,
            namespaces: false,
        }
    }

    async fn node(&self) -> TcpTransport {
        TcpTransport::connect(self.hub.addr())
            .await
            .expect("join the hub")
    }

    async fn drop_connection(&self, node: &TcpTransport) {
        node.drop_connection().await;
    }
}

async fn harness() -> Option<TcpHarness> {
    Some(TcpHarness {
        hub: TcpHub::bind().await.expect("bind the hub"),
    })
}

broker_dispatch::transport_conformance!(tcp_hub, harness());
