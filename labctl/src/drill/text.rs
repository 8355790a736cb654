//! The texts a drill shows: the trainee's brief at the start, and the
//! answer key at the reveal.

use std::{fmt::Write, time::Duration};

use lab_common::{config::Mode, faults::Switch};

use super::{DrillKey, allowed_answers, form_in};

/// What the brief needs to know about the running lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BriefInputs {
    pub started_at_unix_ms: u64,
    /// Service A's public HTTP listener.
    pub a_url: String,
    /// Admin listeners: a process's name and its base URL.
    pub endpoints: Vec<(String, String)>,
    /// HAProxy's stats page, when the lab runs HAProxy.
    pub slb_stats_url: Option<String>,
    /// The file holding the operator token for the protected admin routes.
    pub admin_token_path: String,
}

/// Heading of the brief's last section, the only one that names values.
const HOW_TO_ANSWER: &str = "How to answer";

/// The trainee's brief. It names no cause and no switch value before the
/// answer instructions, since a drill may have any subset of causes and
/// the brief must not hint at which.
pub fn brief(inputs: &BriefInputs) -> String {
    let mut out = String::new();
    let started = rfc3339_utc(inputs.started_at_unix_ms);
    // Writing to a String cannot fail.
    let _ = write_brief(&mut out, inputs, &started);
    out
}

fn write_brief(out: &mut String, inputs: &BriefInputs, started: &str) -> std::fmt::Result {
    writeln!(out, "Incident drill")?;
    writeln!(out)?;
    writeln!(out, "What the users report")?;
    writeln!(out)?;
    for line in [
        "Since this morning, partners say the partner-facing API (service A) is",
        "unreliable: many of their calls time out or fail, more so at busy times.",
        "Some job results arrive very late, and a few seem to arrive twice. The",
        "on-call dashboards show memory use creeping up.",
        "",
        "The reports come from different teams and not every one may hold up:",
        "the lab may have several causes in force, one, or none at all. Find out",
        "which from what the lab itself shows.",
    ] {
        if line.is_empty() {
            writeln!(out)?;
        } else {
            writeln!(out, "  {line}")?;
        }
    }
    writeln!(out)?;

    writeln!(out, "Where to look")?;
    writeln!(out)?;
    writeln!(out, "  service A (HTTP): {}", inputs.a_url)?;
    writeln!(
        out,
        "  Admin listeners, each with /metrics, /readyz, /debug/pprof/profile,"
    )?;
    writeln!(out, "  /debug/pprof/heap and /debug/tasks:")?;
    if inputs.endpoints.is_empty() {
        writeln!(out, "    (none given)")?;
    }
    let width = inputs
        .endpoints
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    for (name, url) in &inputs.endpoints {
        writeln!(out, "    {name:width$}  {url}")?;
    }
    if let Some(stats) = &inputs.slb_stats_url {
        writeln!(out, "  HAProxy stats: {stats}")?;
    }
    writeln!(
        out,
        "  The profiles and /debug/tasks need the operator token in {}:",
        inputs.admin_token_path
    )?;
    let example = inputs
        .endpoints
        .first()
        .map_or("ADMIN_URL", |(_, url)| url.as_str());
    writeln!(
        out,
        "    curl -H \"Authorization: Bearer $(cat {})\" {example}/debug/tasks",
        inputs.admin_token_path
    )?;
    writeln!(out)?;

    writeln!(out, "Clock")?;
    writeln!(out)?;
    writeln!(
        out,
        "  The drill started at {started} (UTC). Each cause you find"
    )?;
    writeln!(
        out,
        "  is timed from then to your first right answer for it."
    )?;
    writeln!(out)?;

    writeln!(out, "{HOW_TO_ANSWER}")?;
    writeln!(out)?;
    writeln!(
        out,
        "  Tell the facilitator each cause you have confirmed, and the signal that"
    )?;
    writeln!(
        out,
        "  confirms it. They record it (the check needs their drill token) with:"
    )?;
    let placeholders: Vec<String> = Switch::ALL.iter().map(|s| format!("{s}=…")).collect();
    writeln!(out, "    labctl drill answer {}", placeholders.join(" "))?;
    writeln!(out)?;
    writeln!(
        out,
        "  Each switch is in one of two forms, the incident's (first) or the fix's:"
    )?;
    let width = name_width();
    for switch in Switch::ALL {
        let [buggy, fixed] = allowed_answers(switch);
        writeln!(out, "    {:width$}  {buggy} | {fixed}", switch.name())?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "  Answer some switches at a time, as you confirm them: the latest answer"
    )?;
    writeln!(
        out,
        "  for each switch counts, and a switch never answered counts as missed."
    )
}

/// The answer key for `labctl drill reveal`: how the drill was drawn and
/// each switch's value with its form.
pub fn render_key(key: &DrillKey) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_key(&mut out, key);
    out
}

fn write_key(out: &mut String, key: &DrillKey) -> std::fmt::Result {
    writeln!(out, "seed     {}", key.seed)?;
    writeln!(out, "causes   {}", key.causes)?;
    writeln!(out, "started  {}", rfc3339_utc(key.started_at_unix_ms))?;
    let width = name_width();
    let value_width = Switch::ALL
        .map(|s| s.value_in(&key.faults).len())
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut buggy = 0;
    for switch in Switch::ALL {
        let form = match form_in(switch, &key.faults) {
            Some(Mode::Buggy) => {
                buggy += 1;
                "buggy"
            }
            Some(Mode::Fixed) => "fixed",
            None => "neither preset's form",
        };
        let value = switch.value_in(&key.faults);
        writeln!(
            out,
            "{:width$}  {value:value_width$}  {form}",
            switch.name()
        )?;
    }
    writeln!(out, "{buggy} of {} switches buggy", Switch::ALL.len())
}

fn name_width() -> usize {
    Switch::ALL
        .map(|s| s.name().len())
        .into_iter()
        .max()
        .unwrap_or(0)
}

/// `4m12s`: whole seconds, compact, for a report line.
pub(super) fn format_elapsed(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// Unix milliseconds as RFC 3339 in UTC, whole seconds. Done here rather
/// than with humantime, which refuses years past 9999 with a formatting
/// error that `format!` would turn into a panic.
pub(super) fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01, counted in 400-year
/// eras that start on March 1st so the leap day falls at an era's end
/// (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::{CauseCount, draw};
    use lab_common::config::{Faults, LbMode};
    use std::time::UNIX_EPOCH;

    fn inputs() -> BriefInputs {
        BriefInputs {
            started_at_unix_ms: 1_700_000_000_123,
            a_url: "http://127.0.0.1:8080".into(),
            endpoints: vec![
                ("service-a".into(), "http://127.0.0.1:9080".into()),
                ("service-b-1".into(), "http://127.0.0.1:9081".into()),
                ("service-b-2".into(), "http://127.0.0.1:9082".into()),
                ("partner-api".into(), "http://127.0.0.1:9090".into()),
            ],
            slb_stats_url: Some("http://127.0.0.1:8404/stats".into()),
            admin_token_path: ".lab/admin.token".into(),
        }
    }

    #[test]
    fn the_brief_names_no_value_before_how_to_answer() {
        let text = brief(&inputs());
        let (before, after) = text.split_once(HOW_TO_ANSWER).unwrap();
        let before_lower = before.to_lowercase();
        for switch in Switch::ALL {
            for value in switch.values() {
                assert!(
                    !before_lower.contains(value),
                    "`{value}` before the answer section:\n{before}"
                );
            }
            let named = before_lower
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|word| word == switch.name());
            assert!(
                !named,
                "switch `{switch}` named before the answer section:\n{before}"
            );
            for value in allowed_answers(switch) {
                assert!(after.contains(value), "`{value}` not offered:\n{after}");
            }
        }
        assert!(
            after.contains("labctl drill answer lb=… worker=… deadline=… http_client=… rows=…")
        );
        assert!(after.contains("    lb           l4 | etcd\n"), "{after}");
        assert!(
            after.contains("    rows         leak-on-error | close\n"),
            "{after}"
        );
    }

    #[test]
    fn the_brief_lists_endpoints_token_and_start_time() {
        let text = brief(&inputs());
        for needle in [
            "service A (HTTP): http://127.0.0.1:8080",
            "/metrics, /readyz, /debug/pprof/profile,",
            "/debug/pprof/heap and /debug/tasks",
            "    service-b-2  http://127.0.0.1:9082\n",
            "HAProxy stats: http://127.0.0.1:8404/stats",
            "operator token in .lab/admin.token",
            "Bearer $(cat .lab/admin.token)\" http://127.0.0.1:9080/debug/tasks",
            "started at 2023-11-14T22:13:20Z (UTC)",
        ] {
            assert!(text.contains(needle), "`{needle}` missing:\n{text}");
        }
        let bare = brief(&BriefInputs {
            endpoints: vec![],
            slb_stats_url: None,
            ..inputs()
        });
        assert!(!bare.contains("HAProxy"), "{bare}");
        assert!(bare.contains("(none given)"), "{bare}");
    }

    #[test]
    fn the_key_shows_seed_causes_and_each_form() {
        let key = DrillKey {
            seed: 7,
            causes: "all".into(),
            faults: draw(7, CauseCount::All),
            started_at_unix_ms: 0,
        };
        assert_eq!(
            render_key(&key),
            "seed     7\n\
             causes   all\n\
             started  1970-01-01T00:00:00Z\n\
             lb           l4             buggy\n\
             worker       unbounded      buggy\n\
             deadline     ignore         buggy\n\
             http_client  per-request    buggy\n\
             rows         leak-on-error  buggy\n\
             5 of 5 switches buggy\n"
        );
        let mut faults = Faults::preset(Mode::Fixed);
        faults.lb = LbMode::L7;
        let text = render_key(&DrillKey { faults, ..key });
        assert!(
            text.contains("lb           l7         neither preset's form\n"),
            "{text}"
        );
        assert!(text.contains("worker       bounded    fixed\n"), "{text}");
        assert!(text.ends_with("0 of 5 switches buggy\n"), "{text}");
    }

    #[test]
    fn elapsed_times_are_compact() {
        assert_eq!(format_elapsed(Duration::from_millis(999)), "0s");
        assert_eq!(format_elapsed(Duration::from_secs(59)), "59s");
        assert_eq!(format_elapsed(Duration::from_secs(252)), "4m12s");
        assert_eq!(format_elapsed(Duration::from_secs(3723)), "1h02m03s");
    }

    #[test]
    fn rfc3339_matches_known_dates_and_humantime() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(253_402_300_799_000), "9999-12-31T23:59:59Z");
        // Past humantime's range it still formats, without panicking.
        assert_eq!(rfc3339_utc(253_402_300_800_000), "10000-01-01T00:00:00Z");
        let mut ms = 0u64;
        while ms < 253_402_300_799_000 {
            let expected =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms))
                    .to_string();
            assert_eq!(rfc3339_utc(ms), expected, "{ms}");
            ms += 86_399_977 * 97; // about 97 days, drifting through the day
        }
    }
}
