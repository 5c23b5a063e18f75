//! Time, injectable so tests and replays control it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_nanos(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_nanos(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(nanos: u64) -> Self {
        ManualClock(AtomicU64::new(nanos))
    }

    pub fn set_nanos(&self, nanos: u64) {
        self.0.store(nanos, Ordering::SeqCst);
    }

    pub fn advance_secs(&self, secs: f64) {
        self.0.fetch_add(secs_to_nanos(secs), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub(crate) fn secs_to_nanos(secs: f64) -> u64 {
    if !secs.is_finite() || secs <= 0.0 {
        return 0;
    }
    let ns = (secs * 1e9).round();
    if ns >= 1.8e19 {
        u64::MAX
    } else {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "range checked")]
        let n = ns as u64;
        n
    }
}

pub(crate) fn nanos_to_secs(ns: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "sub-nanosecond precision is not needed")]
    let s = ns as f64 / 1e9;
    s
}
