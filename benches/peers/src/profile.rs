//! Where the time goes in broker-dispatch's Postgres drain (`--profile`), measured on the
//! current code without changing it:
//!
//! 1. `EXPLAIN (ANALYZE, BUFFERS)` of the claim and of the batched finish on N pending rows,
//!    and of the claim again after half and 90 % of the rows were drained without vacuum.
//! 2. A real hub drain (one broker) under `pg_stat_statements`, with WAL bytes, commits,
//!    HOT updates, index growth and sampled wait events, beside the raw flip loop.
//! 3. The levers as raw SQL on the same table: the hub's two statements per batch as it sends
//!    them, then one commit per batch (finish + next claim), a claim that resumes after the
//!    last claimed key, one NOTIFY per batch, all three together, and what fillfactor and HOT
//!    do to the raw flip. Interleaved, median of 3.
//!
//! The claim and finish statements below are copies of `Sql::new` in src/store/postgres.rs
//! (rendered for one schema); keep them in step when that file changes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{bd_drain, bd_load, bd_schema, drop_schema, median, now_micros, raw_drain, Env};

const LEASE_MICROS: i64 = 30_000_000;

fn claimable(x: &str) -> String {
    format!(
        "((({x}.state = 'pending' AND {x}.available_at <= clock.now) \
           OR ({x}.state = 'in_progress' AND {x}.lease_until <= clock.now \
               AND {x}.attempt < {x}.max_attempts)) \
          AND ({x}.deadline IS NULL OR clock.now < {x}.deadline))"
    )
}

const COLS: &str = "d.id, d.broker, d.op, d.args, d.state, d.attempt, d.max_attempts, \
    d.claimed_by, d.lease_until, d.available_at, d.deadline, d.result, d.failure, d.progress, \
    d.idempotency_key, d.created_at, d.updated_at";

/// The store's claim. `$1` broker, `$2` node, `$3` lease (µs), `$4` limit, `$5` now or NULL;
/// with `resume`, also `$6, $7`: the last claimed (created_at, id), from which the scan starts.
fn claim_sql(s: &str, resume: bool) -> String {
    let after = if resume {
        " AND (c.created_at, c.id) > ($6::bigint, $7::uuid)"
    } else {
        ""
    };
    format!(
        "WITH clock AS MATERIALIZED (SELECT COALESCE($5::bigint, {s}.clock_micros()) AS now), \
         picked AS MATERIALIZED ( \
             SELECT c.id FROM {s}.dispatch AS c, clock \
             WHERE c.broker = $1::text AND c.state IN ('pending', 'in_progress') \
               AND {}{after} \
             ORDER BY c.created_at, c.id \
             LIMIT $4::bigint \
             FOR UPDATE OF c SKIP LOCKED) \
         UPDATE {s}.dispatch AS d \
         SET state = 'in_progress', attempt = d.attempt + 1, claimed_by = $2::text, \
             lease_until = {s}.sat_add(clock.now, $3::bigint), updated_at = clock.now \
         FROM clock, picked \
         WHERE d.id = picked.id AND {} \
         RETURNING {COLS}",
        claimable("c"),
        claimable("d"),
    )
}

/// The store's `finish_many`; with `one_notify`, a single `pg_notify` per statement instead of
/// one per finished row.
fn finish_sql(s: &str, one_notify: bool) -> String {
    let ev = if one_notify {
        "ev AS (SELECT pg_notify($8::text, count(*)::text) FROM upd) "
    } else {
        "ev AS (SELECT pg_notify($8::text, upd.id::text) FROM upd) "
    };
    format!(
        "WITH clock AS MATERIALIZED (SELECT {s}.clock_micros() AS now), \
         v AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::json[], \
                 $5::json[], $6::bigint[], $7::bigint[]) \
               AS v(id, attempt, kind, result, failure, delay, at)), \
         upd AS ( \
           UPDATE {s}.dispatch AS d SET \
             state = CASE v.kind WHEN 'complete' THEN 'done' WHEN 'fail' THEN 'failed' \
                     ELSE 'pending' END, \
             result = CASE WHEN v.kind = 'complete' THEN v.result ELSE d.result END, \
             failure = CASE WHEN v.kind = 'fail' THEN v.failure ELSE d.failure END, \
             available_at = CASE v.kind \
               WHEN 'retry' THEN {s}.sat_add(COALESCE(v.at, clock.now), v.delay) \
               WHEN 'release' THEN COALESCE(v.at, clock.now) \
               ELSE d.available_at END, \
             lease_until = NULL, updated_at = COALESCE(v.at, clock.now) \
           FROM clock, v \
           WHERE d.id = v.id AND d.attempt = v.attempt AND d.state = 'in_progress' \
             AND (v.kind <> 'retry' OR d.attempt < d.max_attempts) \
           RETURNING {COLS}), \
         {ev}\
         SELECT upd.*, (SELECT count(*) FROM ev) FROM upd"
    )
}

/// A claimed batch: ids, attempts, and the last (created_at, id).
struct Batch {
    ids: Vec<uuid::Uuid>,
    attempts: Vec<i64>,
    last: Option<(i64, uuid::Uuid)>,
}

fn batch_of(rows: &[tokio_postgres::Row]) -> Batch {
    let mut v: Vec<(i64, uuid::Uuid, i64)> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(15), r.get::<_, uuid::Uuid>(0), r.get(5)))
        .collect();
    v.sort();
    Batch {
        last: v.last().map(|(c, id, _)| (*c, *id)),
        ids: v.iter().map(|x| x.1).collect(),
        attempts: v.iter().map(|x| x.2).collect(),
    }
}

type Params<'a> = Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send + 'a>>;

fn finish_params(b: &Batch, channel: &str) -> Params<'static> {
    let n = b.ids.len();
    vec![
        Box::new(b.ids.clone()),
        Box::new(b.attempts.clone()),
        Box::new(vec!["complete"; n]),
        Box::new(vec![Some(serde_json::Value::Null); n]),
        Box::new(vec![None::<serde_json::Value>; n]),
        Box::new(vec![None::<i64>; n]),
        Box::new(vec![None::<i64>; n]),
        Box::new(channel.to_owned()),
    ]
}

fn claim_params(broker: &str, limit: i64, resume: Option<(i64, uuid::Uuid)>) -> Params<'static> {
    let mut p: Params<'static> = vec![
        Box::new(broker.to_owned()),
        Box::new("profile".to_owned()),
        Box::new(LEASE_MICROS),
        Box::new(limit),
        Box::new(None::<i64>),
    ];
    if let Some((c, id)) = resume {
        p.push(Box::new(c));
        p.push(Box::new(id));
    }
    p
}

fn refs<'a>(p: &'a Params<'_>) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// How a SQL loop drains: which lever is on.
#[derive(Debug, Clone, Copy)]
struct Levers {
    one_commit: bool,
    resume: bool,
    one_notify: bool,
}

impl Levers {
    fn name(self) -> String {
        let mut v = Vec::new();
        if self.one_commit {
            v.push("one commit per batch");
        }
        if self.resume {
            v.push("resume after last key");
        }
        if self.one_notify {
            v.push("one NOTIFY per batch");
        }
        if v.is_empty() {
            "the hub's statements as sent (claim; finish_many)".to_owned()
        } else {
            v.join(" + ")
        }
    }
}

/// Drains broker b0 of `schema` with the store's statements, the way the hub does (claim
/// 100, finish those 100, repeat) minus everything else the hub does, until `stop_at` rows are
/// done or none is left. Returns (rows done, elapsed).
async fn sql_drain(env: &Env, schema: &str, lv: Levers, stop_at: u64) -> (u64, Duration) {
    let c = crate::pg::client(&env.dsn).await;
    let claim = c.prepare(&claim_sql(schema, false)).await.unwrap();
    let claim_resume = c.prepare(&claim_sql(schema, true)).await.unwrap();
    let finish = c.prepare(&finish_sql(schema, lv.one_notify)).await.unwrap();
    let channel = format!("{schema}_event");
    let begin = c.prepare("BEGIN").await.unwrap();
    let commit = c.prepare("COMMIT").await.unwrap();
    let started = Instant::now();
    let mut done = 0u64;
    let mut last = None;
    let claim_next = |last: Option<(i64, uuid::Uuid)>| {
        let p = claim_params(
            "b0",
            i64::from(crate::BATCH),
            if lv.resume { last } else { None },
        );
        (
            if lv.resume && last.is_some() {
                &claim_resume
            } else {
                &claim
            },
            p,
        )
    };
    let (stmt, p) = claim_next(last);
    let mut batch = batch_of(&c.query(stmt, &refs(&p)).await.unwrap());
    while !batch.ids.is_empty() {
        last = batch.last.or(last);
        let fp = finish_params(&batch, &channel);
        let n = batch.ids.len() as u64;
        let (stmt, p) = claim_next(last);
        let more = done + n < stop_at;
        if lv.one_commit {
            c.query(&begin, &[]).await.unwrap();
            let f = c.query(&finish, &refs(&fp)).await.unwrap();
            assert_eq!(f.len() as u64, n);
            batch = if more {
                batch_of(&c.query(stmt, &refs(&p)).await.unwrap())
            } else {
                batch_of(&[])
            };
            c.query(&commit, &[]).await.unwrap();
        } else {
            let f = c.query(&finish, &refs(&fp)).await.unwrap();
            assert_eq!(f.len() as u64, n);
            batch = if more {
                batch_of(&c.query(stmt, &refs(&p)).await.unwrap())
            } else {
                batch_of(&[])
            };
        }
        done += n;
    }
    (done, started.elapsed())
}

async fn explain(c: &tokio_postgres::Client, sql: &str, p: &Params<'_>) -> String {
    let rows = c
        .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"), &refs(p))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// EXPLAINs of one claim and one finish of 100 rows, in a transaction rolled back after.
async fn explain_pair(env: &Env, schema: &str, label: &str) {
    let c = crate::pg::client(&env.dsn).await;
    c.batch_execute("BEGIN").await.unwrap();
    let first = batch_of(
        &c.query(
            &claim_sql(schema, false),
            &refs(&claim_params("b0", 100, None)),
        )
        .await
        .unwrap(),
    );
    let claim = explain(
        &c,
        &claim_sql(schema, false),
        &claim_params("b0", 100, None),
    )
    .await;
    let channel = format!("{schema}_event");
    let finish = explain(
        &c,
        &finish_sql(schema, false),
        &finish_params(&first, &channel),
    )
    .await;
    let resume = match first.last {
        Some(last) => {
            explain(
                &c,
                &claim_sql(schema, true),
                &claim_params("b0", 100, Some(last)),
            )
            .await
        }
        None => "(nothing left to claim)".to_owned(),
    };
    c.batch_execute("ROLLBACK").await.unwrap();
    println!("\n### {label}: claim (100 rows; a first batch is already claimed in this transaction)\n```text\n{claim}\n```");
    println!("\n### {label}: finish_many of the first batch (100 rows)\n```text\n{finish}\n```");
    println!(
        "\n### {label}: lever, a claim resuming after the last claimed key\n```text\n{resume}\n```"
    );
}

#[derive(Debug, Clone, Default)]
struct Snap {
    lsn: String,
    commits: i64,
    upd: i64,
    hot: i64,
    dead: i64,
    autovacuums: i64,
    indexes: BTreeMap<String, i64>,
}

async fn snap(env: &Env, schema: &str) -> Snap {
    let c = &env.admin;
    // Backends report their counters when idle, at most once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    let lsn: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let commits: i64 = c
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let t = c
        .query_one(
            "SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup, autovacuum_count \
             FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'dispatch'",
            &[&schema],
        )
        .await
        .unwrap();
    let indexes = c
        .query(
            "SELECT indexrelname::text, pg_relation_size(indexrelid) \
             FROM pg_stat_user_indexes WHERE schemaname = $1 AND relname = 'dispatch'",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    Snap {
        lsn,
        commits,
        upd: t.get(0),
        hot: t.get(1),
        dead: t.get(2),
        autovacuums: t.get(3),
        indexes,
    }
}

async fn wal_diff(env: &Env, a: &Snap, b: &Snap) -> f64 {
    env.admin
        .query_one(
            "SELECT pg_wal_lsn_diff($2::text::pg_lsn, $1::text::pg_lsn)::float8",
            &[&a.lsn, &b.lsn],
        )
        .await
        .unwrap()
        .get(0)
}

/// Samples what the other backends of this database are doing, every 10 ms, until stopped.
fn sample_waits(
    env: &Env,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<BTreeMap<String, u64>> {
    let dsn = env.dsn.clone();
    tokio::spawn(async move {
        let c = crate::pg::client(&dsn).await;
        let mut seen = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            for r in c
                .query(
                    "SELECT state, coalesce(wait_event_type, 'CPU'), coalesce(wait_event, '-') \
                     FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid() \
                       AND backend_type = 'client backend' AND state = 'active' \
                       AND query NOT LIKE 'SELECT count(*)%'",
                    &[],
                )
                .await
                .unwrap()
            {
                let k = format!("{} / {}", r.get::<_, String>(1), r.get::<_, String>(2));
                *seen.entry(k).or_insert(0u64) += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    })
}

async fn statements(env: &Env, n: u64) {
    let rows = match env
        .admin
        .query(
            "SELECT calls, rows, total_exec_time, mean_exec_time, shared_blks_hit, \
                    shared_blks_read, shared_blks_dirtied, wal_records, wal_fpi, \
                    wal_bytes::float8, query \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT LIKE '%pg_stat%' AND query NOT LIKE 'SELECT count(*)%' \
             ORDER BY total_exec_time DESC LIMIT 8",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            println!("(pg_stat_statements: {e})");
            return;
        }
    };
    println!(
        "\n| statement | calls | rows | total ms | mean ms | blks hit/row | \
         dirtied/row | WAL recs/row | FPI | WAL B/row |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let rows_n = (r.get::<_, i64>(1).max(1)) as f64;
        let per = |x: f64| x / (n as f64);
        let q: String = r.get(10);
        println!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.1} | {:.2} | {:.1} | {} | {:.0} |",
            what(&q),
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, f64>(2),
            r.get::<_, f64>(3),
            r.get::<_, i64>(4) as f64 / rows_n,
            r.get::<_, i64>(6) as f64 / rows_n,
            per(r.get::<_, i64>(7) as f64),
            r.get::<_, i64>(8),
            per(r.get::<_, f64>(9)),
        );
    }
}

/// A short name for a statement the drain sends.
fn what(q: &str) -> String {
    // pg_stat_statements shows normalised text: literals are `$n` there.
    let q1 = q.trim_start();
    let name = if q.contains("unnest(") {
        "finish_many"
    } else if q1.starts_with("WITH clock") && q.contains("SKIP LOCKED") {
        "claim"
    } else if q1.starts_with("WITH picked") && q.contains("SKIP LOCKED") {
        "raw flip"
    } else if q.contains("affinity") {
        "affinity (connect, touch, read)"
    } else if q.contains("pg_try_advisory_xact_lock") || q.contains("SELECT DISTINCT d.broker") {
        "sweep (lock, claimable brokers)"
    } else if q1.starts_with("WITH picked") {
        "sweep (expire, exhaust, purge)"
    } else if q.contains("pg_notify") {
        "notify"
    } else {
        return format!(
            "`{}`",
            q.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(50)
                .collect::<String>()
        );
    };
    name.to_owned()
}

/// A measured drain: `what` runs it and returns its rate.
async fn measured<F, Fut>(env: &Env, schema: &str, n: u64, label: &str, what: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let before = snap(env, schema).await;
    let _ = env
        .admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_waits(env, Arc::clone(&stop));
    let started = Instant::now();
    let rate = what().await;
    let wall = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let waits = sampler.await.unwrap();
    let after = snap(env, schema).await;
    let wal = wal_diff(env, &before, &after).await;
    let nf = n as f64;
    println!(
        "\n## {label}, {n} rows: {rate:.0} rows/s ({:.2} s wall)",
        wall.as_secs_f64()
    );
    println!(
        "- WAL: {:.0} bytes/row ({:.1} MB); commits: {:.4}/row ({} in all, every backend of \
         the database, the 20 ms poll included)",
        wal / nf,
        wal / 1e6,
        (after.commits - before.commits) as f64 / nf,
        after.commits - before.commits
    );
    let upd = after.upd - before.upd;
    let hot = after.hot - before.hot;
    println!(
        "- updates: {upd} ({:.2}/row), HOT: {hot}; dead tuples after: {}; autovacuums during: {}",
        upd as f64 / nf,
        after.dead,
        after.autovacuums - before.autovacuums
    );
    let growth: Vec<String> = after
        .indexes
        .iter()
        .map(|(k, v)| {
            let b = before.indexes.get(k).copied().unwrap_or(0);
            format!("{k} +{:.1} B/row", (v - b) as f64 / nf)
        })
        .collect();
    println!("- index growth: {}", growth.join(", "));
    let total: u64 = waits.values().sum();
    let mut w: Vec<_> = waits.into_iter().collect();
    w.sort_by_key(|x| std::cmp::Reverse(x.1));
    let shown: Vec<String> = w
        .iter()
        .take(6)
        .map(|(k, v)| format!("{k} {:.0} %", 100.0 * *v as f64 / total.max(1) as f64))
        .collect();
    println!(
        "- active backends sampled every 10 ms ({total} samples): {}",
        shown.join(", ")
    );
    statements(env, n).await;
}

async fn fillfactor_demo(env: &Env, n: u64) {
    println!("\n## HOT and fillfactor on the raw flip ({n} rows, one loop, median of 3)\n");
    println!("| table | rows/s | HOT updates / updates |");
    println!("|---|---:|---|");
    let variants: [(&str, &str); 3] = [
        ("the crate's table and indexes", ""),
        (
            "the crate's table, fillfactor 50",
            "ALTER TABLE {s}.dispatch SET (fillfactor = 50)",
        ),
        (
            "fillfactor 50, claim index without the state predicate, no other partial index",
            "ALTER TABLE {s}.dispatch SET (fillfactor = 50); \
             DROP INDEX {s}.dispatch_claim; DROP INDEX {s}.dispatch_sweep_deadline; \
             DROP INDEX {s}.dispatch_sweep_lease; DROP INDEX {s}.dispatch_sweep_purge; \
             CREATE INDEX dispatch_claim ON {s}.dispatch (broker, created_at, id)",
        ),
    ];
    let mut results: Vec<(Vec<f64>, String)> = vec![(Vec::new(), String::new()); 3];
    for _ in 0..3 {
        for (i, (_, ddl)) in variants.iter().enumerate() {
            let s = bd_schema(env).await;
            if !ddl.is_empty() {
                env.admin
                    .batch_execute(&ddl.replace("{s}", &s))
                    .await
                    .unwrap();
            }
            bd_load(env, &s, "dispatch", n, 1).await;
            let before = snap(env, &s).await;
            let r = raw_drain(env, &s, "dispatch", n, 1).await;
            let after = snap(env, &s).await;
            results[i].0.push(r);
            results[i].1 = format!("{} / {}", after.hot - before.hot, after.upd - before.upd);
            drop_schema(env, &s).await;
        }
    }
    for (i, (label, _)) in variants.iter().enumerate() {
        println!(
            "| {label} | {:.0} ({}) | {} |",
            median(results[i].0.clone()),
            results[i]
                .0
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            results[i].1
        );
    }
}

async fn levers(env: &Env, n: u64) {
    let all = [
        Levers {
            one_commit: false,
            resume: false,
            one_notify: false,
        },
        Levers {
            one_commit: true,
            resume: false,
            one_notify: false,
        },
        Levers {
            one_commit: false,
            resume: true,
            one_notify: false,
        },
        Levers {
            one_commit: false,
            resume: false,
            one_notify: true,
        },
        Levers {
            one_commit: true,
            resume: true,
            one_notify: true,
        },
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); all.len() + 2];
    let load = crate::load_avg();
    for _ in 0..3 {
        let s = bd_schema(env).await;
        bd_load(env, &s, "dispatch", n, 1).await;
        rates[0].push(bd_drain(env, &s, n, 1).await);
        drop_schema(env, &s).await;
        let s = bd_schema(env).await;
        bd_load(env, &s, "dispatch", n, 1).await;
        rates[1].push(raw_drain(env, &s, "dispatch", n, 1).await);
        drop_schema(env, &s).await;
        for (i, lv) in all.iter().enumerate() {
            let s = bd_schema(env).await;
            bd_load(env, &s, "dispatch", n, 1).await;
            let (done, took) = sql_drain(env, &s, *lv, u64::MAX).await;
            assert_eq!(done, n);
            rates[i + 2].push(done as f64 / took.as_secs_f64());
            drop_schema(env, &s).await;
        }
    }
    let hub = median(rates[0].clone());
    let raw = median(rates[1].clone());
    println!(
        "\n## Levers as raw SQL, {n} rows, one broker, median of 3 interleaved \
         (load {load} → {})\n",
        crate::load_avg()
    );
    println!("| loop | rows/s | reps | / hub | / raw flip |");
    println!("|---|---:|---|---:|---:|");
    let row = |label: String, v: &Vec<f64>| {
        let m = median(v.clone());
        let reps: Vec<String> = v.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "| {label} | {m:.0} | {} | {:.3} | {:.3} |",
            reps.join(", "),
            m / hub,
            m / raw
        );
    };
    row("broker-dispatch hub (claim_batch 100)".into(), &rates[0]);
    row("raw flip (one statement per 100 rows)".into(), &rates[1]);
    for (i, lv) in all.iter().enumerate() {
        row(format!("SQL loop: {}", lv.name()), &rates[i + 2]);
    }
}

/// Dead entries on the claim scan: drain part of the rows with the store's own statements,
/// autovacuum off for the table, then EXPLAIN the claim.
async fn dead_tuples(env: &Env, n: u64) {
    let s = bd_schema(env).await;
    env.admin
        .batch_execute(&format!(
            "ALTER TABLE {s}.dispatch SET (autovacuum_enabled = off)"
        ))
        .await
        .unwrap();
    bd_load(env, &s, "dispatch", n, 1).await;
    let off = Levers {
        one_commit: false,
        resume: false,
        one_notify: false,
    };
    let (d1, _) = sql_drain(env, &s, off, n / 2).await;
    explain_pair(env, &s, &format!("{n} rows, {d1} drained, no vacuum")).await;
    let (d2, _) = sql_drain(env, &s, off, n * 9 / 10 - d1).await;
    explain_pair(
        env,
        &s,
        &format!("{n} rows, {} drained, no vacuum", d1 + d2),
    )
    .await;
    drop_schema(env, &s).await;
}

pub async fn run(env: &Env, jobs: &[u64]) {
    println!(
        "# profile at {} UTC s, load {}",
        now_micros() / 1_000_000,
        crate::load_avg()
    );
    for &n in jobs {
        // Plans on a fresh, vacuumed table.
        let s = bd_schema(env).await;
        bd_load(env, &s, "dispatch", n, 1).await;
        explain_pair(env, &s, &format!("{n} pending rows, fresh")).await;
        drop_schema(env, &s).await;

        // A real hub drain, then the raw flip, under the statistics.
        let s = bd_schema(env).await;
        bd_load(env, &s, "dispatch", n, 1).await;
        measured(env, &s, n, "broker-dispatch hub drain (1 broker)", || {
            bd_drain(env, &s, n, 1)
        })
        .await;
        drop_schema(env, &s).await;
        let s = bd_schema(env).await;
        bd_load(env, &s, "dispatch", n, 1).await;
        measured(env, &s, n, "raw flip (1 loop)", || {
            raw_drain(env, &s, "dispatch", n, 1)
        })
        .await;
        drop_schema(env, &s).await;
        let s = bd_schema(env).await;
        bd_load(env, &s, "dispatch", n, 1).await;
        let off = Levers {
            one_commit: false,
            resume: false,
            one_notify: false,
        };
        measured(
            env,
            &s,
            n,
            "SQL loop of the hub's two statements",
            || async {
                let (d, t) = sql_drain(env, &s, off, u64::MAX).await;
                d as f64 / t.as_secs_f64()
            },
        )
        .await;
        drop_schema(env, &s).await;

        dead_tuples(env, n).await;
        levers(env, n).await;
    }
    if let Some(&n) = jobs.first() {
        fillfactor_demo(env, n).await;
    }
}
