//! Where the operator may send HTTP on a spec's behalf (Observer HTTP sinks).
//!
//! A URL in a spec is chosen by whoever may create an Observer, and the operator's network
//! position is not theirs: it reaches the cloud metadata service, the API server's loopback
//! port, cluster-internal services and its own ports. So by default only public addresses are
//! allowed, and the check applies to the addresses a name resolves to at connect time (a name
//! that resolves to a public address at validation and to 169.254.169.254 a second later,
//! DNS rebinding, is still refused), redirects are not followed and no proxy is used (either
//! would connect somewhere unchecked). The operator's configuration lists extra allowed CIDRs
//! (an in-cluster collector, a test receiver) and denied ones (the cluster's service and pod
//! ranges, when they are public).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;

/// Why a destination is refused. Names the address class, never anything fetched from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is a {1} address, which sinks and broker connections may not reach")]
    Address(IpAddr, &'static str),
    #[error("{0} is in a range this operator denies")]
    Denied(IpAddr),
    #[error("port {0} is one of the operator's own ports")]
    OwnPort(u16),
    #[error("{0} resolves to no address sinks and broker connections may reach ({1})")]
    NoAllowedAddress(String, String),
}

/// Allowed and denied destinations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EgressPolicy {
    /// Ranges allowed although not public (checked after `denied`).
    pub allowed: Vec<IpNet>,
    /// Ranges refused although public (e.g. the cluster's service and pod ranges).
    pub denied: Vec<IpNet>,
    /// Ports of the operator itself (health, metrics, Subscriber HTTP), refused on any
    /// address that is not public.
    pub own_ports: Vec<u16>,
}

/// The class of a non-public address, or `None` for a public one.
fn special_class(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        // ::ffff:127.0.0.1 is 127.0.0.1.
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_private() {
                Some("private")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared (carrier-grade NAT)")
            } else if v4.is_unspecified() || a == 0 {
                Some("unspecified")
            } else if v4.is_multicast() || v4.is_broadcast() || a >= 240 {
                Some("multicast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

impl EgressPolicy {
    /// Whether the operator may connect to `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.denied.iter().any(|net| net.contains(&ip)) {
            return Err(Refusal::Denied(ip));
        }
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match special_class(ip) {
            Some(class) => Err(Refusal::Address(ip, class)),
            None => Ok(()),
        }
    }

    /// What can be checked from the URL alone: a literal address and the port. Names are
    /// checked when they resolve ([`GuardedResolver`]).
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refusal> {
        let port = url.port_or_known_default();
        let literal = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => {
                Some(IpAddr::from([127, 0, 0, 1]))
            }
            _ => None,
        };
        if let Some(ip) = literal {
            self.check_ip(ip)?;
            if let Some(port) = port
                && special_class(ip).is_some()
                && self.own_ports.contains(&port)
            {
                return Err(Refusal::OwnPort(port));
            }
        }
        Ok(())
    }

    /// Keeps the addresses the operator may connect to.
    pub fn filter(&self, name: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refusal> {
        let mut last = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    last = Some(e);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            let why = last.map_or_else(|| "no address".to_string(), |e| e.to_string());
            return Err(Refusal::NoAllowedAddress(name.to_string(), why));
        }
        Ok(allowed)
    }

    /// An HTTP client that connects only where this policy allows: every name is resolved
    /// through the policy, redirects are not followed, no proxy is used.
    pub fn http_client(
        self: &Arc<Self>,
        builder: reqwest::ClientBuilder,
    ) -> reqwest::Result<reqwest::Client> {
        builder
            .dns_resolver(Arc::new(GuardedResolver {
                policy: self.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
    }
}

/// Resolves names with the system resolver and drops every address the policy refuses, so the
/// check holds for the address actually connected to.
struct GuardedResolver {
    policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = policy.filter(&host, addrs)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &EgressPolicy, url: &str) -> bool {
        policy
            .check_url(&url::Url::parse(url).expect("a URL"))
            .is_err()
    }

    #[test]
    fn inward_destinations_are_refused_by_default() {
        let policy = EgressPolicy {
            own_ports: vec![8080],
            ..EgressPolicy::default()
        };
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:6443/api",
            "http://localhost:8080/metrics",
            "http://LOCALHOST/",
            "http://10.0.0.7/",
            "http://172.16.3.4/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[fd00::5]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
        ] {
            assert!(refused(&policy, url), "{url} must be refused");
        }
        for url in [
            "https://example.com/hook",
            "http://93.184.216.34/",
            "http://[2606:4700::1111]/",
        ] {
            assert!(!refused(&policy, url), "{url} must be allowed");
        }
    }

    #[test]
    fn configuration_allows_and_denies_ranges() {
        let policy = EgressPolicy {
            allowed: vec!["127.0.0.0/8".parse().expect("cidr")],
            denied: vec!["93.184.216.0/24".parse().expect("cidr")],
            own_ports: vec![8080],
        };
        assert!(!refused(&policy, "http://127.0.0.1:9000/"));
        // The operator's own port stays refused on an allowed private address.
        assert!(refused(&policy, "http://127.0.0.1:8080/"));
        assert!(refused(&policy, "http://93.184.216.34/"));
        assert!(refused(&policy, "http://10.0.0.1/"));
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let policy = EgressPolicy::default();
        let addrs = vec![
            "169.254.169.254:0".parse().expect("addr"),
            "93.184.216.34:0".parse().expect("addr"),
        ];
        assert_eq!(
            policy.filter("mixed.example", addrs),
            Ok(vec!["93.184.216.34:0".parse().expect("addr")])
        );
        let inward = vec!["10.1.2.3:0".parse().expect("addr")];
        assert!(matches!(
            policy.filter("rebound.example", inward),
            Err(Refusal::NoAllowedAddress(..))
        ));
    }

    #[tokio::test]
    async fn the_guarded_client_does_not_connect_inward() {
        // A listener on loopback: the request must fail before any byte reaches it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let policy = Arc::new(EgressPolicy::default());
        let client = policy
            .http_client(reqwest::Client::builder())
            .expect("client");
        // `localhost` goes through the resolver (a literal address would not).
        let result = client.get(format!("http://localhost:{port}/")).send().await;
        assert!(result.is_err(), "{result:?}");
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "the operator connected to loopback");
    }
}
