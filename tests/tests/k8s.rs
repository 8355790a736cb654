//! The Kubernetes manifests (`deploy/k8s/`): each overlay rendered by
//! kustomize (kubectl's, Kustomize v5), every object validated against the
//! Kubernetes schemas (`kubernetes-validate --strict`, offline), and the
//! parts that make the lab what it is asserted: each overlay's settings as
//! the services would load them, the probes, B's advertised pod IP and its
//! preStop, the ClusterIP Service A's `l4` backend points at, the network
//! policies, non-root containers with limits. There is no cluster here:
//! nothing is applied (README, "Deploy", says so).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;
use lab_common::config::{LabConfig, LbMode, Mode, Sources};
use serde::Deserialize;
use serde_norway::Value;

/// Where `scripts/install-deps.sh --for-tests` puts a kubectl with
/// Kustomize v5 when the machine has none.
const KUBECTL_INSTALLED: &str = "/usr/local/lib/grpc-incident-lab/bin/kubectl";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectl() -> anyhow::Result<String> {
    let kubectl = if Path::new(KUBECTL_INSTALLED).exists() {
        KUBECTL_INSTALLED.to_string()
    } else {
        "kubectl".to_string()
    };
    let version = output(&kubectl, &["version", "--client"])?;
    anyhow::ensure!(
        version.contains("Kustomize Version: v5"),
        "{kubectl} has no Kustomize v5 (scripts/install-deps.sh --for-tests installs one): {version}"
    );
    Ok(kubectl)
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program} (scripts/install-deps.sh --for-tests)"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The manifests of one overlay, rendered from a copy of `deploy/k8s` with
/// the partner's certificates made as the README says, and validated.
struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn of(overlay: &str) -> anyhow::Result<Rendered> {
        let dir = tempfile::tempdir()?;
        copy_dir(&repo().join("deploy/k8s"), dir.path())?;
        let partner_api = labctl::procs::find_lab_binary("partner-api", None)?;
        let tls = dir.path().join("base/tls");
        output(
            partner_api.to_str().context("path")?,
            &[
                "certs",
                "--dir",
                tls.to_str().context("path")?,
                "--host",
                "partner-api",
            ],
        )?;
        let overlay_dir = dir.path().join("overlays").join(overlay);
        let yaml = output(
            &kubectl()?,
            &["kustomize", overlay_dir.to_str().context("path")?],
        )?;
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &yaml)?;
        // --strict: a field the schema does not know is an error, so a
        // misspelt probe or limit cannot pass unnoticed.
        let validated = output(
            "kubernetes-validate",
            &["--strict", "--quiet", file.to_str().context("path")?],
        )?;
        anyhow::ensure!(!validated.contains("ERROR"), "{overlay}: {validated}");
        let objects = serde_norway::Deserializer::from_str(&yaml)
            .map(Value::deserialize)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rendered { objects })
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} is rendered"))
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// The rendered Service a URL (`scheme://[user@]host:port/...`) names,
    /// checked to serve that port.
    fn service_for(&self, url: &str) -> &Value {
        let authority = url.split("://").nth(1).unwrap_or(url);
        let authority = authority.split('/').next().unwrap_or(authority);
        let authority = authority.rsplit('@').next().unwrap_or(authority);
        let (host, port) = authority
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{url} has host:port"));
        let service = self.get("Service", host);
        let port: u64 = port.parse().expect("a port");
        assert!(
            service["spec"]["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|p| p["port"].as_u64() == Some(port)),
            "Service {host} serves {port} ({url})"
        );
        service
    }

    /// A ConfigMap or Secret by the name it was generated under (kustomize
    /// appends a content hash).
    fn generated(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.strip_prefix(name).is_some_and(|h| h.starts_with('-')))
            })
            .unwrap_or_else(|| panic!("{kind} {name}-<hash> is rendered"))
    }

    /// A container's environment as the process sees it: each `envFrom`
    /// ConfigMap or Secret, then `env`, with `$(VAR)` references expanded
    /// and field references shown as `<field:path>`.
    fn environment(&self, container: &Value) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for source in container["envFrom"].as_sequence().into_iter().flatten() {
            let (kind, name) = if let Some(name) = source["configMapRef"]["name"].as_str() {
                ("ConfigMap", name)
            } else {
                (
                    "Secret",
                    source["secretRef"]["name"].as_str().expect("a ref"),
                )
            };
            let object = self.get(kind, name);
            for (key, value) in object["data"].as_mapping().into_iter().flatten() {
                let value = value.as_str().expect("a string").to_string();
                let value = if kind == "Secret" {
                    decode_base64(&value)
                } else {
                    value
                };
                env.insert(key.as_str().expect("a key").to_string(), value);
            }
        }
        for var in container["env"].as_sequence().into_iter().flatten() {
            let name = var["name"].as_str().expect("a name").to_string();
            let value = match var["value"].as_str() {
                Some(value) => expand(value, &env),
                None => format!(
                    "<field:{}>",
                    var["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()
                        .unwrap_or("?")
                ),
            };
            env.insert(name, value);
        }
        env
    }
}

fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (name, v) in env {
        out = out.replace(&format!("$({name})"), v);
    }
    out
}

fn decode_base64(text: &str) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64");
    String::from_utf8(bytes).expect("UTF-8")
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn containers(workload: &Value) -> Vec<&Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers")
        .iter()
        .collect()
}

/// The lab's config as a container's environment makes it.
fn lab_config(env: &BTreeMap<String, String>) -> LabConfig {
    lab_common::config::load(&Sources {
        env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ..Sources::default()
    })
    .unwrap_or_else(|e| panic!("the environment is not valid lab config: {e}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("{addr} has a port"))
}

#[test]
fn each_overlay_renders_validates_and_configures_the_lab_as_it_says() -> anyhow::Result<()> {
    for (overlay, mode, lb) in [
        ("buggy", Mode::Buggy, LbMode::L4),
        ("fixed", Mode::Fixed, LbMode::Etcd),
    ] {
        let k8s = Rendered::of(overlay)?;
        let kinds: Vec<String> = k8s
            .objects
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!("{overlay}: {} objects, all valid: {kinds:?}", kinds.len());

        // Every pod runs as non-root with no privilege to gain and a memory
        // limit; the lab's own containers on a read-only root.
        let workloads: Vec<&Value> = ["Deployment", "StatefulSet"]
            .iter()
            .flat_map(|kind| k8s.of_kind(kind))
            .collect();
        assert_eq!(
            workloads.len(),
            5,
            "{overlay}: mysql, etcd, partner-api, B, A"
        );
        for workload in &workloads {
            let name = workload["metadata"]["name"].as_str().unwrap_or("?");
            let pod = &workload["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
            assert!(
                pod["securityContext"]["runAsUser"]
                    .as_u64()
                    .is_some_and(|u| u > 0),
                "{name}: a non-root uid"
            );
            for container in containers(workload) {
                let security = &container["securityContext"];
                assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
                assert_eq!(
                    security["capabilities"]["drop"],
                    Value::Sequence(vec!["ALL".into()]),
                    "{name}"
                );
                assert!(
                    container["resources"]["limits"]["memory"].is_string()
                        && container["resources"]["requests"]["cpu"].is_string(),
                    "{name}: requests and a memory limit"
                );
                if container["image"] == "grpc-incident-lab:local" {
                    assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
                }
            }
        }

        // The lab's processes: probes on their admin listener, settings
        // that load as lab config and say this overlay's preset.
        let b = k8s.get("Deployment", "service-b");
        assert_eq!(b["spec"]["replicas"], 2, "two Bs");
        for name in ["service-a", "service-b", "partner-api"] {
            let deployment = k8s.get("Deployment", name);
            let container = containers(deployment)[0];
            assert_eq!(container["image"], "grpc-incident-lab:local", "{name}");
            let env = k8s.environment(container);
            let config = lab_config(&env);
            assert_eq!(config.mode, mode, "{overlay}: {name}'s preset");
            let admin = match name {
                "service-a" => &config.service_a.admin_listen,
                "service-b" => &config.service_b.admin_listen,
                _ => &config.partner.admin_listen,
            };
            let admin_port = container["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == "admin")
                .and_then(|p| p["containerPort"].as_u64());
            assert_eq!(admin_port, Some(u64::from(port_of(admin))), "{name}");
            let listen = match name {
                "service-a" => &config.service_a.listen,
                "service-b" => &config.service_b.listen,
                _ => &config.partner.listen,
            };
            for addr in [listen, admin] {
                assert!(
                    addr.starts_with("0.0.0.0:"),
                    "{name} listens on the pod's interfaces, not {addr}"
                );
            }
            assert_eq!(
                container["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{name}"
            );
            assert_eq!(
                container["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{name}"
            );
            for probe in ["readinessProbe", "livenessProbe"] {
                assert_eq!(
                    container[probe]["httpGet"]["port"], "admin",
                    "{name} {probe}"
                );
            }
        }

        // B registers as its pod, at its pod's IP, and leaves gracefully.
        let b_container = containers(b)[0];
        let b_env = k8s.environment(b_container);
        let b_config = lab_config(&b_env);
        assert_eq!(
            b_config.service_b.advertise_addr,
            format!(
                "<field:status.podIP>:{}",
                port_of(&b_config.service_b.listen)
            ),
            "B advertises its pod IP and gRPC port"
        );
        assert_eq!(b_config.service_b.instance_id, "<field:metadata.name>");
        let pre_stop = b_container["lifecycle"]["preStop"]["exec"]["command"]
            .as_sequence()
            .context("B has a preStop hook")?;
        assert_eq!(pre_stop[0], "sleep", "B's preStop pauses");
        let pause: f64 = pre_stop[1].as_str().context("seconds")?.parse()?;
        assert!(
            pause >= 1.0,
            "long enough for kube-proxy to hear of it: {pause} s"
        );
        let grace = b["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .context("a grace period")?;
        let needed = pause
            + b_config.service_b.drain_period.as_secs_f64()
            + b_config.service_b.shutdown_grace.as_secs_f64();
        assert!(
            grace as f64 > needed,
            "the grace period ({grace} s) covers preStop, B's drain and its shutdown grace ({needed} s)"
        );
        assert!(
            !b_env.contains_key("MYSQL_ROOT_PASSWORD"),
            "B never sees MySQL's root password"
        );
        // What B connects to are this lab's Services, on their ports.
        for url in [
            b_config.mysql.url.as_str(),
            b_config.partner.url.as_str(),
            b_config
                .etcd
                .endpoints
                .first()
                .map(String::as_str)
                .unwrap_or(""),
        ] {
            k8s.service_for(url);
        }

        // A: this overlay's balancing, and `l4` through the ClusterIP
        // Service on B's port — kube-proxy as the incident's L4 balancer.
        let a_config =
            lab_config(&k8s.environment(containers(k8s.get("Deployment", "service-a"))[0]));
        assert_eq!(a_config.faults.lb, lb, "{overlay}: A's lb");
        let l4 = a_config
            .service_a
            .backend_l4_url
            .trim_start_matches("http://");
        let (host, port) = l4.rsplit_once(':').context("host:port")?;
        let service = k8s.service_for(&a_config.service_a.backend_l4_url);
        assert!(
            service["spec"]["type"].is_null() && service["spec"]["clusterIP"].is_null(),
            "{host} is a ClusterIP Service (a virtual IP kube-proxy balances)"
        );
        assert_eq!(
            service["spec"]["selector"]["app.kubernetes.io/name"], "service-b",
            "{host} selects the Bs"
        );
        assert_eq!(
            service["spec"]["ports"][0]["port"].as_u64(),
            Some(u64::from(port_of(&b_config.service_b.listen))),
            "{host} serves B's port"
        );
        assert_eq!(port.parse::<u16>()?, port_of(&b_config.service_b.listen));
        assert_eq!(
            k8s.get("Service", "service-b-headless")["spec"]["clusterIP"],
            "None",
            "the headless alternative"
        );

        // Who may reach whom.
        let deny = k8s.get("NetworkPolicy", "default-deny-ingress");
        assert!(
            deny["spec"]["podSelector"]
                .as_mapping()
                .is_some_and(|m| m.is_empty())
                && deny["spec"]["ingress"].is_null(),
            "nothing gets in unless a policy lets it"
        );
        for (target, port, only_from) in [
            ("service-b", 50051, &["service-a"][..]),
            ("mysql", 3306, &["service-b"]),
            ("partner-api", 8443, &["service-b"]),
            ("etcd", 2379, &["service-a", "service-b"]),
        ] {
            let policy = k8s.get("NetworkPolicy", target);
            // The policy protects the pods the workload runs.
            assert_eq!(
                policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], target,
                "{target}'s policy selects its pods"
            );
            let workload = ["Deployment", "StatefulSet"]
                .iter()
                .find_map(|kind| {
                    k8s.objects
                        .iter()
                        .find(|o| o["kind"] == *kind && o["metadata"]["name"] == target)
                })
                .context("the workload")?;
            assert_eq!(
                workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
                target
            );
            let rules = policy["spec"]["ingress"]
                .as_sequence()
                .context("ingress rules")?;
            // A rule without ports would open every port.
            assert!(
                rules.iter().all(|r| r["ports"].is_sequence()),
                "{target}: every rule names its ports"
            );
            let to_port: Vec<&Value> = rules
                .iter()
                .filter(|rule| {
                    rule["ports"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|p| p["port"] == port)
                })
                .collect();
            assert_eq!(to_port.len(), 1, "{target}:{port}: one rule");
            let from: Vec<&str> = to_port[0]["from"]
                .as_sequence()
                .context("from")?
                .iter()
                .map(|f| {
                    f["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                        .as_str()
                        .unwrap_or("any pod")
                })
                .collect();
            assert_eq!(from, only_from, "{target}:{port}");
        }

        // MySQL's init SQL is the lab's, word for word.
        let init = k8s.get("ConfigMap", "mysql-init")["data"]["init.sql"]
            .as_str()
            .context("init.sql")?
            .to_string();
        let lab_init = std::fs::read_to_string(repo().join("deploy/mysql/init.sql"))?;
        assert_eq!(
            init.trim(),
            lab_init.trim(),
            "deploy/mysql/init.sql, verbatim"
        );
        assert_eq!(
            k8s.generated("ConfigMap", "lab-env")["data"]["LAB_MODE"],
            overlay,
            "{overlay}: LAB_MODE"
        );
    }
    Ok(())
}
