//! Retry delays: exponential (×3 per attempt) from a base, capped, with jitter so rows that
//! failed together (a whole batch during an outage) do not all retry in the same instant.

use std::time::Duration;

/// Growth per further attempt.
const FACTOR: u32 = 3;

/// The delay before the next attempt after `attempts` failed ones (`attempts` ≥ 1).
///
/// `jitter` in `[0, 1)` picks a point in the upper half of the exponential delay ("equal
/// jitter"): the delay never drops below half the nominal one, so retries still back off.
pub fn retry_delay(attempts: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let nominal = nominal_delay(attempts, base, max);
    let jitter = jitter.clamp(0.0, 1.0);
    nominal / 2 + nominal.mul_f64(jitter / 2.0)
}

/// `base × 3^(attempts-1)`, capped at `max`, without overflow for any attempt count.
pub fn nominal_delay(attempts: u32, base: Duration, max: Duration) -> Duration {
    let mut delay = base;
    for _ in 1..attempts {
        if delay >= max {
            break;
        }
        delay = delay.checked_mul(FACTOR).unwrap_or(max);
    }
    delay.min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(15 * 60);

    #[test]
    fn grows_three_fold_then_caps() {
        let secs: Vec<u64> = (1..=9).map(|a| nominal_delay(a, BASE, MAX).as_secs()).collect();
        assert_eq!(secs, [1, 3, 9, 27, 81, 243, 729, 900, 900]);
        assert_eq!(nominal_delay(u32::MAX, BASE, MAX), MAX);
        assert_eq!(nominal_delay(200, Duration::MAX / 2, Duration::MAX), Duration::MAX);
    }

    #[test]
    fn jitter_stays_within_upper_half() {
        for attempts in 1..=12 {
            let nominal = nominal_delay(attempts, BASE, MAX);
            assert_eq!(retry_delay(attempts, BASE, MAX, 0.0), nominal / 2);
            let top = retry_delay(attempts, BASE, MAX, 0.999_999);
            assert!(top <= nominal && top > nominal * 99 / 100, "{attempts}: {top:?} vs {nominal:?}");
            let mid = retry_delay(attempts, BASE, MAX, 0.5);
            assert!(mid > nominal / 2 && mid < nominal);
        }
        // Out-of-range jitter is clamped rather than producing a negative or huge delay.
        assert_eq!(retry_delay(1, BASE, MAX, -3.0), BASE / 2);
        assert_eq!(retry_delay(1, BASE, MAX, 7.0), BASE);
    }

    #[test]
    fn never_exceeds_the_cap() {
        for attempts in 1..=50 {
            assert!(
                retry_delay(attempts, Duration::from_millis(250), Duration::from_secs(10), 0.99)
                    <= Duration::from_secs(10)
            );
        }
    }
}
