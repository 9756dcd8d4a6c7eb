//! Copies a SQLite deployment's dispatches and broker affinity into Postgres, exactly and
//! idempotently (`broker_dispatch::migrate::sqlite_to_postgres`).
//!
//! ```text
//! cargo run --features postgres --example migrate -- \
//!     --from sqlite:///var/lib/hub/dispatch.db --to postgres://user:pw@db/hub \
//!     [--schema broker_dispatch] [--batch 500] [--drop-source]
//! ```
//!
//! Stop the hubs using the SQLite file first. A rerun copies nothing new; a destination that
//! holds a row with the same key and different content is refused with nothing written.
//! `--drop-source` deletes the file and its `-wal`/`-shm`/`-journal` companions after the copy
//! has committed. Exit status: 0 copied, 1 refused or failed, 2 bad arguments.

use broker_dispatch::migrate::{sqlite_to_postgres, MigrateOptions};

/// Copies a SQLite deployment into Postgres, exactly and idempotently.
#[derive(Debug, clap::Parser)]
#[command(name = "migrate")]
struct Cli {
    /// The SQLite database: a path, `sqlite:PATH` or `file:PATH`.
    #[arg(long, value_name = "SQLITE_DSN")]
    from: String,
    /// The Postgres database: `postgres://…`.
    #[arg(long, value_name = "POSTGRES_URL")]
    to: String,
    /// The destination schema.
    #[arg(long, default_value = "broker_dispatch")]
    schema: String,
    /// Rows per page read from the source.
    #[arg(long, value_name = "N")]
    batch: Option<u32>,
    /// Delete the SQLite file and its companions after the copy commits.
    #[arg(long)]
    drop_source: bool,
}

fn main() {
    let cli = <Cli as clap::Parser>::parse();
    let mut opts = MigrateOptions {
        schema: cli.schema,
        drop_source: cli.drop_source,
        ..MigrateOptions::default()
    };
    if let Some(batch) = cli.batch {
        opts.batch = batch;
    }
    let (from, to) = (cli.from, cli.to);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(sqlite_to_postgres(&from, &to, &opts)) {
        Ok(r) => {
            println!(
                "migrated {}: dispatches read={} copied={} already_present={}; \
                 affinity read={} copied={} already_present={}{}",
                r.source.display(),
                r.dispatches_read,
                r.dispatches_copied,
                r.dispatches_present,
                r.affinity_read,
                r.affinity_copied,
                r.affinity_present,
                if r.source_removed {
                    "; source removed"
                } else {
                    ""
                }
            );
            for id in &r.dispatches_quarantined {
                println!("quarantined {id}: its args could not be decoded with the source codec");
            }
        }
        Err(e) => {
            eprintln!("migration failed: {e}");
            std::process::exit(1);
        }
    }
}
