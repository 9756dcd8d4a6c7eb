//! Arbitrary touch/poll sequences on `RollingDeadline`: it never fires before one window after the
//! latest touch (unless the hard cap is reached), never moves backwards, and never ends past the
//! hard cap.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use broker_dispatch::fsm::{RollingDeadline, Timestamp};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    start: i64,
    window_us: u64,
    cap_us: Option<u64>,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Progress at `clock + delta` (clocks may step back).
    Touch(i32),
    /// Ask whether the wait is over at `clock + delta`.
    Poll(i32),
    /// Ask at an arbitrary instant.
    PollAt(i64),
}

fn add(t: i64, us: u64) -> i64 {
    i64::try_from(i128::from(t) + i128::from(us)).unwrap_or(i64::MAX)
}

fuzz_target!(|i: Input| {
    let ts = Timestamp::from_micros;
    let window = Duration::from_micros(i.window_us);
    let mut d = RollingDeadline::new(ts(i.start), window, i.cap_us.map(Duration::from_micros));
    let cap = i.cap_us.map(|c| add(i.start, c));
    assert_eq!(d.hard_cap().map(Timestamp::as_micros), cap);
    // The latest instant progress was seen at (the start counts as progress).
    let mut latest = i.start;
    let mut clock = i.start;
    let mut previous = d.poll_timeout();
    for op in &i.ops {
        let t = match *op {
            Op::Touch(delta) => {
                clock = clock.saturating_add(i64::from(delta));
                d.touch(ts(clock));
                latest = latest.max(clock);
                clock
            }
            Op::Poll(delta) => {
                clock = clock.saturating_add(i64::from(delta));
                clock
            }
            Op::PollAt(t) => t,
        };
        let expected = match cap {
            Some(c) => add(latest, i.window_us).min(c),
            None => add(latest, i.window_us),
        };
        let deadline = d.poll_timeout();
        assert_eq!(deadline.as_micros(), expected, "after {op:?}");
        assert!(
            deadline >= previous,
            "deadline moved back from {previous} to {deadline}"
        );
        previous = deadline;
        if let Some(c) = cap {
            assert!(
                deadline.as_micros() <= c,
                "deadline {deadline} past the cap {c}"
            );
        }
        let early = t < add(latest, i.window_us) && cap.is_none_or(|c| t < c);
        if early {
            assert!(
                !d.is_expired(ts(t)),
                "fired early at {t}: latest touch {latest}"
            );
        }
        assert_eq!(d.is_expired(ts(t)), t >= expected);
    }
});
