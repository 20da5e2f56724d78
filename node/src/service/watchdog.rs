//! Two guards the privacy path relies on: the storage watchdog (a write that fails or
//! hangs stops the node rather than leave it answering without records) and the
//! wall-clock guard (budget periods follow the clock, so a clock jump is refused).

use chrono::Utc;
use phm_proto::{Denial, DenialReason};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Record the first storage failure; the node's run loop then stops the node.
pub(super) fn report_storage_failure(
    fatal: &tokio::sync::watch::Sender<Option<String>>,
    what: String,
) {
    // Flag first: logging goes to the same failing disk.
    fatal.send_if_modified(|f| {
        if f.is_none() {
            *f = Some(what.clone());
            true
        } else {
            false
        }
    });
    tracing::error!(
        "storage failure: {what}; the node stops, since it can no longer record spends and decisions before answering"
    );
}

/// Run `f` on the blocking pool; if it fails or takes longer than `limit`, report a
/// storage failure (from a task of its own, so the report happens even when the caller
/// has gone) and refuse `UNAVAILABLE`.
pub(super) async fn watched_io<T: Send + 'static>(
    fatal: Arc<tokio::sync::watch::Sender<Option<String>>>,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Denial> {
    let task = tokio::task::spawn_blocking(f);
    let reporter = fatal.clone();
    let watched = tokio::spawn(async move {
        let failure = match tokio::time::timeout(limit, task).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => format!("the node's storage task failed: {e}"),
            Err(_) => format!(
                "a write to the ledger, release cache or audit log did not finish within {} ms (limits.storage_timeout_ms); the disk is failing or full",
                limit.as_millis()
            ),
        };
        report_storage_failure(&reporter, failure.clone());
        Err(failure)
    });
    let failure = match watched.await {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(msg)) => msg,
        Err(e) => {
            let msg = format!("the node's storage watchdog failed: {e}");
            report_storage_failure(&fatal, msg.clone());
            msg
        }
    };
    Err(Denial::new(
        DenialReason::Unavailable,
        format!("{failure}; nothing is released and the node is stopping"),
    ))
}

/// Budget periods follow the wall clock, so a clock pushed forward (NTP spoofing, an
/// operator error) would open fresh budgets. The guard compares the wall clock's
/// advance since start with the monotonic clock's; a node whose wall clock moved by
/// more than the tolerance refuses queries until it is restarted with the right time.
#[derive(Debug)]
pub(super) struct ClockGuard {
    origin_wall_ms: i64,
    origin: Instant,
}

/// Largest disagreement between the wall clock and the monotonic clock tolerated
/// (NTP slews far less than this; a step of a minute or more is a jump).
const CLOCK_JUMP_TOLERANCE_MS: i64 = 60_000;

impl ClockGuard {
    pub(super) fn new() -> ClockGuard {
        ClockGuard {
            origin_wall_ms: Utc::now().timestamp_millis(),
            origin: Instant::now(),
        }
    }

    pub(super) fn check(&self) -> Result<(), Denial> {
        let mono_ms = i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX);
        clock_drift_check(
            Utc::now()
                .timestamp_millis()
                .saturating_sub(self.origin_wall_ms),
            mono_ms,
        )
    }
}

/// Refuse when the wall clock advanced `wall_ms` while the monotonic clock advanced
/// `mono_ms`, and the two differ by more than the tolerance.
pub(super) fn clock_drift_check(wall_ms: i64, mono_ms: i64) -> Result<(), Denial> {
    let drift = wall_ms.saturating_sub(mono_ms);
    if drift.saturating_abs() <= CLOCK_JUMP_TOLERANCE_MS {
        return Ok(());
    }
    let (amount, way) = if drift > 0 {
        (drift, "forward")
    } else {
        (drift.saturating_neg(), "back")
    };
    tracing::error!(
        drift_ms = drift,
        "the wall clock jumped {way} by {:.0} s since the node started",
        amount as f64 / 1000.0
    );
    Err(Denial::new(
        DenialReason::Unavailable,
        format!(
            "this node's clock jumped {way} by {:.0} s while it was running; budget periods follow the clock, so the node refuses queries until its operator fixes the time and restarts it",
            amount as f64 / 1000.0
        ),
    ))
}
