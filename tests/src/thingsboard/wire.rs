//! MQTT framing of one emulator session. ThingsBoard's transport speaks MQTT 3.1.1 and 5 (the
//! official Python client connects with 5), so a session picks its codec from the protocol
//! level of its CONNECT and both go through rumqttc's codecs; the rest of the emulator sees
//! only the few frames a ThingsBoard transport handles.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

/// Largest inbound packet (remaining length), 1 MiB.
pub const MAX_PACKET: usize = 1 << 20;

/// The protocol a session negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// What a client sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Connect {
        client_id: String,
        /// ThingsBoard reads the access token from the user name.
        username: Option<String>,
        keep_alive: u16,
    },
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    PubAck {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// A packet the emulator does not handle (QoS 2 flows, AUTH, ...), by name.
    Unsupported(String),
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// CONNACK: accepted, or refused as not authorized.
    ConnAck {
        accepted: bool,
    },
    /// SUBACK granting QoS 1 to each of `count` filters.
    SubAck {
        pkid: u16,
        count: usize,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    /// PUBLISH at QoS 1 when `pkid` is not 0, else QoS 0.
    Publish {
        topic: String,
        pkid: u16,
        payload: Bytes,
    },
    PubAck {
        pkid: u16,
    },
    PingResp,
}

/// A frame that cannot be decoded: the session ends.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("mqtt 3.1.1: {0}")]
    V4(#[from] m4::Error),
    #[error("mqtt 5: {0}")]
    V5(#[from] m5::Error),
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("unsupported protocol level {0}")]
    Level(u8),
}

/// The protocol level named by a CONNECT at the start of `buf`: `Ok(None)` while more bytes
/// are needed.
pub fn connect_level(buf: &[u8]) -> Result<Option<u8>, WireError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(WireError::NotConnect);
    }
    // Remaining length: 1 to 4 bytes of 7 bits each.
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Ok(None);
        };
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err(WireError::NotConnect);
        }
    }
    let Some(name_len) = buf.get(at..at + 2) else {
        return Ok(None);
    };
    let name_len = u16::from_be_bytes([name_len[0], name_len[1]]) as usize;
    Ok(buf.get(at + 2 + name_len).copied())
}

/// Reads one frame of `version` from `buf`; `Ok(None)` while more bytes are needed.
pub fn read(buf: &mut BytesMut, version: Version) -> Result<Option<Inbound>, WireError> {
    match version {
        Version::V4 => match v4::Packet::read(buf, MAX_PACKET) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(m4::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        },
        // rumqttc's v5 reader wants a reason code in every DISCONNECT; MQTT 5 allows none
        // (remaining length 0 means "normal disconnection"), and paho sends none.
        Version::V5 if buf.starts_with(&[0xE0, 0]) => {
            let _ = buf.split_to(2);
            Ok(Some(Inbound::Disconnect))
        }
        Version::V5 => match v5::Packet::read(buf, Some(MAX_PACKET as u32)) {
            Ok(p) => Ok(Some(from_v5(p))),
            Err(m5::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        },
    }
}

fn from_v4(p: v4::Packet) -> Inbound {
    match p {
        v4::Packet::Connect(c) => Inbound::Connect {
            client_id: c.client_id,
            username: c
                .login
                .map(|l| l.username)
                .filter(|u: &String| !u.is_empty()),
            keep_alive: c.keep_alive,
        },
        v4::Packet::Publish(p) => Inbound::Publish {
            topic: p.topic,
            qos: p.qos as u8,
            pkid: p.pkid,
            payload: p.payload,
        },
        v4::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| f.path).collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect,
        other => Inbound::Unsupported(format!("{other:?}")),
    }
}

fn from_v5(p: v5::Packet) -> Inbound {
    match p {
        v5::Packet::Connect(c, _, login) => Inbound::Connect {
            client_id: c.client_id,
            username: login.map(|l| l.username).filter(|u| !u.is_empty()),
            keep_alive: c.keep_alive,
        },
        v5::Packet::Publish(p) => Inbound::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            qos: p.qos as u8,
            pkid: p.pkid,
            payload: p.payload,
        },
        v5::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| f.path).collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(_) => Inbound::Disconnect,
        other => Inbound::Unsupported(format!("{other:?}")),
    }
}

/// Appends `frame` encoded for `version` to `out`.
pub fn write(frame: &Outbound, version: Version, out: &mut BytesMut) -> Result<(), WireError> {
    match version {
        Version::V4 => {
            let p = match frame {
                Outbound::ConnAck { accepted } => v4::Packet::ConnAck(v4::ConnAck::new(
                    if *accepted {
                        v4::ConnectReturnCode::Success
                    } else {
                        v4::ConnectReturnCode::NotAuthorized
                    },
                    false,
                )),
                Outbound::SubAck { pkid, count } => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    vec![v4::SubscribeReasonCode::Success(m4::QoS::AtLeastOnce); *count],
                )),
                Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
                Outbound::Publish {
                    topic,
                    pkid,
                    payload,
                } => {
                    let qos = if *pkid == 0 {
                        m4::QoS::AtMostOnce
                    } else {
                        m4::QoS::AtLeastOnce
                    };
                    let mut p = v4::Publish::from_bytes(topic.clone(), qos, payload.clone());
                    p.pkid = *pkid;
                    v4::Packet::Publish(p)
                }
                Outbound::PubAck { pkid } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Outbound::PingResp => v4::Packet::PingResp,
            };
            p.write(out, usize::MAX)?;
        }
        Version::V5 => {
            let p = match frame {
                Outbound::ConnAck { accepted } => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code: if *accepted {
                        v5::ConnectReturnCode::Success
                    } else {
                        v5::ConnectReturnCode::NotAuthorized
                    },
                    properties: None,
                }),
                Outbound::SubAck { pkid, count } => v5::Packet::SubAck(v5::SubAck {
                    pkid: *pkid,
                    return_codes: vec![
                        v5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce);
                        *count
                    ],
                    properties: None,
                }),
                Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: vec![v5::UnsubAckReason::Success; *count],
                    properties: None,
                }),
                Outbound::Publish {
                    topic,
                    pkid,
                    payload,
                } => {
                    let qos = if *pkid == 0 {
                        m5::QoS::AtMostOnce
                    } else {
                        m5::QoS::AtLeastOnce
                    };
                    let mut p = v5::Publish::new(topic.clone(), qos, payload.clone(), None);
                    p.pkid = *pkid;
                    v5::Packet::Publish(p)
                }
                Outbound::PubAck { pkid } => v5::Packet::PubAck(v5::PubAck::new(*pkid, None)),
                Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
            };
            p.write(out, None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_of_a_connect_is_found_once_its_bytes_are_there() {
        let mut buf = BytesMut::new();
        let mut c = v4::Connect::new("gw");
        c.set_login("token", "");
        v4::Packet::Connect(c).write(&mut buf, usize::MAX).unwrap();
        assert_eq!(connect_level(&buf[..3]).unwrap(), None);
        assert_eq!(connect_level(&buf).unwrap(), Some(4));
        assert!(matches!(
            connect_level(&[0x30, 0]),
            Err(WireError::NotConnect)
        ));
        let frame = read(&mut buf, Version::V4).unwrap().unwrap();
        assert_eq!(
            frame,
            Inbound::Connect {
                client_id: "gw".into(),
                username: Some("token".into()),
                keep_alive: 10,
            }
        );
    }

    #[test]
    fn a_bare_disconnect_reads_in_both_versions() {
        for version in [Version::V4, Version::V5] {
            let mut buf = BytesMut::from(&[0xE0u8, 0][..]);
            assert_eq!(read(&mut buf, version).unwrap(), Some(Inbound::Disconnect));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_publish_round_trips_in_both_versions() {
        for version in [Version::V4, Version::V5] {
            let mut buf = BytesMut::new();
            let frame = Outbound::Publish {
                topic: "v1/gateway/rpc".into(),
                pkid: 7,
                payload: Bytes::from_static(b"{}"),
            };
            write(&frame, version, &mut buf).unwrap();
            let half = buf.split_to(4);
            let mut partial = half.clone();
            assert_eq!(read(&mut partial, version).unwrap(), None);
            let mut whole = half;
            whole.unsplit(buf);
            assert_eq!(
                read(&mut whole, version).unwrap(),
                Some(Inbound::Publish {
                    topic: "v1/gateway/rpc".into(),
                    qos: 1,
                    pkid: 7,
                    payload: Bytes::from_static(b"{}"),
                })
            );
        }
    }
}
