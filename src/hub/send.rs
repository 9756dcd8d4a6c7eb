//! Durable fire-and-forget: `Hub::send`, `send_many`, `send_in` (inside the caller's
//! transaction) and `announce`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use tracing::Instrument;

use super::{Command, Hub, Receipt};
use crate::error::Error;
use crate::fsm::BrokerId;

impl Hub {
    /// Durable fire-and-forget: writes the dispatch (deadline `send_ttl` from now unless the
    /// command sets one), then runs it here if the broker is connected here, or signals its
    /// owner. Returns once the row is durable; execution is at-least-once, like any dispatch.
    /// Never uses the HTTP fallback and ignores [`UndeliverablePolicy`](super::UndeliverablePolicy): a message for an absent
    /// broker waits for it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`], [`Error::ShuttingDown`], store errors (then nothing was
    /// written, or — for a timeout — the write may have landed: resend with the same
    /// idempotency key to be sure).
    pub async fn send(&self, cmd: Command) -> Result<Receipt, Error> {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let max_attempts = self.validate(&cmd)?;
        let id = sh.id_for(&cmd);
        let span =
            tracing::debug_span!("send", node = %sh.node, broker = %cmd.broker, op = %cmd.op, %id);
        let new = self.new_dispatch(cmd, id, max_attempts, 0, sh.config.send_ttl);
        let d = self.write(new).instrument(span).await?;
        Ok(Receipt {
            id: d.id,
            dispatch: d,
        })
    }

    /// [`send`](Hub::send) inside the caller's own Postgres transaction (`postgres` feature):
    /// the row is written through `client` (e.g. a `tokio_postgres::Transaction`, or a
    /// `deadpool_postgres` one from [`PgStore::pool`](crate::store::PgStore::pool)), so it
    /// exists if and only if the caller's transaction commits, together with the caller's own
    /// writes. After the commit, [`announce`](Hub::announce) the receipt (a no-op when the
    /// store's NOTIFY, sent in the transaction, already woke the owner) and
    /// [`wait`](Hub::wait) for its id if the result is wanted.
    ///
    /// The hub's store must be a [`PgStore`](crate::store::PgStore), and `client` connected to
    /// its database.
    ///
    /// ```no_run
    /// # use broker_dispatch::{fsm::BrokerId, hub::{Command, Hub}, store::PgStore};
    /// # async fn f(hub: Hub, pg: PgStore) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut conn = pg.pool().get().await?;
    /// let tx = conn.transaction().await?;
    /// tx.execute("UPDATE accounts SET state = 'restarting' WHERE id = 7", &[]).await?;
    /// let receipt = hub
    ///     .send_in(&*tx, Command::new(BrokerId::new("b1")?, "restart", serde_json::json!({})))
    ///     .await?;
    /// tx.commit().await?; // the command exists only if the update does
    /// hub.announce(&receipt).await;
    /// let result = hub.wait(receipt.id).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid command or a hub whose store is not Postgres;
    /// as [`PgStore::insert_in`](crate::store::PgStore::insert_in). After an error the
    /// caller's transaction is aborted (Postgres semantics): roll it back.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn send_in<C>(&self, client: &C, cmd: Command) -> Result<Receipt, Error>
    where
        C: tokio_postgres::GenericClient + Sync,
    {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let Some(pg) = sh
            .store
            .as_any()
            .and_then(|s| s.downcast_ref::<crate::store::PgStore>())
        else {
            return Err(Error::InvalidInput(format!(
                "send_in needs a Postgres store; this hub's is {}",
                sh.store.name()
            )));
        };
        let max_attempts = self.validate(&cmd)?;
        let id = sh.id_for(&cmd);
        let new = self.new_dispatch(cmd, id, max_attempts, 0, sh.config.send_ttl);
        let d = sh.bounded(pg.insert_in(client, new)).await?;
        Ok(Receipt {
            id: d.id,
            dispatch: d,
        })
    }

    /// Tells the broker's owner about a dispatch written outside the hub's own calls (by
    /// [`send_in`](Hub::send_in) in a transaction now committed): a drain here if the broker
    /// is connected here, otherwise a signal on the transport unless the store's insert already
    /// sent one. Harmless to repeat; skipping it costs latency (the owner's poll finds the
    /// row), never the row.
    pub async fn announce(&self, receipt: &Receipt) {
        metrics::counter!("broker_dispatch_published_total").increment(1);
        self.announce_broker(&receipt.dispatch.broker).await;
    }

    /// [`send`](Hub::send) for many commands at once: every row is written atomically (all or
    /// none; one transaction on SQLite, one statement on Postgres), then each broker's owner is
    /// told once. The receipts are in input order.
    ///
    /// # Errors
    ///
    /// As [`send`](Hub::send); an invalid command fails the whole batch before anything is
    /// written, and a conflict (an id or idempotency key reused with another payload) writes
    /// none of it.
    pub async fn send_many(&self, cmds: Vec<Command>) -> Result<Vec<Receipt>, Error> {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let mut batch = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let max_attempts = self.validate(&cmd)?;
            let id = sh.id_for(&cmd);
            batch.push(self.new_dispatch(cmd, id, max_attempts, 0, sh.config.send_ttl));
        }
        let rows = sh.bounded(sh.store.insert_many(batch)).await?;
        metrics::counter!("broker_dispatch_published_total").increment(rows.len() as u64);
        let brokers: BTreeSet<BrokerId> = rows.iter().map(|d| d.broker.clone()).collect();
        for broker in &brokers {
            self.announce_broker(broker).await;
        }
        Ok(rows
            .into_iter()
            .map(|d| Receipt {
                id: d.id,
                dispatch: d,
            })
            .collect())
    }
}
