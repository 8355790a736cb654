//! `labctl faults`: the fault switches of a running lab as every process
//! has them *now*, read (`GET /faults`, open) and flipped (`PUT /faults`,
//! with the operator token of `<state-dir>/admin.token`) through each
//! process's admin listener. Which process owns which switch is the
//! services' own rule ([`Switch::SERVICE_A`], [`Switch::SERVICE_B`]): `lb`
//! is A's, `deadline` A's and every B's, the others every B's.

use std::{collections::BTreeMap, str::FromStr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use lab_common::{config::AdminToken, faults::Switch};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::state::{LabState, ServiceRecord};

/// How long one admin request may take: a read is short (`labctl status`
/// asks every process, and a frozen one should not hold it up long); a
/// flip gets longer, since a process that is slow to answer may still
/// apply it.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One `KEY=VALUE` of `labctl faults set`, checked against the switches
/// and their values before anything is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub switch: Switch,
    pub value: &'static str,
}

/// Why a `KEY=VALUE` is not a switch assignment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    #[error("expected KEY=VALUE (e.g. worker=bounded), got {0:?}")]
    NotAnAssignment(String),
    #[error("unknown switch {name:?}; switches: {}", switch_names())]
    UnknownSwitch { name: String },
    #[error("invalid value {value:?} for {switch}; expected one of {}", switch.values().join(", "))]
    BadValue { switch: Switch, value: String },
    #[error("{0} is given twice")]
    Repeated(Switch),
}

fn switch_names() -> String {
    Switch::ALL.map(Switch::name).join(", ")
}

impl FromStr for Assignment {
    type Err = AssignmentError;

    /// `lb=etcd` or `faults.lb=etcd`, as in config overrides.
    fn from_str(text: &str) -> Result<Self, AssignmentError> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| AssignmentError::NotAnAssignment(text.to_string()))?;
        let key = key.trim();
        let name = key.strip_prefix("faults.").unwrap_or(key);
        let switch = Switch::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| AssignmentError::UnknownSwitch {
                name: key.to_string(),
            })?;
        let value = value.trim();
        let value = switch
            .values()
            .into_iter()
            .find(|v| *v == value)
            .ok_or_else(|| AssignmentError::BadValue {
                switch,
                value: value.to_string(),
            })?;
        Ok(Self { switch, value })
    }
}

/// Refuses a switch given twice (`lb=l4 lb=etcd`): which one was meant?
pub fn check_distinct(assignments: &[Assignment]) -> Result<(), AssignmentError> {
    for (i, a) in assignments.iter().enumerate() {
        if assignments[..i].iter().any(|b| b.switch == a.switch) {
            return Err(AssignmentError::Repeated(a.switch));
        }
    }
    Ok(())
}

/// Whether the process named `name` owns `switch`.
pub fn owns(name: &str, switch: Switch) -> bool {
    if name == "service-a" {
        Switch::SERVICE_A.contains(&switch)
    } else if name.starts_with("service-b-") {
        Switch::SERVICE_B.contains(&switch)
    } else {
        false
    }
}

/// One process's switches as it reported them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcessFaults {
    pub name: String,
    pub admin_url: String,
    /// The switches it owns and their values in force (empty for a
    /// process that owns none, e.g. partner-api).
    pub faults: Map<String, Value>,
    /// The preset it started with (`buggy`/`fixed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Value>,
    /// Why it could not be read (not running, unreachable, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One switch that changed in one process.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Change {
    pub switch: String,
    pub from: String,
    pub to: String,
}

/// What `set` did to one process.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcessChange {
    pub name: String,
    /// The patch sent, e.g. `{"worker":"bounded"}`.
    pub patch: Map<String, Value>,
    /// Switches that changed (empty: they already had these values).
    pub changed: Vec<Change>,
    /// Its switches in force after the patch.
    pub faults: Map<String, Value>,
    /// Why the patch was not applied here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("not running")]
    NotRunning,
    #[error("invalid admin URL {0:?}")]
    Url(String),
    #[error("{method} {url}: {source}")]
    Request {
        method: &'static str,
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{method} {url}: reading the answer: {source}")]
    Body {
        method: &'static str,
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} {url} timed out after {timeout:?}")]
    Timeout {
        method: &'static str,
        url: String,
        timeout: Duration,
    },
    #[error("{method} {url} answered {status}: {message}")]
    Refused {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {url}: the answer is not the JSON expected: {source}")]
    Json {
        method: &'static str,
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

type AdminClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> AdminClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// `method url` with an optional bearer token and JSON body; the answer
/// as JSON when it is a success. The token is never part of an error.
async fn call(
    client: &AdminClient,
    method: &'static str,
    url: String,
    token: Option<&AdminToken>,
    body: Option<&Value>,
) -> Result<Value, AdminError> {
    let mut request = hyper::Request::builder().method(method).uri(&url);
    if let Some(token) = token {
        request = request.header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", token.expose()),
        );
    }
    let body = match body {
        Some(body) => {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(body.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let request = request
        .body(body)
        .map_err(|_| AdminError::Url(url.clone()))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|source| AdminError::Request {
                method,
                url: url.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|source| AdminError::Body {
                method,
                url: url.clone(),
                source,
            })?
            .to_bytes();
        Ok::<_, AdminError>((status, bytes))
    };
    let timeout = if method == "GET" {
        READ_TIMEOUT
    } else {
        WRITE_TIMEOUT
    };
    let (status, bytes) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AdminError::Timeout {
            method,
            url: url.clone(),
            timeout,
        })??;
    if !(200..300).contains(&status) {
        // The services answer `{"error": "...", "code": "..."}`.
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(AdminError::Refused {
            method,
            url,
            status,
            message,
        });
    }
    serde_json::from_slice(&bytes).map_err(|source| AdminError::Json {
        method,
        url,
        source,
    })
}

/// The lab's own services, which serve `/faults` on their admin listener
/// (HAProxy's stats URL is an admin URL too, but not theirs).
fn is_lab_service(name: &str) -> bool {
    name == "service-a" || name == "partner-api" || name.starts_with("service-b-")
}

/// The lab's services with an admin listener, in start order.
fn with_admin(state: &LabState) -> impl Iterator<Item = (&ServiceRecord, &str)> {
    state
        .services
        .iter()
        .filter(|s| is_lab_service(&s.name))
        .filter_map(|s| Some((s, s.admin_url.as_deref()?)))
}

/// `GET /faults` of one process.
async fn read_one(client: &AdminClient, record: &ServiceRecord, admin_url: &str) -> ProcessFaults {
    let mut shown = ProcessFaults {
        name: record.name.clone(),
        admin_url: admin_url.to_string(),
        faults: Map::new(),
        mode: None,
        error: None,
    };
    if !record.is_alive() {
        shown.error = Some(AdminError::NotRunning.to_string());
        return shown;
    }
    let url = format!("{}/faults", admin_url.trim_end_matches('/'));
    match call(client, "GET", url, None, None).await {
        Ok(mut answer) => {
            if let Some(Value::Object(faults)) = answer.get_mut("faults").map(Value::take) {
                shown.faults = faults;
            }
            shown.mode = answer.get_mut("mode").map(Value::take);
        }
        Err(e) => shown.error = Some(e.to_string()),
    }
    shown
}

/// Every process's switches in force now (`labctl faults`).
pub async fn show(state: &LabState) -> Vec<ProcessFaults> {
    let client = client();
    let reads = with_admin(state).map(|(record, url)| read_one(&client, record, url));
    futures::future::join_all(reads).await
}

/// A `PUT /faults` body: switch → value.
pub type Patch = Map<String, Value>;

/// The patch each owning process gets for `assignments`, in start order.
/// A switch no process of the lab owns (no B running, say) is an error.
pub fn patches(
    state: &LabState,
    assignments: &[Assignment],
) -> Result<Vec<(ServiceRecord, Patch)>, SetError> {
    check_distinct(assignments)?;
    let mut patches: Vec<(ServiceRecord, Patch)> = Vec::new();
    for assignment in assignments {
        let owners: Vec<&ServiceRecord> = with_admin(state)
            .map(|(record, _)| record)
            .filter(|record| owns(&record.name, assignment.switch))
            .collect();
        if owners.is_empty() {
            return Err(SetError::NoOwner(assignment.switch));
        }
        for owner in owners {
            let index = match patches.iter().position(|(r, _)| r.name == owner.name) {
                Some(index) => index,
                None => {
                    patches.push((owner.clone(), Map::new()));
                    patches.len() - 1
                }
            };
            patches[index].1.insert(
                assignment.switch.name().to_string(),
                Value::from(assignment.value),
            );
        }
    }
    let order = |name: &str| state.services.iter().position(|s| s.name == name);
    patches.sort_by_key(|(record, _)| order(&record.name));
    Ok(patches)
}

/// Why `set` sent nothing.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error(transparent)]
    Assignment(#[from] AssignmentError),
    #[error("no process of this lab owns {0} (is any running?)")]
    NoOwner(Switch),
}

/// Applies `assignments` to every process owning them (`labctl faults
/// set`): one `PUT /faults` per process with all of its switches, so each
/// process flips them at once. Nothing is sent if an assignment is wrong;
/// a process that refuses or cannot be reached is reported, the others are
/// still changed.
pub async fn set(
    state: &LabState,
    token: &AdminToken,
    assignments: &[Assignment],
) -> Result<Vec<ProcessChange>, SetError> {
    let patches = patches(state, assignments)?;
    let client = client();
    let puts = patches.into_iter().map(|(record, patch)| {
        let client = &client;
        async move {
            let mut result = ProcessChange {
                name: record.name.clone(),
                patch: patch.clone(),
                changed: Vec::new(),
                faults: Map::new(),
                error: None,
            };
            let Some(admin_url) = record.admin_url.as_deref().filter(|_| record.is_alive()) else {
                result.error = Some(AdminError::NotRunning.to_string());
                return result;
            };
            let url = format!("{}/faults", admin_url.trim_end_matches('/'));
            let body = Value::Object(patch);
            match call(client, "PUT", url, Some(token), Some(&body)).await {
                Ok(mut answer) => {
                    result.changed = answer
                        .get_mut("changed")
                        .map(Value::take)
                        .and_then(|c| serde_json::from_value(c).ok())
                        .unwrap_or_default();
                    if let Some(Value::Object(faults)) = answer.get_mut("faults").map(Value::take) {
                        result.faults = faults;
                    }
                }
                Err(e) => result.error = Some(e.to_string()),
            }
            result
        }
    });
    Ok(futures::future::join_all(puts).await)
}

/// `switch=value switch=value`, in the order the process gave them.
pub fn render_switches(faults: &Map<String, Value>) -> String {
    if faults.is_empty() {
        return "(owns no switch)".into();
    }
    // In the order of the switch table, not alphabetically.
    let rank = |name: &str| Switch::ALL.iter().position(|s| s.name() == name);
    let mut pairs: Vec<(&String, &Value)> = faults.iter().collect();
    pairs.sort_by_key(|(k, _)| rank(k));
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The live switches of the lab by process name, for `labctl status`.
pub async fn live_by_process(state: &LabState) -> BTreeMap<String, ProcessFaults> {
    show(state)
        .await
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_common::config::{Faults, Mode};
    use std::path::PathBuf;

    #[test]
    fn assignments_parse_with_or_without_the_faults_prefix() {
        assert_eq!(
            "lb=etcd".parse(),
            Ok(Assignment {
                switch: Switch::Lb,
                value: "etcd"
            })
        );
        assert_eq!(
            "faults.http_client=shared".parse(),
            Ok(Assignment {
                switch: Switch::HttpClient,
                value: "shared"
            })
        );
    }

    #[test]
    fn unknown_keys_and_values_are_refused_with_what_is_valid() {
        let err = "wroker=bounded".parse::<Assignment>().expect_err("typo");
        assert_eq!(
            err.to_string(),
            "unknown switch \"wroker\"; switches: lb, worker, deadline, http_client, rows"
        );
        let err = "worker=fast".parse::<Assignment>().expect_err("bad value");
        assert_eq!(
            err.to_string(),
            "invalid value \"fast\" for worker; expected one of unbounded, capped, bounded"
        );
        assert!(matches!(
            "worker".parse::<Assignment>(),
            Err(AssignmentError::NotAnAssignment(_))
        ));
        assert!(matches!(
            "mode=fixed".parse::<Assignment>(),
            Err(AssignmentError::UnknownSwitch { .. })
        ));
    }

    fn record(name: &str) -> ServiceRecord {
        let mut r = ServiceRecord::new(name, 1, 0, PathBuf::from("/dev/null"));
        r.admin_url = Some(format!("http://127.0.0.1:1/{name}"));
        r
    }

    fn lab() -> LabState {
        LabState {
            mode: Some(Mode::Buggy),
            faults: Some(Faults::preset(Mode::Buggy)),
            drill: false,
            state_dir: PathBuf::from("/nonexistent"),
            config_file: PathBuf::from("/nonexistent/lab.toml"),
            auto_ports: true,
            services: vec![
                ServiceRecord::new("mysql", 1, 0, PathBuf::from("/dev/null")),
                record("partner-api"),
                record("service-b-1"),
                record("service-b-2"),
                record("slb"),
                record("service-a"),
            ],
        }
    }

    #[test]
    fn each_switch_goes_to_the_processes_that_own_it_in_one_patch_each() {
        let assignments: Vec<Assignment> = ["worker=bounded", "lb=etcd", "faults.rows=close"]
            .iter()
            .map(|a| a.parse().expect("valid"))
            .collect();
        let patches = patches(&lab(), &assignments).expect("patches");
        let sent: Vec<(String, Value)> = patches
            .into_iter()
            .map(|(r, p)| (r.name, Value::Object(p)))
            .collect();
        assert_eq!(
            sent,
            vec![
                (
                    "service-b-1".into(),
                    serde_json::json!({"worker": "bounded", "rows": "close"})
                ),
                (
                    "service-b-2".into(),
                    serde_json::json!({"worker": "bounded", "rows": "close"})
                ),
                ("service-a".into(), serde_json::json!({"lb": "etcd"})),
            ]
        );
    }

    #[test]
    fn deadline_goes_to_a_and_to_every_b() {
        let assignments: Vec<Assignment> = ["deadline=propagate", "lb=etcd"]
            .iter()
            .map(|a| a.parse().expect("valid"))
            .collect();
        let sent: Vec<(String, Value)> = patches(&lab(), &assignments)
            .expect("patches")
            .into_iter()
            .map(|(r, p)| (r.name, Value::Object(p)))
            .collect();
        let deadline = serde_json::json!({"deadline": "propagate"});
        assert_eq!(
            sent,
            vec![
                ("service-b-1".into(), deadline.clone()),
                ("service-b-2".into(), deadline),
                (
                    "service-a".into(),
                    serde_json::json!({"lb": "etcd", "deadline": "propagate"})
                ),
            ]
        );
    }

    #[test]
    fn a_repeated_switch_or_one_nobody_owns_sends_nothing() {
        let repeated: Vec<Assignment> = ["lb=l4", "faults.lb=etcd"]
            .iter()
            .map(|a| a.parse().expect("valid"))
            .collect();
        let err = patches(&lab(), &repeated).expect_err("repeated");
        assert_eq!(err.to_string(), "lb is given twice");
        let mut no_b = lab();
        no_b.services.retain(|s| !s.name.starts_with("service-b-"));
        let err = patches(&no_b, &["worker=bounded".parse().expect("valid")]).expect_err("no B");
        assert!(
            err.to_string()
                .contains("no process of this lab owns worker")
        );
    }

    #[test]
    fn switches_render_as_key_value_pairs() {
        let mut faults = Map::new();
        faults.insert("rows".into(), Value::from("close"));
        faults.insert("worker".into(), Value::from("bounded"));
        assert_eq!(render_switches(&faults), "worker=bounded rows=close");
        assert_eq!(render_switches(&Map::new()), "(owns no switch)");
    }
}
