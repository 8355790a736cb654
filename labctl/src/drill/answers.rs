//! The trainee's answers: `SWITCH=VALUE` words from the command line, and
//! the log of every answer given, which scoring reads back to see both the
//! latest answer and when each cause was first found.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
};

use lab_common::{config::Mode, faults::Switch};
use serde::{Deserialize, Serialize};

use super::causes::value_of;
use crate::faults::{Assignment, AssignmentError};

/// The values a drill sets `switch` to, buggy form first: the only answers.
pub fn allowed_answers(switch: Switch) -> [&'static str; 2] {
    [value_of(switch, Mode::Buggy), value_of(switch, Mode::Fixed)]
}

/// One command line's answers, at most one per switch, in `Switch::ALL` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers(Vec<(Switch, &'static str)>);

impl Answers {
    /// The answer for `switch`, if one was given.
    pub fn get(&self, switch: Switch) -> Option<&'static str> {
        self.0.iter().find(|(s, _)| *s == switch).map(|&(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Switch, &'static str)> + '_ {
        self.0.iter().copied()
    }
}

/// Why a command line's answers were refused; none of them is recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error(
        "no answers given; answer as SWITCH=VALUE, switches: {}",
        switch_names()
    )]
    Empty,
    #[error("`{arg}` is not SWITCH=VALUE; switches: {}", switch_names())]
    NotKeyValue { arg: String },
    #[error("unknown switch `{name}`; switches: {}", switch_names())]
    UnknownSwitch { name: String },
    #[error("invalid answer for `{switch}`: `{value}`; expected one of {}", allowed_answers(*switch).join(", "))]
    BadValue { switch: Switch, value: String },
    #[error("`{switch}` is answered more than once; give one answer per switch")]
    Repeated { switch: Switch },
}

fn switch_names() -> String {
    Switch::ALL.map(|s| s.name()).join(", ")
}

/// Parses `["lb=l4", "worker=bounded", …]`: every switch known, every value
/// one of [`allowed_answers`], no switch twice.
pub fn parse_answers<S: AsRef<str>>(args: &[S]) -> Result<Answers, AnswerError> {
    if args.is_empty() {
        return Err(AnswerError::Empty);
    }
    let mut given: Vec<(Switch, &'static str)> = Vec::with_capacity(args.len());
    for arg in args {
        // The same KEY=VALUE parsing as `labctl faults set`, then the
        // narrower set of values a drill draws.
        let Assignment { switch, value } = arg.as_ref().parse().map_err(|e| match e {
            AssignmentError::NotAnAssignment(arg) => AnswerError::NotKeyValue { arg },
            AssignmentError::UnknownSwitch { name } => AnswerError::UnknownSwitch { name },
            AssignmentError::BadValue { switch, value } => AnswerError::BadValue { switch, value },
            AssignmentError::Repeated(switch) => AnswerError::Repeated { switch },
        })?;
        if !allowed_answers(switch).contains(&value) {
            return Err(AnswerError::BadValue {
                switch,
                value: value.to_owned(),
            });
        }
        if given.iter().any(|(s, _)| *s == switch) {
            return Err(AnswerError::Repeated { switch });
        }
        given.push((switch, value));
    }
    given.sort_by_key(|(s, _)| Switch::ALL.iter().position(|x| x == s));
    Ok(Answers(given))
}

/// One `labctl drill answer`, as a line of the answer log. Values are kept
/// as strings: the log is a plain file, and scoring compares text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerRecord {
    pub at_unix_ms: u64,
    /// Switch name → answered value.
    pub answers: BTreeMap<String, String>,
}

impl AnswerRecord {
    pub fn new(at_unix_ms: u64, answers: &Answers) -> Self {
        Self {
            at_unix_ms,
            answers: answers
                .iter()
                .map(|(s, v)| (s.name().to_owned(), v.to_owned()))
                .collect(),
        }
    }
}

/// One line of the answer log: the record and its MAC (HMAC-SHA256 under
/// the drill token). The log sits in the state dir, which the trainee can
/// write to; the MAC makes a line added or edited there (a backdated right
/// answer) fail to read instead of scoring.
#[derive(Serialize, Deserialize)]
struct SignedLine {
    #[serde(flatten)]
    record: AnswerRecord,
    mac: String,
}

/// The HMAC key for the answer log: the drill token.
fn mac_key(token: &str) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.trim().as_bytes())
}

/// What the MAC covers: a purpose label and the record's JSON.
fn mac_message(record: &AnswerRecord) -> Result<Vec<u8>, serde_json::Error> {
    let mut message = b"grpc-incident-lab drill answer v1\n".to_vec();
    message.extend(serde_json::to_vec(record)?);
    Ok(message)
}

/// The MAC of `record` under `token` (hex).
fn mac_of(record: &AnswerRecord, token: &str) -> Result<String, serde_json::Error> {
    let tag = ring::hmac::sign(&mac_key(token), &mac_message(record)?);
    Ok(tag.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `mac` (hex) is `record`'s MAC under `token` (compared in
/// constant time by ring).
fn mac_matches(record: &AnswerRecord, mac: &str, token: &str) -> Result<bool, serde_json::Error> {
    let Some(tag) = super::seal::from_hex(mac) else {
        return Ok(false);
    };
    Ok(ring::hmac::verify(&mac_key(token), &mac_message(record)?, &tag).is_ok())
}

/// Why the answer log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AnswerLogError {
    #[error(
        "answer log {} line {line} was not written by `labctl drill answer` with this \
         drill's token (edited, or from another drill): not scored",
        path.display()
    )]
    Forged { path: PathBuf, line: usize },
    #[error("answer log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("answer log {} line {line}: {source}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Appends `record`, with its MAC under `token`, to the log at `path` as
/// one JSON line, creating the file if needed. One write per line, so
/// records never interleave.
pub fn append_record(
    path: &Path,
    record: &AnswerRecord,
    token: &str,
) -> Result<(), AnswerLogError> {
    let io = |source| AnswerLogError::Io {
        path: path.to_owned(),
        source,
    };
    let encoding = |source| AnswerLogError::Parse {
        path: path.to_owned(),
        line: 0,
        source,
    };
    let signed = SignedLine {
        record: record.clone(),
        mac: mac_of(record, token).map_err(encoding)?,
    };
    let mut line = serde_json::to_string(&signed).map_err(encoding)?;
    line.push('\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?
        .write_all(line.as_bytes())
        .map_err(io)
}

/// Every record in the log at `path`, in file order, each checked against
/// its MAC under `token`; none if the file does not exist yet (no answer
/// given). Blank lines are skipped.
pub fn read_records(path: &Path, token: &str) -> Result<Vec<AnswerRecord>, AnswerLogError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AnswerLogError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let parse = |source| AnswerLogError::Parse {
                path: path.to_owned(),
                line: i + 1,
                source,
            };
            let signed: SignedLine = serde_json::from_str(line).map_err(parse)?;
            if mac_matches(&signed.record, &signed.mac, token).map_err(parse)? {
                Ok(signed.record)
            } else {
                Err(AnswerLogError::Forged {
                    path: path.to_owned(),
                    line: i + 1,
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_into_switch_order() {
        let answers = parse_answers(&[
            "rows=close",
            "lb=l4",
            " worker = bounded ",
            "http_client=shared",
        ])
        .unwrap();
        assert_eq!(
            answers.iter().collect::<Vec<_>>(),
            vec![
                (Switch::Lb, "l4"),
                (Switch::Worker, "bounded"),
                (Switch::HttpClient, "shared"),
                (Switch::Rows, "close"),
            ]
        );
        assert_eq!(answers.get(Switch::Deadline), None);
        assert_eq!(answers.get(Switch::Rows), Some("close"));
    }

    #[test]
    fn a_bad_value_names_the_switch_the_value_and_the_allowed_ones() {
        let err = parse_answers(&["lb=l7"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid answer for `lb`: `l7`; expected one of l4, etcd"
        );
        let err = parse_answers(&["worker=capped"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid answer for `worker`: `capped`; expected one of unbounded, bounded"
        );
        let err = parse_answers(&["rows="]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid answer for `rows`: ``; expected one of leak-on-error, close"
        );
    }

    #[test]
    fn an_unknown_switch_names_the_switches() {
        let err = parse_answers(&["http-client=shared"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown switch `http-client`; switches: lb, worker, deadline, http_client, rows"
        );
        let err = parse_answers(&["lb"]).unwrap_err();
        assert!(matches!(err, AnswerError::NotKeyValue { .. }), "{err}");
        assert!(err.to_string().contains("switches: lb, worker"), "{err}");
        assert_eq!(parse_answers::<&str>(&[]).unwrap_err(), AnswerError::Empty);
    }

    #[test]
    fn a_repeated_switch_is_refused() {
        let err = parse_answers(&["lb=l4", "rows=close", "lb=etcd"]).unwrap_err();
        assert_eq!(err, AnswerError::Repeated { switch: Switch::Lb });
        assert_eq!(
            err.to_string(),
            "`lb` is answered more than once; give one answer per switch"
        );
    }

    #[test]
    fn the_log_reads_back_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.jsonl");
        assert_eq!(read_records(&path, TOKEN).unwrap(), vec![]);
        let first = AnswerRecord::new(10, &parse_answers(&["lb=l4"]).unwrap());
        let second = AnswerRecord::new(
            20,
            &parse_answers(&["worker=bounded", "deadline=ignore"]).unwrap(),
        );
        append_record(&path, &first, TOKEN).unwrap();
        append_record(&path, &second, TOKEN).unwrap();
        assert_eq!(read_records(&path, TOKEN).unwrap(), vec![first, second]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.lines()
                .next()
                .unwrap()
                .starts_with(r#"{"at_unix_ms":10,"answers":{"lb":"l4"},"mac":""#),
            "{text}"
        );
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    /// A trainee who can write the state dir cannot add a backdated right
    /// answer, edit one, or bring a log from another drill.
    #[test]
    fn a_line_not_written_with_the_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.jsonl");
        let honest = AnswerRecord::new(50_000, &parse_answers(&["lb=l4"]).unwrap());
        append_record(&path, &honest, TOKEN).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();

        let backdated = written.replace("50000", "1000");
        std::fs::write(&path, &backdated).unwrap();
        let err = read_records(&path, TOKEN).unwrap_err();
        assert!(
            matches!(err, AnswerLogError::Forged { line: 1, .. }),
            "{err}"
        );

        let unsigned = r#"{"at_unix_ms":1,"answers":{"lb":"etcd"},"mac":"00"}"#;
        std::fs::write(&path, format!("{written}{unsigned}\n")).unwrap();
        let err = read_records(&path, TOKEN).unwrap_err();
        assert!(
            matches!(err, AnswerLogError::Forged { line: 2, .. }),
            "{err}"
        );

        std::fs::write(&path, &written).unwrap();
        assert!(read_records(&path, "another-drill-token").is_err());
        assert_eq!(read_records(&path, TOKEN).unwrap(), vec![honest]);
    }

    #[test]
    fn a_broken_log_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.jsonl");
        let record = AnswerRecord::new(1, &parse_answers(&["lb=l4"]).unwrap());
        append_record(&path, &record, TOKEN).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{first}\nnot json\n")).unwrap();
        let err = read_records(&path, TOKEN).unwrap_err();
        assert!(
            matches!(err, AnswerLogError::Parse { line: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
