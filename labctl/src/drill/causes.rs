//! Which switches a drill makes buggy, drawn from a seed.
//!
//! The draw reads only raw words from ChaCha8 (whose stream its spec fixes)
//! and does its own arithmetic on them, rather than rand's distributions,
//! whose algorithms may change between versions: a seed noted in a drill's
//! write-up must draw the same causes again on any machine, later.

use std::{fmt, str::FromStr};

use lab_common::{
    config::{Faults, Mode},
    faults::Switch,
};
use rand_chacha::{
    ChaCha8Rng,
    rand_core::{RngCore, SeedableRng},
};

/// How many of the five switches a drill makes buggy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CauseCount {
    /// Each switch independently, with probability 1/2.
    Random,
    /// Exactly this many, 0..=5, chosen at random (above 5 means all).
    Exactly(u8),
    /// All five: the incident as it was.
    All,
}

const ALLOWED: &str = "all, random, or a number from 0 to 5";

/// A cause count that is none of the allowed spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cause count `{value}`; expected {ALLOWED}")]
pub struct CauseCountError {
    pub value: String,
}

impl FromStr for CauseCount {
    type Err = CauseCountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(CauseCount::All),
            "random" => Ok(CauseCount::Random),
            _ => match s.parse::<u8>() {
                Ok(k) if usize::from(k) <= Switch::ALL.len() => Ok(CauseCount::Exactly(k)),
                _ => Err(CauseCountError {
                    value: s.to_owned(),
                }),
            },
        }
    }
}

impl fmt::Display for CauseCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CauseCount::Random => f.write_str("random"),
            CauseCount::Exactly(k) => write!(f, "{k}"),
            CauseCount::All => f.write_str("all"),
        }
    }
}

/// The switches for a drill: `count` of them (see [`CauseCount`]) in their
/// buggy-preset form, the others in their fixed-preset form. The same seed
/// and count always give the same switches.
pub fn draw(seed: u64, count: CauseCount) -> Faults {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let buggy: [bool; 5] = match count {
        CauseCount::Random => {
            let bits = rng.next_u32();
            std::array::from_fn(|i| (bits >> i) & 1 == 1)
        }
        CauseCount::Exactly(k) => choose(&mut rng, usize::from(k).min(5)),
        CauseCount::All => [true; 5],
    };
    let mut faults = Faults::preset(Mode::Fixed);
    for (switch, buggy) in Switch::ALL.into_iter().zip(buggy) {
        if buggy {
            set_form(&mut faults, switch, Mode::Buggy);
        }
    }
    faults
}

/// `k` of the five positions, uniformly: the first `k` of a partial
/// Fisher–Yates shuffle.
fn choose(rng: &mut ChaCha8Rng, k: usize) -> [bool; 5] {
    let mut order = [0, 1, 2, 3, 4];
    for i in 0..k {
        let j = i + below(rng, order.len() - i);
        order.swap(i, j);
    }
    let mut chosen = [false; 5];
    for &i in &order[..k] {
        chosen[i] = true;
    }
    chosen
}

/// A uniform number in `0..n` (`n` ≥ 1), by rejection so that no value is
/// favoured when 2³² is not a multiple of `n`.
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    let n = n as u64;
    let zone = (1u64 << 32) - (1u64 << 32) % n;
    loop {
        let x = u64::from(rng.next_u32());
        if x < zone {
            return (x % n) as usize;
        }
    }
}

/// The value `switch` has in `form`, spelled as in the config.
pub(super) fn value_of(switch: Switch, form: Mode) -> &'static str {
    switch.value_in(&Faults::preset(form))
}

/// Which preset's form `switch` has in `faults`; `None` for a value that is
/// in neither preset (`l7`, `capped`), which a drill never draws.
pub fn form_in(switch: Switch, faults: &Faults) -> Option<Mode> {
    let value = switch.value_in(faults);
    [Mode::Buggy, Mode::Fixed]
        .into_iter()
        .find(|&form| value_of(switch, form) == value)
}

/// Copies one switch from a preset, so the values stay those of the config
/// module rather than being spelled again here.
fn set_form(faults: &mut Faults, switch: Switch, form: Mode) {
    let preset = Faults::preset(form);
    match switch {
        Switch::Lb => faults.lb = preset.lb,
        Switch::Worker => faults.worker = preset.worker,
        Switch::Deadline => faults.deadline = preset.deadline,
        Switch::HttpClient => faults.http_client = preset.http_client,
        Switch::Rows => faults.rows = preset.rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_common::config::{DeadlineMode, HttpClientMode, LbMode, RowsMode, WorkerMode};

    fn buggy_count(faults: &Faults) -> usize {
        Switch::ALL
            .into_iter()
            .filter(|&s| form_in(s, faults) == Some(Mode::Buggy))
            .count()
    }

    #[test]
    fn cause_counts_parse_and_print_back() {
        assert_eq!("all".parse(), Ok(CauseCount::All));
        assert_eq!("random".parse(), Ok(CauseCount::Random));
        for k in 0..=5u8 {
            assert_eq!(k.to_string().parse(), Ok(CauseCount::Exactly(k)));
            assert_eq!(CauseCount::Exactly(k).to_string(), k.to_string());
        }
        assert_eq!(CauseCount::All.to_string(), "all");
        assert_eq!(CauseCount::Random.to_string(), "random");
    }

    #[test]
    fn a_bad_cause_count_names_the_value_and_the_allowed_ones() {
        for bad in ["6", "-1", "ALL", "two", "", " 2", "256"] {
            let err = bad.parse::<CauseCount>().expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid cause count `{bad}`; expected all, random, or a number from 0 to 5"
                )
            );
        }
    }

    #[test]
    fn one_seed_draws_these_switches_for_good() {
        // Pinned: if this changes, old drills' seeds no longer draw what
        // their write-ups say.
        assert_eq!(
            draw(20240917, CauseCount::Random),
            Faults {
                lb: LbMode::L4,
                worker: WorkerMode::Bounded,
                deadline: DeadlineMode::Ignore,
                http_client: HttpClientMode::PerRequest,
                rows: RowsMode::Close,
            }
        );
        assert_eq!(
            draw(20240917, CauseCount::Exactly(2)),
            Faults {
                lb: LbMode::Etcd,
                worker: WorkerMode::Unbounded,
                deadline: DeadlineMode::Propagate,
                http_client: HttpClientMode::Shared,
                rows: RowsMode::LeakOnError,
            }
        );
    }

    #[test]
    fn the_same_seed_and_count_draw_the_same_switches() {
        for seed in [0, 1, 7, u64::MAX] {
            for count in [CauseCount::Random, CauseCount::Exactly(3), CauseCount::All] {
                assert_eq!(draw(seed, count), draw(seed, count), "{seed} {count}");
            }
        }
    }

    #[test]
    fn random_draws_make_every_switch_both_buggy_and_fixed() {
        let draws: Vec<Faults> = (0..200)
            .map(|seed| draw(seed, CauseCount::Random))
            .collect();
        for switch in Switch::ALL {
            for form in [Mode::Buggy, Mode::Fixed] {
                assert!(
                    draws.iter().any(|f| form_in(switch, f) == Some(form)),
                    "{switch} never {form:?}"
                );
            }
        }
        let counts: Vec<usize> = draws.iter().map(buggy_count).collect();
        for k in 0..=5 {
            assert!(counts.contains(&k), "no draw with {k} causes");
        }
    }

    #[test]
    fn exactly_k_makes_exactly_k_switches_buggy_and_varies_which() {
        for k in 0..=5u8 {
            let draws: Vec<Faults> = (0..200)
                .map(|seed| draw(seed, CauseCount::Exactly(k)))
                .collect();
            for faults in &draws {
                assert_eq!(buggy_count(faults), usize::from(k), "{faults:?}");
                for switch in Switch::ALL {
                    assert!(form_in(switch, faults).is_some(), "{switch}: {faults:?}");
                }
            }
            if (1..=4).contains(&k) {
                for switch in Switch::ALL {
                    for form in [Mode::Buggy, Mode::Fixed] {
                        assert!(
                            draws.iter().any(|f| form_in(switch, f) == Some(form)),
                            "k={k}: {switch} never {form:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn all_and_none_are_the_presets() {
        assert_eq!(draw(3, CauseCount::All), Faults::preset(Mode::Buggy));
        assert_eq!(draw(3, CauseCount::Exactly(5)), Faults::preset(Mode::Buggy));
        assert_eq!(draw(3, CauseCount::Exactly(0)), Faults::preset(Mode::Fixed));
        assert_eq!(draw(3, CauseCount::Exactly(9)), Faults::preset(Mode::Buggy));
    }

    #[test]
    fn values_in_neither_preset_have_no_form() {
        let mut faults = Faults::preset(Mode::Buggy);
        faults.lb = LbMode::L7;
        faults.worker = WorkerMode::Capped;
        assert_eq!(form_in(Switch::Lb, &faults), None);
        assert_eq!(form_in(Switch::Worker, &faults), None);
        assert_eq!(form_in(Switch::Rows, &faults), Some(Mode::Buggy));
    }
}
