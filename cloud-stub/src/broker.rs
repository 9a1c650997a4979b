//! The embedded MQTT broker (rumqttd) on its own OS thread, and helpers to give it a port.
//!
//! rumqttd's `Broker::start()` blocks its thread forever and cannot report the port it bound,
//! so the caller resolves port 0 to a concrete free port first ([`resolve_listen`]) and then
//! waits until that port accepts TCP connections ([`wait_until_accepting`]).

use crate::error::StubError;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Starts rumqttd listening on `listen` (a concrete port; see [`resolve_listen`]) on a dedicated
/// thread and returns at once. The broker lives until the process exits. A failure to bind is
/// only visible as the port never accepting; use [`wait_until_accepting`].
pub fn start_embedded_broker(listen: SocketAddr) -> Result<(), StubError> {
    let config = broker_config(listen);
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

/// The broker configuration: one plain MQTT 3.1.1 listener, no auth, packets up to
/// [`MAX_MQTT_PACKET`].
pub fn broker_config(listen: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_MQTT_PACKET,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Config::default()
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
        let config = broker_config(addr);
        let v4 = config.v4.unwrap();
        assert_eq!(v4.len(), 1);
        assert_eq!(v4["v4"].listen, addr);
        assert_eq!(v4["v4"].connections.max_payload_size, MAX_MQTT_PACKET);
        assert!(config.v5.is_none());
    }

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        let probe = probe_address("0.0.0.0:1883".parse().unwrap());
        assert_eq!(probe, "127.0.0.1:1883".parse().unwrap());
    }
}
