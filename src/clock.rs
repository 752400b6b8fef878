//! Time, injected. The EMS reads both the wall clock (for time-of-use windows and the API)
//! and a monotonic clock (for staleness, fail-safe timers and ramps) through [`Clock`], so a
//! simulated site can run faster than real time and every timer follows simulated time.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    /// Wall-clock time, UTC.
    fn now(&self) -> DateTime<Utc>;
    /// Monotonic time since an arbitrary origin; never goes backwards.
    fn monotonic(&self) -> Duration;
}

pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}
