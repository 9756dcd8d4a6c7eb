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

const USAGE: &str = "usage: migrate --from SQLITE_DSN --to POSTGRES_URL [--schema S] \
                     [--batch N] [--drop-source]";

fn parse_args() -> Result<(String, String, MigrateOptions), String> {
    let mut from = None;
    let mut to = None;
    let mut opts = MigrateOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--from" => from = Some(value("--from")?),
            "--to" => to = Some(value("--to")?),
            "--schema" => opts.schema = value("--schema")?,
            "--batch" => {
                opts.batch = value("--batch")?
                    .parse()
                    .map_err(|e| format!("--batch: {e}"))?
            }
            "--drop-source" => opts.drop_source = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    match (from, to) {
        (Some(from), Some(to)) => Ok((from, to, opts)),
        _ => Err(format!("--from and --to are required\n{USAGE}")),
    }
}

fn main() {
    let (from, to, opts) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
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
