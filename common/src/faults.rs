//! The fault switches as they are *now*, changeable while the process runs.
//!
//! Each process owns some switches (A: `lb`, `deadline`; B: `worker`,
//! `deadline`, `http_client`, `rows`; partner-api: none) and holds them in a
//! [`LiveFaults`]: the code of each cause reads the current value per call,
//! or [subscribes](LiveFaults::subscribe) to rebuild what depends on it.
//! `PUT /faults` on the admin listener applies a partial JSON patch through
//! [`LiveFaults::apply`]; the effective values are exported as
//! `lab_fault_info{switch,value}` (1 for the value in force, 0 for the
//! others) so dashboards can mark when a switch flipped.

use std::{fmt, sync::Arc};

use prometheus::{IntGaugeVec, Opts, Registry};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::config::{
    DeadlineMode, Faults, HttpClientMode, LabConfig, LbMode, RowsMode, SwitchValue, WorkerMode,
};

/// One fault switch, by its config name under `[faults]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Switch {
    Lb,
    Worker,
    Deadline,
    HttpClient,
    Rows,
}

impl Switch {
    pub const ALL: [Switch; 5] = [
        Switch::Lb,
        Switch::Worker,
        Switch::Deadline,
        Switch::HttpClient,
        Switch::Rows,
    ];

    /// The switches service A owns. `deadline` is also B's: the same cause
    /// (bounded work, deadlines honoured) at each hop.
    pub const SERVICE_A: &'static [Switch] = &[Switch::Lb, Switch::Deadline];
    /// The switches service B owns.
    pub const SERVICE_B: &'static [Switch] = &[
        Switch::Worker,
        Switch::Deadline,
        Switch::HttpClient,
        Switch::Rows,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Switch::Lb => "lb",
            Switch::Worker => "worker",
            Switch::Deadline => "deadline",
            Switch::HttpClient => "http_client",
            Switch::Rows => "rows",
        }
    }

    fn from_name(name: &str) -> Option<Switch> {
        Switch::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The process(es) that own the switch, for error messages.
    fn owner(self) -> &'static str {
        match (
            Switch::SERVICE_A.contains(&self),
            Switch::SERVICE_B.contains(&self),
        ) {
            (true, true) => "service-a and service-b",
            (true, false) => "service-a",
            _ => "service-b",
        }
    }

    /// Every value the switch takes, as written in config and JSON.
    pub fn values(self) -> Vec<&'static str> {
        match self {
            Switch::Lb => names::<LbMode>(),
            Switch::Worker => names::<WorkerMode>(),
            Switch::Deadline => names::<DeadlineMode>(),
            Switch::HttpClient => names::<HttpClientMode>(),
            Switch::Rows => names::<RowsMode>(),
        }
    }

    /// The switch's value in `faults`, as written in config and JSON.
    pub fn value_in(self, faults: &Faults) -> &'static str {
        match self {
            Switch::Lb => faults.lb.as_str(),
            Switch::Worker => faults.worker.as_str(),
            Switch::Deadline => faults.deadline.as_str(),
            Switch::HttpClient => faults.http_client.as_str(),
            Switch::Rows => faults.rows.as_str(),
        }
    }

    /// Sets the switch in `faults` from its written name.
    fn set(self, faults: &mut Faults, value: &Value) -> Result<(), PatchError> {
        let bad_value = || PatchError::BadValue {
            switch: self,
            value: value.to_string(),
        };
        match self {
            Switch::Lb => faults.lb = parse(value).ok_or_else(bad_value)?,
            Switch::Worker => faults.worker = parse(value).ok_or_else(bad_value)?,
            Switch::Deadline => faults.deadline = parse(value).ok_or_else(bad_value)?,
            Switch::HttpClient => faults.http_client = parse(value).ok_or_else(bad_value)?,
            Switch::Rows => faults.rows = parse(value).ok_or_else(bad_value)?,
        }
        Ok(())
    }
}

impl fmt::Display for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn names<E: SwitchValue>() -> Vec<&'static str> {
    E::ALL.iter().map(|v| v.as_str()).collect()
}

fn parse<E: DeserializeOwned>(value: &Value) -> Option<E> {
    serde_json::from_value(value.clone()).ok()
}

/// Why a `PUT /faults` patch was refused; nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("expected a JSON object of switches, e.g. {{\"worker\":\"bounded\"}}")]
    NotAnObject,
    #[error("the patch names no switch; this process owns: {owned}")]
    Empty { owned: String },
    #[error("unknown switch `{name}`; switches: lb, worker, deadline, http_client, rows")]
    UnknownSwitch { name: String },
    #[error(
        "`{switch}` is not switched here: {service} owns {owned}; `{switch}` belongs to {owner}"
    )]
    NotOwned {
        switch: Switch,
        service: &'static str,
        owned: String,
        owner: &'static str,
    },
    #[error("invalid value for `{switch}`: {value}; expected one of {}", switch.values().join(", "))]
    BadValue { switch: Switch, value: String },
}

/// A switch that changed: what, from, to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flip {
    pub switch: Switch,
    pub from: &'static str,
    pub to: &'static str,
}

/// The switches of one process, live. Cheap to clone.
#[derive(Clone)]
pub struct LiveFaults {
    inner: Arc<Inner>,
}

struct Inner {
    service: &'static str,
    owned: &'static [Switch],
    sender: watch::Sender<Faults>,
    info: IntGaugeVec,
    /// In a drill: the values are not exported or logged.
    hidden: bool,
}

impl LiveFaults {
    /// Starts from `initial` (the configured switches); only `owned` can be
    /// changed, and only they are exported as `lab_fault_info`.
    pub fn new(
        service: &'static str,
        initial: Faults,
        owned: &'static [Switch],
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        Self::build(service, initial, owned, registry, false)
    }

    /// The switches of `config`; hidden when it carries a drill token
    /// (`admin.drill_token`): then `lab_fault_info` is not registered and a
    /// flip is logged without its switch or values, so neither `/metrics`
    /// nor the log gives a drill's answer away.
    pub fn from_config(
        service: &'static str,
        config: &LabConfig,
        owned: &'static [Switch],
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let hidden = config.admin.drill_token.is_set();
        Self::build(service, config.faults, owned, registry, hidden)
    }

    fn build(
        service: &'static str,
        initial: Faults,
        owned: &'static [Switch],
        registry: &Registry,
        hidden: bool,
    ) -> prometheus::Result<Self> {
        let info = IntGaugeVec::new(
            Opts::new(
                "lab_fault_info",
                "1 for the value of each fault switch this process owns that is in force, 0 for its other values.",
            ),
            &["switch", "value"],
        )?;
        if !hidden {
            registry.register(Box::new(info.clone()))?;
        }
        let live = Self {
            inner: Arc::new(Inner {
                service,
                owned,
                sender: watch::Sender::new(initial),
                info,
                hidden,
            }),
        };
        live.export(&initial);
        Ok(live)
    }

    /// The switches in force now.
    pub fn current(&self) -> Faults {
        *self.inner.sender.borrow()
    }

    /// A receiver that sees every change, for code that rebuilds something
    /// when a switch flips (A's channel, B's worker loop).
    pub fn subscribe(&self) -> watch::Receiver<Faults> {
        self.inner.sender.subscribe()
    }

    /// Whether this process is in a drill (switches hidden).
    pub fn hidden(&self) -> bool {
        self.inner.hidden
    }

    /// The switches this process owns.
    pub fn owned(&self) -> &'static [Switch] {
        self.inner.owned
    }

    /// The owned switches and their values now, as `GET /faults` shows them.
    pub fn owned_values(&self) -> Map<String, Value> {
        let faults = self.current();
        self.inner
            .owned
            .iter()
            .map(|s| (s.name().to_string(), Value::from(s.value_in(&faults))))
            .collect()
    }

    /// Applies a partial patch such as `{"worker":"bounded"}`: every key
    /// must be a switch this process owns with a valid value, or nothing is
    /// applied. Each change is logged with `by` (who asked). Returns the
    /// switches that actually changed.
    pub fn apply(&self, patch: &Value, by: &str) -> Result<Vec<Flip>, PatchError> {
        let object = patch.as_object().ok_or(PatchError::NotAnObject)?;
        if object.is_empty() {
            return Err(PatchError::Empty {
                owned: self.owned_list(),
            });
        }
        let mut entries = Vec::with_capacity(object.len());
        for (name, value) in object {
            let switch = Switch::from_name(name)
                .ok_or_else(|| PatchError::UnknownSwitch { name: name.clone() })?;
            if !self.inner.owned.contains(&switch) {
                return Err(PatchError::NotOwned {
                    switch,
                    service: self.inner.service,
                    owned: self.owned_list(),
                    owner: switch.owner(),
                });
            }
            entries.push((switch, value));
        }
        // Read, change and export under the watch's write lock, so two
        // patches at once cannot undo each other or leave two values of a
        // switch at 1 in `lab_fault_info`.
        let mut outcome = Ok(Vec::new());
        self.inner.sender.send_if_modified(|faults| {
            let before = *faults;
            let mut after = before;
            for (switch, value) in &entries {
                if let Err(e) = switch.set(&mut after, value) {
                    outcome = Err(e);
                    return false;
                }
            }
            let flips: Vec<Flip> = self
                .inner
                .owned
                .iter()
                .filter(|s| s.value_in(&before) != s.value_in(&after))
                .map(|&switch| Flip {
                    switch,
                    from: switch.value_in(&before),
                    to: switch.value_in(&after),
                })
                .collect();
            let changed = !flips.is_empty();
            if changed {
                *faults = after;
                self.export(&after);
            }
            outcome = Ok(flips);
            changed
        });
        let flips = outcome?;
        if self.inner.hidden && !flips.is_empty() {
            tracing::warn!(
                service = self.inner.service,
                by,
                "fault switches set by the operator (a drill: which and to what is hidden)"
            );
            return Ok(flips);
        }
        for flip in &flips {
            tracing::warn!(
                service = self.inner.service,
                switch = %flip.switch,
                from = flip.from,
                to = flip.to,
                by,
                "fault switch flipped"
            );
        }
        Ok(flips)
    }

    fn owned_list(&self) -> String {
        if self.inner.owned.is_empty() {
            return "no switches".into();
        }
        self.inner
            .owned
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn export(&self, faults: &Faults) {
        for switch in self.inner.owned {
            let now = switch.value_in(faults);
            for value in switch.values() {
                self.inner
                    .info
                    .with_label_values(&[switch.name(), value])
                    .set(i64::from(value == now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use serde_json::json;

    fn live(owned: &'static [Switch]) -> (LiveFaults, Registry) {
        let registry = Registry::new();
        let faults = LiveFaults::new("service-b", Faults::preset(Mode::Buggy), owned, &registry)
            .expect("live faults");
        (faults, registry)
    }

    fn info(registry: &Registry, switch: &str, value: &str) -> Option<i64> {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == "lab_fault_info")?
            .get_metric()
            .iter()
            .find(|m| {
                let labels = m.get_label();
                labels
                    .iter()
                    .any(|l| l.name() == "switch" && l.value() == switch)
                    && labels
                        .iter()
                        .any(|l| l.name() == "value" && l.value() == value)
            })
            .map(|m| m.get_gauge().value() as i64)
    }

    #[test]
    fn a_patch_flips_the_switch_wakes_subscribers_and_moves_the_metric() {
        let (faults, registry) = live(Switch::SERVICE_B);
        let mut watcher = faults.subscribe();
        assert_eq!(info(&registry, "worker", "unbounded"), Some(1));
        let flips = faults
            .apply(
                &json!({"worker": "bounded", "rows": "leak-on-error"}),
                "test",
            )
            .expect("applied");
        assert_eq!(
            flips,
            vec![Flip {
                switch: Switch::Worker,
                from: "unbounded",
                to: "bounded"
            }]
        );
        assert!(watcher.has_changed().expect("sender alive"));
        assert_eq!(watcher.borrow_and_update().worker, WorkerMode::Bounded);
        assert_eq!(info(&registry, "worker", "unbounded"), Some(0));
        assert_eq!(info(&registry, "worker", "bounded"), Some(1));
        assert_eq!(info(&registry, "worker", "capped"), Some(0));
    }

    #[test]
    fn a_patch_with_any_bad_entry_applies_nothing() {
        let (faults, _) = live(Switch::SERVICE_B);
        let before = faults.current();
        let err = faults
            .apply(&json!({"worker": "bounded", "lb": "etcd"}), "test")
            .expect_err("lb is A's");
        assert!(err.to_string().contains("belongs to service-a"), "{err}");
        let err = faults
            .apply(&json!({"worker": "bounded", "rows": "sometimes"}), "test")
            .expect_err("bad value");
        assert_eq!(
            err.to_string(),
            "invalid value for `rows`: \"sometimes\"; expected one of leak-on-error, close"
        );
        let err = faults
            .apply(&json!({"wroker": "bounded"}), "test")
            .expect_err("typo");
        assert!(err.to_string().contains("unknown switch `wroker`"), "{err}");
        assert_eq!(
            faults.apply(&json!([]), "test"),
            Err(PatchError::NotAnObject)
        );
        assert!(matches!(
            faults.apply(&json!({}), "test"),
            Err(PatchError::Empty { .. })
        ));
        assert_eq!(faults.current(), before);
    }

    #[test]
    fn patches_at_once_on_different_switches_all_stick() {
        let (faults, registry) = live(Switch::SERVICE_B);
        let rounds = 500;
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                for i in 0..rounds {
                    let value = if i % 2 == 0 { "bounded" } else { "capped" };
                    faults
                        .apply(&json!({"worker": value}), "a")
                        .expect("worker patch");
                }
            });
            let rows = scope.spawn(|| {
                for i in 0..rounds {
                    let value = if i % 2 == 0 { "close" } else { "leak-on-error" };
                    faults
                        .apply(&json!({"rows": value}), "b")
                        .expect("rows patch");
                }
            });
            worker.join().expect("worker thread");
            rows.join().expect("rows thread");
        });
        // The last patch of each thread set its switch; neither undid the other's.
        let now = faults.current();
        assert_eq!(now.worker, WorkerMode::Capped);
        assert_eq!(now.rows, RowsMode::LeakOnError);
        for switch in [Switch::Worker, Switch::Rows] {
            let ones: i64 = switch
                .values()
                .iter()
                .map(|v| info(&registry, switch.name(), v).unwrap_or(0))
                .sum();
            assert_eq!(ones, 1, "{switch}: exactly one value at 1");
        }
        assert_eq!(info(&registry, "worker", "capped"), Some(1));
        assert_eq!(info(&registry, "rows", "leak-on-error"), Some(1));
    }

    #[test]
    fn only_owned_switches_are_shown_and_exported() {
        let (faults, registry) = live(Switch::SERVICE_A);
        assert_eq!(
            Value::Object(faults.owned_values()),
            json!({"lb": "l4", "deadline": "ignore"})
        );
        assert_eq!(info(&registry, "lb", "l4"), Some(1));
        assert_eq!(info(&registry, "deadline", "ignore"), Some(1));
        assert_eq!(info(&registry, "worker", "unbounded"), None);
    }
}
