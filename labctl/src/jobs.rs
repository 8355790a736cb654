//! `labctl jobs`: a steady job producer that inserts rows straight into the
//! `jobs` table — the inflow the worker of cause 2 consumes. With
//! `--poison-ratio` some rows carry a payload that is not valid UTF-8: the
//! worker cannot decode it and must dead-letter it, not retry it forever.
//! Poison rows are spread evenly, not drawn at random: with a ratio of
//! 0.001 the 1 000th, 2 000th, … rows are poison, so when the first one
//! arrives depends only on the rate, never on luck.

use std::time::Duration;

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;
use sqlx::{MySql, QueryBuilder, mysql::MySqlPoolOptions};
use tokio::time::Instant;

/// Rows per INSERT statement.
const MAX_ROWS: u64 = 1000;

/// What to insert.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// `mysql://…` of the lab's database.
    pub mysql_url: String,
    /// Jobs per second.
    pub rate: f64,
    /// How long to produce.
    pub duration: Duration,
    /// Fraction (0–1) of rows with an undecodable payload.
    pub poison_ratio: f64,
    /// Size of a good payload.
    pub payload_bytes: usize,
    pub seed: u64,
}

/// What was inserted.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct JobReport {
    pub inserted: u64,
    pub poison: u64,
}

/// A good payload: printable text of `len` bytes, different per job.
fn payload(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    let mut text = format!("{{\"job\":{},\"data\":\"", rng.random::<u32>()).into_bytes();
    while text.len() + 2 < len.max(16) {
        text.push(b'a' + rng.random_range(0..26u8));
    }
    text.extend_from_slice(b"\"}");
    text
}

/// A poison payload: bytes that are not UTF-8.
fn poison(rng: &mut SmallRng) -> Vec<u8> {
    vec![0xff, 0xfe, 0xfd, rng.random::<u8>() | 0x80, 0x00]
}

/// Whether row number `n` (from 0) is poison: exactly ⌊(n+1)·ratio⌋ of the
/// first n+1 rows are.
fn is_poison(n: u64, ratio: f64) -> bool {
    let poison_upto = |rows: u64| (rows as f64 * ratio).floor() as u64;
    poison_upto(n + 1) > poison_upto(n)
}

/// Inserts jobs at `rate` for `duration` (open loop, in small batches).
pub async fn produce(spec: &JobSpec) -> anyhow::Result<JobReport> {
    if !(spec.rate > 0.0 && spec.rate.is_finite()) {
        bail!("--rate must be a positive number, got {}", spec.rate);
    }
    if !(0.0..=1.0).contains(&spec.poison_ratio) {
        bail!(
            "--poison-ratio must be between 0 and 1, got {}",
            spec.poison_ratio
        );
    }
    let pool = MySqlPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&spec.mysql_url)
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                lab_common::config::redacted_url(&spec.mysql_url)
            )
        })?;
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let mut report = JobReport::default();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let elapsed = start.elapsed().min(spec.duration);
        let due = (elapsed.as_secs_f64() * spec.rate).floor() as u64;
        // At most MAX_ROWS per INSERT: a backlog after a stall must not
        // exceed MySQL's placeholder or packet limits.
        let batch = due.saturating_sub(report.inserted).min(MAX_ROWS);
        if batch > 0 {
            let mut poisoned = 0;
            let first = report.inserted;
            let rows: Vec<Vec<u8>> = (first..first + batch)
                .map(|n| {
                    if is_poison(n, spec.poison_ratio) {
                        poisoned += 1;
                        poison(&mut rng)
                    } else {
                        payload(&mut rng, spec.payload_bytes)
                    }
                })
                .collect();
            // A deadlock with a worker's claim is InnoDB's "try again".
            let mut tries = 0;
            loop {
                tries += 1;
                let mut insert: QueryBuilder<MySql> =
                    QueryBuilder::new("INSERT INTO jobs (payload) ");
                insert.push_values(&rows, |mut row, bytes| {
                    row.push_bind(bytes.as_slice());
                });
                match insert.build().execute(&pool).await {
                    Ok(_) => break,
                    Err(sqlx::Error::Database(e))
                        if e.code().as_deref() == Some("40001") && tries < 5 => {}
                    Err(e) => return Err(e).context("inserting jobs"),
                }
            }
            report.inserted += batch;
            report.poison += poisoned;
        }
        if elapsed >= spec.duration && report.inserted >= due {
            break;
        }
    }
    pool.close().await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_rows_are_spread_evenly() {
        let poison: Vec<u64> = (0..3000).filter(|&n| is_poison(n, 0.001)).collect();
        assert_eq!(poison, vec![999, 1999, 2999]);
        assert_eq!((0..100).filter(|&n| is_poison(n, 0.3)).count(), 30);
        assert_eq!((0..100).filter(|&n| is_poison(n, 0.0)).count(), 0);
        assert_eq!((0..100).filter(|&n| is_poison(n, 1.0)).count(), 100);
    }

    #[test]
    fn good_payloads_are_utf8_of_the_asked_size_and_poison_is_not() {
        let mut rng = SmallRng::seed_from_u64(7);
        let good = payload(&mut rng, 1024);
        assert_eq!(good.len(), 1024);
        assert!(std::str::from_utf8(&good).is_ok());
        assert!(std::str::from_utf8(&poison(&mut rng)).is_err());
    }
}
