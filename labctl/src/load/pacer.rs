//! The open loop's clock: waits until the next request is due.
//!
//! tokio's timer wheel ticks in whole milliseconds and the runtime parks in
//! `epoll_wait` with a millisecond timeout, so a request due at 3.2 ms
//! would start at 4 ms or 5 ms: every latency measured from the due time
//! would carry about a millisecond of the generator's own lateness — as
//! much as a fast endpoint's whole answer. On Linux the pacer arms a
//! timerfd instead and waits for it in the runtime's own epoll, which
//! wakes within tens of microseconds of the due time, with no extra thread.
//! Elsewhere, or if no timerfd can be had, it falls back to tokio's timer.

use std::time::Duration;

use tokio::time::Instant;

/// The shortest wait the pacer arms. At high rates requests are due every
/// few microseconds; waking for each would cost a wake-up per request, so
/// the pacer wakes at most every `MIN_WAIT` and the dispatcher starts what
/// fell due meanwhile in one batch.
const MIN_WAIT: Duration = Duration::from_micros(100);

pub(super) struct Pacer {
    #[cfg(target_os = "linux")]
    timer: Option<linux::Timer>,
}

impl Pacer {
    pub(super) fn new() -> Self {
        Self {
            #[cfg(target_os = "linux")]
            timer: linux::Timer::new().ok(),
        }
    }

    /// Returns at `deadline` (or at most [`MIN_WAIT`] from now, whichever
    /// is later).
    pub(super) async fn until(&self, deadline: Instant) {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_WAIT);
        #[cfg(target_os = "linux")]
        if let Some(timer) = &self.timer
            && timer.sleep(wait).await.is_ok()
        {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::{
        io,
        os::fd::{AsFd, AsRawFd, RawFd},
        time::Duration,
    };

    use nix::sys::{
        time::TimeSpec,
        timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
    };
    use tokio::io::{Interest, unix::AsyncFd};

    /// A non-blocking monotonic timerfd, registered with the runtime.
    pub(super) struct Timer(AsyncFd<Fd>);

    /// `AsyncFd` asks for `AsRawFd`; nix's `TimerFd` offers `AsFd`.
    struct Fd(TimerFd);

    impl AsRawFd for Fd {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_fd().as_raw_fd()
        }
    }

    impl Timer {
        pub(super) fn new() -> io::Result<Self> {
            let fd = TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )?;
            // SAFETY: `Fd` owns the timerfd (an `OwnedFd` inside `TimerFd`)
            // and always returns that same descriptor; it is closed only
            // when the `AsyncFd` drops it, which deregisters it first.
            #[allow(unsafe_code)]
            let registered = unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) };
            Ok(Self(registered.map_err(|e| e.into_parts().1)?))
        }

        /// Sleeps `wait` (more than zero: a zero one-shot disarms).
        pub(super) async fn sleep(&self, wait: Duration) -> io::Result<()> {
            let timer = &self.0.get_ref().0;
            timer.set(
                Expiration::OneShot(TimeSpec::from_duration(wait)),
                TimerSetTimeFlags::empty(),
            )?;
            loop {
                let mut ready = self.0.readable().await?;
                // Not expired yet (a readiness left from an earlier expiry):
                // the read says EAGAIN, and readiness is cleared.
                match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                    Ok(result) => return result,
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_returns_at_the_deadline_not_before() {
        let pacer = Pacer::new();
        #[cfg(target_os = "linux")]
        assert!(
            pacer.timer.is_some(),
            "no timerfd: tokio's 1 ms ticks instead"
        );
        for wait_us in [150, 700, 2_300] {
            let deadline = Instant::now() + Duration::from_micros(wait_us);
            pacer.until(deadline).await;
            assert!(Instant::now() >= deadline, "woke early for {wait_us} µs");
        }
    }
}
