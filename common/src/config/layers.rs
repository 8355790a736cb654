//! The layers of a configuration and where each value came from.
//!
//! figment merges the layers (later wins) and keeps, for every value, the
//! metadata of the layer that set it; [`Origin`] is written into that metadata
//! and read back out of it for error messages. Each source is checked against
//! the known keys *before* it becomes a layer, in the order the sources are
//! read, so the first mistake reported is the first one a reader would meet.
//!
//! figment's own `Env` and `Toml` providers are not used: `Env` reads the
//! process environment (tests pass theirs in [`Sources`](super::Sources)),
//! matches the prefix without regard to case and guesses each value's type
//! from its text; the lab types a variable by its key and splits lists on
//! commas. The TOML file is parsed here so a missing file or bad syntax is
//! reported before anything else.

use std::{collections::BTreeMap, path::Path};

use figment::{
    Figment, Metadata, Profile, Provider, Source,
    providers::Serialized,
    value::{Dict, Map},
};
use serde::Serialize;

use super::{ConfigError, Faults, Mode, Origin, RawConfig, env_var_for};

/// Environment variables that are not config keys but are still ours.
const RESERVED_ENV: [&str; 1] = ["LAB_CONFIG"];

/// Metadata names that tell the origins apart when read back.
const FILE: &str = "file";
const ENV: &str = "environment variable";
const FLAG: &str = "command-line";
const STDIN: &str = "standard input";
const DEFAULT: &str = "built-in default";

impl Origin {
    /// What figment records on every value this origin's layer sets.
    fn metadata(&self) -> Metadata {
        match self {
            Origin::Default => Metadata::named(DEFAULT),
            Origin::File(path) => Metadata::from(FILE, path.as_path()),
            Origin::Env(var) => Metadata::from(ENV, var.clone()),
            Origin::Flag(flag) => Metadata::from(FLAG, flag.clone()),
            Origin::Stdin => Metadata::named(STDIN),
        }
    }

    /// The inverse of [`Origin::metadata`].
    fn from_metadata(metadata: &Metadata) -> Self {
        match (metadata.name.as_ref(), &metadata.source) {
            (_, Some(Source::File(path))) => Origin::File(path.clone()),
            (ENV, Some(Source::Custom(var))) => Origin::Env(var.clone()),
            (FLAG, Some(Source::Custom(flag))) => Origin::Flag(flag.clone()),
            (STDIN, _) => Origin::Stdin,
            _ => Origin::Default,
        }
    }
}

/// One source's values, tagged with where they came from.
struct Layer<T> {
    origin: Origin,
    values: Serialized<T>,
}

impl<T: Serialize> Provider for Layer<T> {
    fn metadata(&self) -> Metadata {
        self.origin.metadata()
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        self.values.data()
    }
}

/// The built-in defaults, the bottom layer.
pub(super) fn defaults() -> Figment {
    Figment::from(Layer {
        origin: Origin::Default,
        values: Serialized::defaults(RawConfig::default()),
    })
}

/// Merges the file's layer on top of `figment`.
pub(super) fn merge_file(
    figment: Figment,
    path: &Path,
    keys: &Keys,
) -> Result<Figment, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    merge_table(figment, table, Origin::File(path.to_path_buf()), keys)
}

/// Merges the TOML read from standard input (`--config-stdin`).
pub(super) fn merge_stdin(
    figment: Figment,
    text: &str,
    keys: &Keys,
) -> Result<Figment, ConfigError> {
    // The error does not carry toml's message: it quotes the offending
    // line, and this input holds secrets.
    let table: toml::Table = toml::from_str(text).map_err(|_| ConfigError::ParseStdin)?;
    merge_table(figment, table, Origin::Stdin, keys)
}

fn merge_table(
    figment: Figment,
    table: toml::Table,
    origin: Origin,
    keys: &Keys,
) -> Result<Figment, ConfigError> {
    for (key, _) in leaves(&table) {
        keys.check(&key, &origin)?;
    }
    Ok(figment.merge(Layer {
        origin,
        values: Serialized::defaults(table),
    }))
}

/// Merges one layer per `LAB_*` variable, in name order. An empty variable
/// counts as unset: compose passes `${X:-}` through as "" when the user did
/// not set X.
pub(super) fn merge_env(
    mut figment: Figment,
    env: &[(String, String)],
    keys: &Keys,
) -> Result<Figment, ConfigError> {
    let mut ours: Vec<&(String, String)> = env
        .iter()
        .filter(|(var, value)| {
            var.starts_with("LAB_") && !RESERVED_ENV.contains(&var.as_str()) && !value.is_empty()
        })
        .collect();
    ours.sort();
    for (var, raw) in ours {
        let origin = Origin::Env(var.clone());
        let Some((key, kind)) = keys.for_env_var(var) else {
            return Err(ConfigError::UnknownKey {
                key: var.clone(),
                origin,
                allowed: keys.env_vars(),
            });
        };
        let value = typed_value(key, kind, raw, &origin)?;
        figment = figment.merge(Layer {
            origin,
            values: Serialized::default(key, value),
        });
    }
    Ok(figment)
}

/// Merges one `--set KEY=VALUE` override.
pub(super) fn merge_override(
    figment: Figment,
    arg: &str,
    keys: &Keys,
) -> Result<Figment, ConfigError> {
    let origin = Origin::Flag(format!("--set {arg}"));
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(ConfigError::MalformedOverride {
            arg: arg.to_string(),
            origin,
        });
    };
    let key = key.trim();
    let kind = keys.check(key, &origin)?;
    let value = typed_value(key, kind, raw.trim(), &origin)?;
    Ok(figment.merge(Layer {
        origin,
        values: Serialized::default(key, value),
    }))
}

/// Reads the merged layers into a [`RawConfig`]. The values pass through a
/// TOML document, so a value is read by TOML's rules whatever its source and
/// a type error is worded as the TOML file's reader words it (figment's
/// extraction words them its own way); the error keeps the key's path.
pub(super) fn extract(figment: &Figment) -> Result<RawConfig, ConfigError> {
    let merged: toml::Table = figment
        .extract()
        .map_err(|e| ConfigError::Layers(Box::new(e)))?;
    serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::InvalidValue {
            value: value_text(figment, &key),
            origin: origin_of(figment, &key),
            key,
            reason: first_line(&e.into_inner().to_string()),
        }
    })
}

/// Where the value now at `key` came from.
pub(super) fn origin_of(figment: &Figment, key: &str) -> Origin {
    figment
        .find_metadata(key)
        .map_or(Origin::Default, Origin::from_metadata)
}

/// The value at `key` as TOML writes it, or `?` when there is none. The
/// operator token is never quoted.
fn value_text(figment: &Figment, key: &str) -> String {
    if key == "admin.token" {
        return "(not shown)".into();
    }
    figment
        .extract_inner::<toml::Value>(key)
        .map_or_else(|_| "?".into(), |value| value.to_string())
}

/// The deserializer's message without the `in `key`` context line it appends
/// (the key is already in our message).
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

/// The type of a leaf key, taken from its default value; env and flag
/// strings are converted to it before they are layered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Str,
    Int,
    Float,
    Bool,
    List,
}

impl Kind {
    fn of(value: &toml::Value) -> Self {
        match value {
            toml::Value::Integer(_) => Kind::Int,
            toml::Value::Float(_) => Kind::Float,
            toml::Value::Boolean(_) => Kind::Bool,
            toml::Value::Array(_) => Kind::List,
            _ => Kind::Str,
        }
    }
}

/// Every settable key path with its kind, taken from the defaults and the
/// switches of a preset, so a new field is a new key without more code.
pub(super) struct Keys(BTreeMap<String, Kind>);

impl Keys {
    pub(super) fn known() -> Result<Self, ConfigError> {
        let all: toml::Table = defaults()
            .merge(Serialized::default(
                "faults",
                Faults::preset(Mode::default()),
            ))
            .extract()
            .map_err(|e| ConfigError::Layers(Box::new(e)))?;
        Ok(Self(
            leaves(&all)
                .into_iter()
                .map(|(key, value)| (key, Kind::of(value)))
                .collect(),
        ))
    }

    /// The kind of `key`, or an error listing the keys of its section (where
    /// a typo usually is), or every key when the section is unknown too.
    fn check(&self, key: &str, origin: &Origin) -> Result<Kind, ConfigError> {
        if let Some(kind) = self.0.get(key) {
            return Ok(*kind);
        }
        let section = key.rsplit_once('.').map_or("", |(section, _)| section);
        let mut allowed: Vec<&str> = self
            .0
            .keys()
            .filter(|k| k.rsplit_once('.').map_or("", |(s, _)| s) == section)
            .map(String::as_str)
            .collect();
        if allowed.is_empty() {
            allowed = self.0.keys().map(String::as_str).collect();
        }
        Err(ConfigError::UnknownKey {
            key: key.to_string(),
            origin: origin.clone(),
            allowed: allowed.join(", "),
        })
    }

    fn for_env_var(&self, var: &str) -> Option<(&str, Kind)> {
        self.0
            .iter()
            .find(|(key, _)| env_var_for(key) == var)
            .map(|(key, kind)| (key.as_str(), *kind))
    }

    /// Every variable name, sorted, for the unknown-variable message.
    fn env_vars(&self) -> String {
        let mut vars: Vec<String> = self.0.keys().map(|k| env_var_for(k)).collect();
        vars.sort();
        vars.join(", ")
    }
}

/// Converts an environment or flag string to the TOML type the key expects.
fn typed_value(
    key: &str,
    kind: Kind,
    raw: &str,
    origin: &Origin,
) -> Result<toml::Value, ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidValue {
        key: key.to_string(),
        value: format!("{raw:?}"),
        origin: origin.clone(),
        reason: reason.to_string(),
    };
    Ok(match kind {
        Kind::Str => toml::Value::String(raw.to_string()),
        Kind::Int => toml::Value::Integer(raw.parse().map_err(|_| invalid("expected an integer"))?),
        Kind::Float => toml::Value::Float(raw.parse().map_err(|_| invalid("expected a number"))?),
        Kind::Bool => {
            toml::Value::Boolean(raw.parse().map_err(|_| invalid("expected true or false"))?)
        }
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
    })
}

/// Every leaf of `table` with its dotted path, depth first in key order.
fn leaves(table: &toml::Table) -> Vec<(String, &toml::Value)> {
    fn walk<'a>(table: &'a toml::Table, prefix: &str, out: &mut Vec<(String, &'a toml::Value)>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(inner) => walk(inner, &path, out),
                leaf => out.push((path, leaf)),
            }
        }
    }
    let mut out = Vec::new();
    walk(table, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_origin_survives_figment_metadata() {
        for origin in [
            Origin::Default,
            Origin::File("/etc/lab.toml".into()),
            Origin::Env("LAB_MODE".into()),
            Origin::Flag("--set mode=fixed".into()),
            Origin::Stdin,
        ] {
            assert_eq!(Origin::from_metadata(&origin.metadata()), origin);
        }
    }

    #[test]
    fn known_keys_cover_sections_and_switches() {
        let keys = Keys::known().expect("keys");
        assert_eq!(keys.0.get("faults.http_client"), Some(&Kind::Str));
        assert_eq!(keys.0.get("mysql.pool_max"), Some(&Kind::Int));
        assert_eq!(keys.0.get("etcd.endpoints"), Some(&Kind::List));
        assert_eq!(
            keys.0.get("service_b.max_connection_age_jitter"),
            Some(&Kind::Float)
        );
        assert_eq!(
            keys.for_env_var("LAB_FAULTS_HTTP_CLIENT"),
            Some(("faults.http_client", Kind::Str))
        );
    }

    /// Property tests over every key the loader knows: whatever value a
    /// user gives, the loader answers with a config or an error naming the
    /// key; and whichever layers set a key, the latest one wins.
    mod properties {
        use std::io::Write;

        use proptest::{prelude::*, sample::Index};

        use super::*;
        use crate::config::{Sources, env_var_for, load};

        /// Values a user might type, and some no one would.
        fn any_value() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|f| f.to_string()),
                (
                    0u32..100_000,
                    prop::sample::select(vec!["ms", "s", "m", "h", "", "d"])
                )
                    .prop_map(|(n, unit)| format!("{n}{unit}")),
                prop::sample::select(vec![
                    "true",
                    "false",
                    "l4",
                    "l7",
                    "etcd",
                    "buggy",
                    "fixed",
                    "bounded",
                    "propagate",
                    "shared",
                    "close",
                    "json",
                    "peak-ewma",
                    "127.0.0.1:1",
                    "http://127.0.0.1:2379",
                    "mysql://u:p@h:1/db",
                    "[]",
                    "a,b",
                ])
                .prop_map(String::from),
                "\\PC{0,16}",
            ]
        }

        fn all_keys() -> Vec<String> {
            Keys::known().expect("keys").0.into_keys().collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn any_value_for_any_key_loads_or_names_the_key(
                key in any::<Index>(),
                value in any_value(),
            ) {
                let keys = all_keys();
                let key = key.get(&keys);
                let sources = Sources {
                    overrides: vec![format!("{key}={value}")],
                    ..Sources::default()
                };
                if let Err(e) = load(&sources) {
                    let message = e.to_string();
                    prop_assert!(
                        message.contains(key.as_str()),
                        "--set {key}={value:?}: {message}"
                    );
                }
            }
        }

        /// One value: (TOML, env and `--set`, the loaded config's JSON).
        type LayeredValue = (String, String, serde_json::Value);

        /// A key of each kind with three valid values: as written in TOML
        /// (file), as typed in env and `--set`, and as the loaded config
        /// shows it.
        fn layered() -> Vec<(&'static str, Vec<LayeredValue>)> {
            vec![
                (
                    "mysql.pool_max",
                    vec![
                        ("5".into(), "5".into(), serde_json::json!(5)),
                        ("9".into(), "9".into(), serde_json::json!(9)),
                        ("13".into(), "13".into(), serde_json::json!(13)),
                    ],
                ),
                (
                    "faults.lb",
                    vec![
                        ("\"l4\"".into(), "l4".into(), serde_json::json!("l4")),
                        ("\"l7\"".into(), "l7".into(), serde_json::json!("l7")),
                        ("\"etcd\"".into(), "etcd".into(), serde_json::json!("etcd")),
                    ],
                ),
                (
                    "service_a.backend_timeout",
                    vec![
                        ("\"3s\"".into(), "3s".into(), serde_json::json!("3s")),
                        ("\"7s\"".into(), "7s".into(), serde_json::json!("7s")),
                        ("\"9s\"".into(), "9s".into(), serde_json::json!("9s")),
                    ],
                ),
            ]
        }

        proptest! {
            #[test]
            fn the_latest_layer_that_sets_a_key_wins(
                which in 0usize..3,
                file in proptest::option::of(0usize..3),
                env in proptest::option::of(0usize..3),
                flag in proptest::option::of(0usize..3),
            ) {
                let cases = layered();
                let (key, values) = &cases[which];
                let (section, name) = key.split_once('.').expect("section.key");
                let mut toml = tempfile::NamedTempFile::new().expect("temp file");
                if let Some(i) = file {
                    writeln!(toml, "[{section}]\n{name} = {}", values[i].0).expect("write");
                }
                let sources = Sources {
                    file: file.map(|_| toml.path().to_path_buf()),
                    env: env
                        .map(|i| vec![(env_var_for(key), values[i].1.clone())])
                        .unwrap_or_default(),
                    overrides: flag
                        .map(|i| vec![format!("{key}={}", values[i].1)])
                        .unwrap_or_default(),
                    stdin: None,
                };
                let config = load(&sources).expect("valid values load");
                let shown = serde_json::to_value(&config).expect("config as JSON");
                let got = shown
                    .pointer(&format!("/{section}/{name}"))
                    .cloned()
                    .expect("the key is in the config");
                let default = serde_json::to_value(crate::config::LabConfig::default())
                    .expect("defaults as JSON")
                    .pointer(&format!("/{section}/{name}"))
                    .cloned();
                let expected = flag.or(env).or(file).map(|i| values[i].2.clone());
                match expected {
                    Some(expected) => prop_assert_eq!(got, expected),
                    // The preset chooses `lb` when no layer does.
                    None if *key == "faults.lb" => {}
                    None => prop_assert_eq!(Some(got), default),
                }
            }
        }
    }
}
