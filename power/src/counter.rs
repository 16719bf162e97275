//! Wrap-safe accumulation of hardware energy counters.
//!
//! RAPL energy status registers are 32 bits wide (about 43 minutes at 100 W with the usual 61 µJ unit,
//! much less with coarser units or higher power); powercap's `energy_uj` wraps at `max_energy_range_uj`.
//! A [`WrapCounter`] turns successive raw readings into a monotonically growing 128-bit total, assuming
//! it is read at least once per wrap period (the sampler reads every few hundred milliseconds). A delta
//! larger than half the range is flagged: either the reads were too far apart, or the counter was reset.

/// Accumulates a free-running counter that wraps modulo `modulus`.
#[derive(Debug, Clone)]
pub struct WrapCounter {
    modulus: u128,
    last: Option<u64>,
    total: u128,
    wraps: u64,
    suspicious: u64,
}

/// What one update saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterStep {
    /// Counts added by this update.
    pub delta: u128,
    /// The counter wrapped between the two readings.
    pub wrapped: bool,
    /// The delta was larger than half the range: reads too far apart, or the counter was reset.
    pub suspicious: bool,
}

impl WrapCounter {
    /// A counter whose values run from 0 to `modulus - 1` and then wrap to 0.
    /// `modulus == 0` means 2^64 (a 64-bit counter).
    pub fn new(modulus: u128) -> Self {
        let modulus = if modulus == 0 { 1u128 << 64 } else { modulus };
        WrapCounter {
            modulus,
            last: None,
            total: 0,
            wraps: 0,
            suspicious: 0,
        }
    }

    /// A 32-bit counter (RAPL energy status MSRs).
    pub fn bits32() -> Self {
        Self::new(1u128 << 32)
    }

    /// A 64-bit counter (perf events, hwmon energy).
    pub fn bits64() -> Self {
        Self::new(0)
    }

    /// The number of distinct values before the counter wraps.
    pub fn modulus(&self) -> u128 {
        self.modulus
    }

    /// Feed one raw reading; returns what changed. The first reading only sets the start point.
    pub fn update(&mut self, raw: u64) -> CounterStep {
        let raw128 = u128::from(raw) % self.modulus;
        let step = match self.last {
            None => CounterStep {
                delta: 0,
                wrapped: false,
                suspicious: false,
            },
            Some(prev) => {
                let prev = u128::from(prev) % self.modulus;
                let (delta, wrapped) = if raw128 >= prev {
                    (raw128 - prev, false)
                } else {
                    (self.modulus - prev + raw128, true)
                };
                CounterStep {
                    delta,
                    wrapped,
                    suspicious: delta > self.modulus / 2,
                }
            }
        };
        self.last = Some(raw);
        self.total += step.delta;
        if step.wrapped {
            self.wraps += 1;
        }
        if step.suspicious {
            self.suspicious += 1;
        }
        step
    }

    /// Counts accumulated since the first reading.
    pub fn total(&self) -> u128 {
        self.total
    }

    /// How many times the counter wrapped.
    pub fn wraps(&self) -> u64 {
        self.wraps
    }

    /// How many updates advanced by more than half the range.
    pub fn suspicious(&self) -> u64 {
        self.suspicious
    }

    /// The last raw reading.
    pub fn last_raw(&self) -> Option<u64> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_across_32_bit_wrap() {
        let mut c = WrapCounter::bits32();
        c.update(0xFFFF_FF00);
        let s = c.update(0x0000_0100);
        assert!(s.wrapped);
        assert_eq!(s.delta, 0x200);
        assert!(!s.suspicious);
        c.update(0x0000_0200);
        assert_eq!(c.total(), 0x300);
        assert_eq!(c.wraps(), 1);
    }

    #[test]
    fn many_wraps_keep_growing() {
        let mut c = WrapCounter::new(1000);
        let mut expected = 0u128;
        let mut raw = 0u64;
        c.update(raw);
        for _ in 0..10_000 {
            raw = (raw + 333) % 1000;
            expected += 333;
            c.update(raw);
        }
        assert_eq!(c.total(), expected);
        assert_eq!(c.wraps(), 3330);
    }

    #[test]
    fn large_jump_is_flagged() {
        let mut c = WrapCounter::new(1000);
        c.update(10);
        let s = c.update(900);
        assert!(s.suspicious);
        assert_eq!(c.suspicious(), 1);
    }

    #[test]
    fn sixty_four_bit_wrap() {
        let mut c = WrapCounter::bits64();
        c.update(u64::MAX - 1);
        let s = c.update(3);
        assert_eq!(s.delta, 5);
        assert!(s.wrapped);
    }
}
