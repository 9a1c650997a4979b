//! The embedded MQTT broker (rumqttd) on its own OS thread, and helpers to give it a port.
//!
//! rumqttd's `Broker::start()` blocks its thread forever and cannot report the port it bound,
//! so the caller resolves port 0 to a concrete free port first ([`resolve_listen`]) and then
//! waits until that port accepts TCP connections ([`wait_until_accepting`]).
//!
//! Open (development) or secured: secured, it checks logins on the plain listener, can add a
//! TLS listener that requires client certificates, and applies the topic ACL of
//! [`crate::security`] through the hook the vendored rumqttd gained for it.

use crate::error::StubError;
use crate::security::BrokerSecurity;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Bytes of topics and payloads per segment of a filter's log in the embedded broker.
pub const SEGMENT_BYTES: usize = 64 * 1024;
/// Segments a filter's log may hold for a subscriber that lags (64 MiB of publishes).
pub const SEGMENT_COUNT: usize = 1024;

/// What the embedded broker serves.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    /// The plain MQTT listener (the stub's own client always uses it).
    pub listen: SocketAddr,
    /// A TLS listener requiring client certificates.
    pub tls: Option<TlsListener>,
    /// Logins and ACL; `None` is an open broker (development): no login, no ACL.
    pub security: Option<BrokerSecurity>,
}

/// A TLS listener: the broker's certificate and key, and the CA that client certificates
/// must chain to (rumqttd uses the first certificate of that file). A client's certificate
/// common name must equal its MQTT client id.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl EmbeddedBroker {
    /// An open broker with one plain listener.
    pub fn open(listen: SocketAddr) -> Self {
        EmbeddedBroker {
            listen,
            tls: None,
            security: None,
        }
    }
}

/// Starts an open rumqttd listening on `listen` (a concrete port; see [`resolve_listen`]) on a
/// dedicated thread and returns at once. See [`start_broker`].
pub fn start_embedded_broker(listen: SocketAddr) -> Result<(), StubError> {
    start_broker(&EmbeddedBroker::open(listen))
}

/// Starts rumqttd as described on a dedicated thread and returns at once. The broker lives
/// until the process exits. A failure to bind is only visible as the port never accepting;
/// use [`wait_until_accepting`].
pub fn start_broker(broker: &EmbeddedBroker) -> Result<(), StubError> {
    let config = broker_config(broker);
    let listen = broker.listen;
    // Someone else listening there would pass for the broker once it accepts connections:
    // refuse at once instead (the broker binds right after this check).
    if let Err(e) = TcpListener::bind(listen) {
        return Err(StubError::Broker {
            addr: listen,
            reason: format!("cannot listen: {e}"),
        });
    }
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            match broker.start() {
                Ok(()) => tracing::error!(%listen, "embedded broker stopped"),
                Err(e) => tracing::error!(%listen, error = %e, "embedded broker failed"),
            }
        })
        .map_err(|e| StubError::Broker {
            addr: listen,
            reason: format!("cannot spawn broker thread: {e}"),
        })?;
    Ok(())
}

/// Returns `addr` unchanged when it names a port, or `addr` with a currently free port when it
/// says port 0 (bind, read the port, release it). Another process could take the port in
/// between; for a development stub that window is acceptable.
pub fn resolve_listen(addr: SocketAddr) -> Result<SocketAddr, StubError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let probe = TcpListener::bind(addr)?;
    let port = probe.local_addr()?.port();
    drop(probe);
    Ok(SocketAddr::new(addr.ip(), port))
}

/// Waits until something accepts TCP connections on `addr`, trying every 20 ms, for at most
/// `within`. An unspecified address (`0.0.0.0`, `::`) is probed on loopback.
pub async fn wait_until_accepting(addr: SocketAddr, within: Duration) -> Result<(), StubError> {
    let target = probe_address(addr);
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(target).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() >= within {
            return Err(StubError::BrokerNotReady {
                addr,
                waited_ms: within.as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn probe_address(addr: SocketAddr) -> SocketAddr {
    if !addr.ip().is_unspecified() {
        return addr;
    }
    let ip = match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    SocketAddr::new(ip, addr.port())
}

/// The broker configuration: MQTT 3.1.1 listeners with packets up to [`MAX_MQTT_PACKET`]; a
/// plain one (with the login check when secured) and optionally a TLS one (client
/// certificates required, the certificate is the login), and the ACL when secured.
pub fn broker_config(broker: &EmbeddedBroker) -> Config {
    let connections = |external_auth| ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_MQTT_PACKET,
        max_inflight_count: 500,
        auth: None,
        external_auth,
        dynamic_filters: true,
    };
    let login = broker.security.as_ref().map(BrokerSecurity::login_check);
    let mut servers = HashMap::from([(
        "v4".to_string(),
        ServerSettings {
            name: "v4".into(),
            listen: broker.listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: connections(login),
        },
    )]);
    if let Some(tls) = &broker.tls {
        let path = |p: &PathBuf| p.display().to_string();
        servers.insert(
            "v4-tls".to_string(),
            ServerSettings {
                name: "v4-tls".into(),
                listen: tls.listen,
                tls: Some(TlsConfig::Rustls {
                    capath: Some(path(&tls.client_ca)),
                    certpath: path(&tls.cert),
                    keypath: path(&tls.key),
                }),
                next_connection_delay_ms: 1,
                connections: connections(None),
            },
        );
    }
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // Each subscription filter keeps a log of its publishes. The vendored router frees
            // the segments every reader has passed, so what stays is the segment being filled
            // (at most SEGMENT_BYTES of topics and payloads) plus what a subscriber has not
            // read yet, up to SEGMENT_COUNT segments: a subscriber further behind loses the
            // oldest.
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENT_COUNT,
            acl: broker.security.as_ref().map(BrokerSecurity::acl),
            ..RouterConfig::default()
        },
        v4: Some(servers),
        ..Config::default()
    }
}

/// Checks that each TLS file can be read and holds PEM, so a typo fails at start rather than
/// at every handshake (rumqttd reads the files for each connection).
pub fn check_tls_files(tls: &TlsListener) -> Result<(), String> {
    let mut problems = Vec::new();
    for (flag, path) in [
        ("--tls-cert", &tls.cert),
        ("--tls-key", &tls.key),
        ("--tls-client-ca", &tls.client_ca),
    ] {
        match std::fs::read_to_string(path) {
            Ok(text) if text.contains("-----BEGIN ") => {}
            Ok(_) => problems.push(format!("{flag}: {} holds no PEM data", path.display())),
            Err(e) => problems.push(format!("{flag}: cannot read {}: {e}", path.display())),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_resolves_to_a_concrete_port() {
        let addr = resolve_listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(addr.port(), 0);
        let fixed: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(resolve_listen(fixed).unwrap(), fixed);
    }

    #[test]
    fn config_has_one_v4_listener_with_the_packet_limit() {
        let addr: SocketAddr = "127.0.0.1:1999".parse().unwrap();
        let config = broker_config(&EmbeddedBroker::open(addr));
        let v4 = config.v4.unwrap();
        assert_eq!(v4.len(), 1);
        assert_eq!(v4["v4"].listen, addr);
        assert_eq!(v4["v4"].connections.max_payload_size, MAX_MQTT_PACKET);
        assert!(v4["v4"].connections.external_auth.is_none());
        assert!(config.router.acl.is_none());
        assert!(config.v5.is_none());
    }

    #[test]
    fn a_secured_broker_checks_logins_and_applies_the_acl() {
        let addr: SocketAddr = "127.0.0.1:1999".parse().unwrap();
        let tls_addr: SocketAddr = "127.0.0.1:1998".parse().unwrap();
        let config = broker_config(&EmbeddedBroker {
            listen: addr,
            tls: Some(TlsListener {
                listen: tls_addr,
                cert: "c.pem".into(),
                key: "k.pem".into(),
                client_ca: "ca.pem".into(),
            }),
            security: Some(BrokerSecurity {
                cloud_user: "cloud-stub".into(),
                cloud_password: crate::security::Secret::new("pw"),
                gateways: None,
            }),
        });
        let v4 = config.v4.unwrap();
        assert!(v4["v4"].connections.external_auth.is_some());
        assert_eq!(v4["v4-tls"].listen, tls_addr);
        assert!(v4["v4-tls"].tls.is_some());
        let acl = config.router.acl.unwrap();
        assert!(!acl.allows("site-1", rumqttd::AclAction::Publish, "gw/site-2/up/state"));
    }

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        let probe = probe_address("0.0.0.0:1883".parse().unwrap());
        assert_eq!(probe, "127.0.0.1:1883".parse().unwrap());
    }
}
