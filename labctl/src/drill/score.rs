//! Scoring a drill: the latest answer per switch decides right or wrong; the
//! first right one says how long the cause took to find. A miss is reported
//! with the signal that would have confirmed it, not with the right value,
//! so the trainee can go back and look.

use std::{fmt, time::Duration};

use lab_common::faults::Switch;

use super::{AnswerRecord, DrillKey, text::format_elapsed};

/// Where a cause shows, and the section of docs/diagnose.md that explains it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal {
    pub text: &'static str,
    pub docs: &'static str,
}

/// What `switch`'s buggy form shows; its absence marks the fixed form. The
/// score prints it for every switch, right or not, as the way to confirm
/// the answer either way.
pub fn confirming_signal(switch: Switch) -> Signal {
    let (text, docs) = match switch {
        Switch::Lb => (
            "lab_backend_calls_total{backend}: every call answered by one B; HAProxy's b_l4 stats: one session",
            "docs/diagnose.md#1-one-b-takes-all-the-traffic",
        ),
        Switch::Worker => (
            "lab_worker_tasks_alive climbing and lab_jobs_duplicate_total rising; /debug/tasks shows worker.job piling up",
            "docs/diagnose.md#3-tasks-pile-up-and-jobs-start-twice",
        ),
        Switch::Deadline => (
            "A's calls end at A's deadline (DeadlineExceeded, A answers 504) rather than as fast UNAVAILABLE; B's lab_work_after_deadline_total rises; lab_db_acquire_waiting climbs while lab_db_acquire_timeouts_total stays flat",
            "docs/diagnose.md#4-requests-served-after-the-caller-gave-up",
        ),
        Switch::HttpClient => (
            "lab_http_clients_built_total and partner_tls_handshakes_total rise with every call; process_open_fds climbs; the heap profile shows a TLS config per call",
            "docs/diagnose.md#5-memory-and-file-descriptors-climb",
        ),
        Switch::Rows => (
            "lab_db_oldest_checkout_seconds grows without bound while lab_db_connections_in_use{purpose=\"job\"} stays pinned; /readyz says the pool is exhausted",
            "docs/diagnose.md#6-mysql-calls-hang-while-b-is-idle",
        ),
    };
    Signal { text, docs }
}

/// How one switch was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchScore {
    pub switch: Switch,
    /// The latest answer, if any.
    pub latest: Option<String>,
    /// Whether the latest answer is the switch's value in the drill.
    pub right: bool,
    /// From the drill's start to the first record that answered it right.
    pub first_right_after: Option<Duration>,
}

/// A drill's result, one entry per switch in `Switch::ALL` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    pub switches: Vec<SwitchScore>,
}

impl Score {
    /// Switches whose latest answer is right.
    pub fn right(&self) -> usize {
        self.switches.iter().filter(|s| s.right).count()
    }

    /// Right switches as a whole percentage of all five.
    pub fn percent(&self) -> usize {
        (self.right() * 100)
            .checked_div(self.switches.len())
            .unwrap_or(0)
    }

    /// Switches answered wrong or not at all: the missed causes.
    pub fn missed(&self) -> Vec<Switch> {
        self.switches
            .iter()
            .filter(|s| !s.right)
            .map(|s| s.switch)
            .collect()
    }
}

/// Scores `log` against `key`. Records count in time order (file order for
/// equal times), so a log appended by hand out of order still scores right.
pub fn score(key: &DrillKey, log: &[AnswerRecord]) -> Score {
    let mut records: Vec<&AnswerRecord> = log.iter().collect();
    records.sort_by_key(|r| r.at_unix_ms);
    let switches = Switch::ALL
        .into_iter()
        .map(|switch| {
            let truth = switch.value_in(&key.faults);
            let answers: Vec<(u64, &String)> = records
                .iter()
                .filter_map(|r| r.answers.get(switch.name()).map(|v| (r.at_unix_ms, v)))
                .collect();
            let latest = answers.last().map(|&(_, v)| v.clone());
            let first_right_after = answers
                .iter()
                .find(|(_, v)| *v == truth)
                .map(|&(at, _)| Duration::from_millis(at.saturating_sub(key.started_at_unix_ms)));
            SwitchScore {
                switch,
                right: latest.as_deref() == Some(truth),
                latest,
                first_right_after,
            }
        })
        .collect();
    Score { switches }
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "score: {} % ({} of {} switches right)",
            self.percent(),
            self.right(),
            self.switches.len()
        )?;
        let width = Switch::ALL
            .map(|s| s.name().len())
            .into_iter()
            .max()
            .unwrap_or(0);
        for s in &self.switches {
            let name = s.switch.name();
            let signal = confirming_signal(s.switch);
            match (&s.latest, s.right) {
                (Some(value), true) => {
                    write!(f, "{name:width$}  right  ({value}")?;
                    if let Some(after) = s.first_right_after {
                        write!(f, ", after {}", format_elapsed(after))?;
                    }
                    writeln!(f, ")")?;
                }
                (Some(value), false) => {
                    writeln!(f, "{name:width$}  missed: you answered \"{value}\"")?;
                }
                (None, _) => writeln!(f, "{name:width$}  missed: not answered")?,
            }
            writeln!(
                f,
                "{:width$}  the incident's form shows: {}  ({})",
                "", signal.text, signal.docs
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::{CauseCount, draw, parse_answers};
    use lab_common::config::Mode;

    const START: u64 = 1_700_000_000_000;

    /// lb, worker and rows buggy; deadline and http_client fixed.
    fn key() -> DrillKey {
        let mut faults = Faults::preset(Mode::Fixed);
        let buggy = Faults::preset(Mode::Buggy);
        faults.lb = buggy.lb;
        faults.worker = buggy.worker;
        faults.rows = buggy.rows;
        DrillKey {
            seed: 1,
            causes: "3".into(),
            faults,
            started_at_unix_ms: START,
        }
    }

    use lab_common::config::Faults;

    fn record(after_secs: u64, answers: &[&str]) -> AnswerRecord {
        AnswerRecord::new(START + after_secs * 1000, &parse_answers(answers).unwrap())
    }

    fn right_answers(key: &DrillKey) -> Vec<String> {
        Switch::ALL
            .into_iter()
            .map(|s| format!("{}={}", s.name(), s.value_in(&key.faults)))
            .collect()
    }

    #[test]
    fn all_right_scores_100_and_lists_times() {
        let key = key();
        let answers = right_answers(&key);
        let log = vec![AnswerRecord::new(
            START + 252_000,
            &parse_answers(&answers).unwrap(),
        )];
        let score = score(&key, &log);
        assert_eq!(score.percent(), 100);
        assert_eq!(score.missed(), vec![]);
        for s in &score.switches {
            assert_eq!(s.first_right_after, Some(Duration::from_secs(252)));
        }
        let text = score.to_string();
        assert!(
            text.starts_with("score: 100 % (5 of 5 switches right)\n"),
            "{text}"
        );
        assert!(
            text.contains("lb           right  (l4, after 4m12s)\n"),
            "{text}"
        );
        assert!(
            text.contains("http_client  right  (shared, after 4m12s)\n"),
            "{text}"
        );
        assert_eq!(text.matches("right  (").count(), 5, "{text}");
        // Every switch, right or not, says how to confirm it.
        for switch in Switch::ALL {
            assert!(text.contains(confirming_signal(switch).text), "{text}");
        }
    }

    #[test]
    fn wrong_answers_name_exactly_the_missed_switches() {
        let key = key();
        let log = vec![record(
            60,
            &[
                "lb=l4",
                "worker=bounded",
                "deadline=ignore",
                "http_client=shared",
                "rows=leak-on-error",
            ],
        )];
        let score = score(&key, &log);
        assert_eq!(score.percent(), 60);
        assert_eq!(score.missed(), vec![Switch::Worker, Switch::Deadline]);
        let text = score.to_string();
        assert!(
            text.starts_with("score: 60 % (3 of 5 switches right)\n"),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        let missed: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].contains("missed"))
            .collect();
        assert_eq!(missed.len(), 2, "{text}");
        let (worker, deadline) = (missed[0], missed[1]);
        assert_eq!(
            lines[worker], "worker       missed: you answered \"bounded\"",
            "{text}"
        );
        assert!(lines[worker + 1].contains(confirming_signal(Switch::Worker).text));
        assert!(
            lines[worker + 1].ends_with("(docs/diagnose.md#3-tasks-pile-up-and-jobs-start-twice)")
        );
        assert_eq!(
            lines[deadline], "deadline     missed: you answered \"ignore\"",
            "{text}"
        );
        assert!(lines[deadline + 1].contains(confirming_signal(Switch::Deadline).text));
        // The right value of a missed switch is not printed.
        assert!(!text.contains("unbounded"), "{text}");
        assert!(!text.contains("propagate"), "{text}");
    }

    #[test]
    fn the_latest_answer_counts_and_the_time_is_the_first_right_one() {
        let key = key();
        let log = vec![
            record(30, &["worker=bounded", "lb=l4"]),
            record(90, &["worker=unbounded"]),
            record(150, &["worker=bounded"]),
            record(200, &["worker=unbounded", "lb=etcd"]),
        ];
        let score = score(&key, &log);
        let worker = &score.switches[1];
        assert_eq!(worker.latest.as_deref(), Some("unbounded"));
        assert!(worker.right);
        assert_eq!(worker.first_right_after, Some(Duration::from_secs(90)));
        let lb = &score.switches[0];
        assert!(!lb.right, "lb's latest answer is wrong");
        assert_eq!(lb.first_right_after, Some(Duration::from_secs(30)));
        assert_eq!(
            score.missed(),
            vec![
                Switch::Lb,
                Switch::Deadline,
                Switch::HttpClient,
                Switch::Rows
            ]
        );
        assert!(
            score
                .to_string()
                .contains("worker       right  (unbounded, after 1m30s)\n")
        );
    }

    #[test]
    fn records_count_in_time_order() {
        let key = key();
        let log = vec![
            record(200, &["worker=unbounded"]),
            record(100, &["worker=bounded"]),
        ];
        let worker = &score(&key, &log).switches[1];
        assert!(worker.right);
        assert_eq!(worker.first_right_after, Some(Duration::from_secs(200)));
    }

    #[test]
    fn an_empty_log_scores_0_with_nothing_answered() {
        let score = score(&key(), &[]);
        assert_eq!(score.percent(), 0);
        assert_eq!(score.missed(), Switch::ALL.to_vec());
        let text = score.to_string();
        assert!(
            text.starts_with("score: 0 % (0 of 5 switches right)\n"),
            "{text}"
        );
        assert_eq!(text.matches("missed: not answered\n").count(), 5, "{text}");
        for switch in Switch::ALL {
            assert!(text.contains(confirming_signal(switch).docs), "{text}");
        }
    }

    #[test]
    fn any_drawn_key_is_scored_100_by_its_own_values() {
        for seed in 0..20 {
            let key = DrillKey {
                seed,
                causes: "random".into(),
                faults: draw(seed, CauseCount::Random),
                started_at_unix_ms: START,
            };
            let log = vec![AnswerRecord::new(
                START,
                &parse_answers(&right_answers(&key)).unwrap(),
            )];
            assert_eq!(score(&key, &log).percent(), 100);
        }
    }
}
