//! Which loopback ports the stack uses: the configured (native default) ones,
//! or free ones picked by the kernel (`--ports auto`).

use std::net::{SocketAddr, TcpListener};

use lab_common::config::LabConfig;

/// Every port of one stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    pub a_http: u16,
    pub a_admin: u16,
    /// (gRPC, admin) per B instance.
    pub b: Vec<(u16, u16)>,
    pub slb_l4: u16,
    pub slb_l7: u16,
    pub slb_stats: u16,
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub mysql: u16,
    /// partner-api's HTTPS and admin listeners.
    pub partner_https: u16,
    pub partner_admin: u16,
}

/// How ports are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PortPolicy {
    /// From the config (B instance i gets base+i).
    #[default]
    Configured,
    /// Free ports picked by the kernel.
    Auto,
}

/// A `--ports` value that is neither `auto` nor `config`.
#[derive(Debug, thiserror::Error)]
#[error("invalid --ports {0:?}: expected auto or config")]
pub struct InvalidPortPolicy(String);

impl std::str::FromStr for PortPolicy {
    type Err = InvalidPortPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PortPolicy::Auto),
            "config" | "default" => Ok(PortPolicy::Configured),
            other => Err(InvalidPortPolicy(other.to_string())),
        }
    }
}

/// Why the stack's ports could not be planned or are not usable.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("{key} = {value:?} has no port")]
    NoPort { key: &'static str, value: String },
    #[error("etcd.endpoints is empty")]
    NoEtcdEndpoint,
    #[error("port out of range: {base} + {offset}")]
    OutOfRange { base: u16, offset: usize },
    #[error(
        "port {port} would be used by both {first} and {second}; \
         change the config or use `--ports auto`"
    )]
    Clash {
        port: u16,
        first: String,
        second: String,
    },
    #[error("no free loopback ports between {low} and {high}")]
    NoneFree { low: u16, high: u16 },
    #[error("reading a bound port")]
    LocalAddr(#[source] std::io::Error),
    #[error(
        "{}\nstop whatever holds it (another `labctl up`? try `labctl down`) or use `--ports auto`",
        busy.join("\n")
    )]
    Busy { busy: Vec<String> },
}

fn port_of(key: &'static str, addr: &str) -> Result<u16, PortsError> {
    // Accept both IP:PORT and URLs such as http://127.0.0.1:2379 or mysql://u:p@h:3306/db.
    let host_port = addr.split_once("://").map(|(_, rest)| rest).unwrap_or(addr);
    let host_port = host_port
        .rsplit_once('@')
        .map(|(_, hp)| hp)
        .unwrap_or(host_port);
    let host_port = host_port.split('/').next().unwrap_or(host_port);
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| PortsError::NoPort {
            key,
            value: addr.to_string(),
        })
}

impl Ports {
    /// Plans the ports for `backends` B instances.
    pub fn plan(
        config: &LabConfig,
        backends: usize,
        policy: PortPolicy,
    ) -> Result<Ports, PortsError> {
        match policy {
            PortPolicy::Auto => Self::auto(backends),
            PortPolicy::Configured => {
                let b_grpc = port_of("service_b.listen", &config.service_b.listen)?;
                let b_admin = port_of("service_b.admin_listen", &config.service_b.admin_listen)?;
                let etcd = config
                    .etcd
                    .endpoints
                    .first()
                    .ok_or(PortsError::NoEtcdEndpoint)?;
                let etcd_client = port_of("etcd.endpoints", etcd)?;
                let offset = |base: u16, offset: usize| {
                    u16::try_from(usize::from(base) + offset)
                        .map_err(|_| PortsError::OutOfRange { base, offset })
                };
                let b = (0..backends)
                    .map(|i| Ok((offset(b_grpc, i)?, offset(b_admin, i)?)))
                    .collect::<Result<Vec<_>, PortsError>>()?;
                let ports = Ports {
                    a_http: port_of("service_a.listen", &config.service_a.listen)?,
                    a_admin: port_of("service_a.admin_listen", &config.service_a.admin_listen)?,
                    b,
                    slb_l4: port_of("slb.l4_listen", &config.slb.l4_listen)?,
                    slb_l7: port_of("slb.l7_listen", &config.slb.l7_listen)?,
                    slb_stats: port_of("slb.stats_listen", &config.slb.stats_listen)?,
                    etcd_client,
                    etcd_peer: offset(etcd_client, 1)?,
                    mysql: port_of("mysql.url", &config.mysql.url)?,
                    partner_https: port_of("partner.listen", &config.partner.listen)?,
                    partner_admin: port_of("partner.admin_listen", &config.partner.admin_listen)?,
                };
                ports.ensure_distinct()?;
                Ok(ports)
            }
        }
    }

    /// Two services on one port would fail at start: say which, up front.
    fn ensure_distinct(&self) -> Result<(), PortsError> {
        let mut seen: std::collections::BTreeMap<u16, String> = std::collections::BTreeMap::new();
        for (port, owner) in self.all() {
            if let Some(first) = seen.insert(port, owner.clone()) {
                return Err(PortsError::Clash {
                    port,
                    first,
                    second: owner,
                });
            }
        }
        Ok(())
    }

    fn auto(backends: usize) -> Result<Ports, PortsError> {
        // Hold every listener until all are picked so no port is handed out
        // twice. Ports come from below the kernel's ephemeral range: a port
        // the kernel handed out (bind to :0) can be taken as the source port
        // of some outgoing connection before the service binds it.
        let count = 10 + 2 * backends;
        let (low, high) = unreserved_range();
        let mut rng = rand::rng();
        let mut listeners = Vec::with_capacity(count);
        let mut tries = 0;
        while listeners.len() < count {
            tries += 1;
            if tries > 10_000 {
                return Err(PortsError::NoneFree { low, high });
            }
            let port = rand::Rng::random_range(&mut rng, low..high);
            if let Ok(l) = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))) {
                listeners.push(l);
            }
        }
        let mut ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(PortsError::LocalAddr)?
            .into_iter();
        // `count` listeners were bound above, one port each.
        let mut next = || ports.next().ok_or(PortsError::NoneFree { low, high });
        Ok(Ports {
            a_http: next()?,
            a_admin: next()?,
            slb_l4: next()?,
            slb_l7: next()?,
            slb_stats: next()?,
            etcd_client: next()?,
            etcd_peer: next()?,
            mysql: next()?,
            partner_https: next()?,
            partner_admin: next()?,
            b: (0..backends)
                .map(|_| Ok((next()?, next()?)))
                .collect::<Result<Vec<_>, PortsError>>()?,
        })
    }

    /// Two free ports for one more B (gRPC, admin), picked like `--ports auto`.
    pub fn free_pair() -> Result<(u16, u16), PortsError> {
        let extra = Self::auto(1)?;
        let (low, high) = unreserved_range();
        extra
            .b
            .first()
            .copied()
            .ok_or(PortsError::NoneFree { low, high })
    }

    /// Every (port, owner) pair.
    pub fn all(&self) -> Vec<(u16, String)> {
        let mut all = vec![
            (self.mysql, "mysql".to_string()),
            (self.etcd_client, "etcd".to_string()),
            (self.etcd_peer, "etcd (peer)".to_string()),
            (self.slb_l4, "slb l4".to_string()),
            (self.slb_l7, "slb l7".to_string()),
            (self.slb_stats, "slb stats".to_string()),
            (self.a_http, "service-a".to_string()),
            (self.a_admin, "service-a admin".to_string()),
        ];
        for (i, (grpc, admin)) in self.b.iter().enumerate() {
            all.push((*grpc, format!("service-b-{}", i + 1)));
            all.push((*admin, format!("service-b-{} admin", i + 1)));
        }
        all.push((self.partner_https, "partner-api".to_string()));
        all.push((self.partner_admin, "partner-api admin".to_string()));
        all
    }

    /// Fails with one line per busy port, naming its owner and the way out.
    pub fn ensure_free(&self) -> Result<(), PortsError> {
        let busy: Vec<String> = self
            .all()
            .into_iter()
            .filter(|(port, _)| {
                TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], *port))).is_err()
            })
            .map(|(port, owner)| format!("port {port} ({owner}) is already in use"))
            .collect();
        if !busy.is_empty() {
            return Err(PortsError::Busy { busy });
        }
        Ok(())
    }
}

/// A port range the kernel does not hand out as ephemeral source ports:
/// from 20000 up to the start of `ip_local_port_range` (Linux).
fn unreserved_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 21_000 {
        (20_000, ephemeral_low)
    } else {
        // An unusual ephemeral range: use the space above it instead.
        (61_000, 65_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_ports_follow_the_config_and_number_backends() {
        let ports = Ports::plan(&LabConfig::default(), 3, PortPolicy::Configured).expect("plan");
        assert_eq!(ports.a_http, 8080);
        assert_eq!(ports.b, vec![(50051, 9081), (50052, 9082), (50053, 9083)]);
        assert_eq!((ports.etcd_client, ports.etcd_peer), (2379, 2380));
        assert_eq!(ports.mysql, 33306);
        assert_eq!(
            (ports.slb_l4, ports.slb_l7, ports.slb_stats),
            (50050, 50060, 8404)
        );
        assert_eq!((ports.partner_https, ports.partner_admin), (8443, 9089));
    }

    #[test]
    fn the_partner_ports_are_in_the_clash_check() {
        let mut config = LabConfig::default();
        config.partner.admin_listen = config.service_a.admin_listen.clone();
        let err = Ports::plan(&config, 2, PortPolicy::Configured).expect_err("clash");
        let msg = err.to_string();
        assert!(
            msg.contains("9080") && msg.contains("partner-api admin"),
            "{msg}"
        );
        // With the defaults, B number 9 would get admin port 9081 + 8 = 9089.
        let err = Ports::plan(&LabConfig::default(), 9, PortPolicy::Configured).expect_err("clash");
        assert!(err.to_string().contains("9089"), "{err}");
        Ports::plan(&LabConfig::default(), 8, PortPolicy::Configured).expect("8 Bs fit");
    }

    #[test]
    fn clashing_configured_ports_are_refused() {
        // B number 10 would get 50051 + 9 = 50060, HAProxy's l7 port.
        let err =
            Ports::plan(&LabConfig::default(), 10, PortPolicy::Configured).expect_err("clash");
        assert!(err.to_string().contains("50060"), "{err}");
    }

    #[test]
    fn auto_ports_are_distinct() {
        let ports = Ports::plan(&LabConfig::default(), 4, PortPolicy::Auto).expect("plan");
        let mut all: Vec<u16> = ports.all().into_iter().map(|(p, _)| p).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
