//! MQTT topic names. Every topic a gateway uses sits under `gw/{gateway}/`, split into `up/`
//! (gateway publishes) and `down/` (gateway subscribes), so a broker ACL of two patterns confines
//! a gateway to its own namespace:
//!
//! ```text
//! publish   gw/{gateway}/up/#
//! subscribe gw/{gateway}/down/#
//! ```
//!
//! [`GatewayAcl`] is that rule as code, for a broker hook (the cloud stub's embedded broker).
//! Only this module builds or parses topic strings.

use crate::ids::GatewayId;

/// Root of every topic.
pub const ROOT: &str = "gw";

/// Topics a gateway publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Up {
    /// Retained presence: birth (`online: true`) and last will (`online: false`).
    State,
    /// Retained catalog: the gateway's devices and what each supports.
    Catalog,
    /// Retained device presence snapshot.
    Devices,
    /// RPC responses.
    RpcResponse,
    /// Reported twin patches.
    TwinReported,
    /// Desired-version statement asking for snapshots of devices that are behind.
    TwinSync,
    /// Message feedback.
    MessageFeedback,
    /// Retained: the gateway's own configuration as it runs, and what became of the last
    /// remote configuration.
    Config,
}

/// Topics a gateway subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// RPC requests.
    RpcRequest,
    /// Desired twin patches and snapshots.
    TwinDesired,
    /// Cloud-to-device messages.
    Message,
    /// The gateway's desired configuration (its own twin).
    ConfigDesired,
}

impl Up {
    const ALL: [Up; 8] = [
        Up::State,
        Up::Catalog,
        Up::Devices,
        Up::RpcResponse,
        Up::TwinReported,
        Up::TwinSync,
        Up::MessageFeedback,
        Up::Config,
    ];

    /// The topic suffix after `gw/{gateway}/up/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Up::State => "state",
            Up::Catalog => "catalog",
            Up::Devices => "devices",
            Up::RpcResponse => "rpc/res",
            Up::TwinReported => "twin/reported",
            Up::TwinSync => "twin/sync",
            Up::MessageFeedback => "msg/feedback",
            Up::Config => "config",
        }
    }
}

impl Down {
    const ALL: [Down; 4] = [
        Down::RpcRequest,
        Down::TwinDesired,
        Down::Message,
        Down::ConfigDesired,
    ];

    /// The topic suffix after `gw/{gateway}/down/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Down::RpcRequest => "rpc/req",
            Down::TwinDesired => "twin/desired",
            Down::Message => "msg",
            Down::ConfigDesired => "config/desired",
        }
    }
}

/// Builds and parses topics.
pub struct Topics;

impl Topics {
    /// `gw/{gateway}/up/{suffix}`.
    pub fn up(gateway: &GatewayId, kind: Up) -> String {
        format!("{ROOT}/{gateway}/up/{}", kind.suffix())
    }

    /// `gw/{gateway}/down/{suffix}`.
    pub fn down(gateway: &GatewayId, kind: Down) -> String {
        format!("{ROOT}/{gateway}/down/{}", kind.suffix())
    }

    /// `gw/{gateway}/up/{suffix}/{part}`: one part of a split announcement (catalog, devices).
    pub fn up_part(gateway: &GatewayId, kind: Up, part: u32) -> String {
        format!("{ROOT}/{gateway}/up/{}/{part}", kind.suffix())
    }

    /// Parses `gw/{gateway}/up/{catalog|devices}/{part}`.
    pub fn parse_up_part(topic: &str) -> Option<(GatewayId, Up, u32)> {
        let (gw, rest) = split(topic, "up")?;
        let (kind, part) = rest.rsplit_once('/')?;
        let kind = [Up::Catalog, Up::Devices]
            .into_iter()
            .find(|k| k.suffix() == kind)?;
        if part.is_empty() || part.len() > 6 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((gw, kind, part.parse().ok()?))
    }

    /// The filter a gateway subscribes to: `gw/{gateway}/down/#`.
    pub fn down_filter(gateway: &GatewayId) -> String {
        format!("{ROOT}/{gateway}/down/#")
    }

    /// The filter the cloud subscribes to: `gw/+/up/#`.
    pub fn all_up_filter() -> String {
        format!("{ROOT}/+/up/#")
    }

    /// Parses an `up` topic into its gateway and kind.
    pub fn parse_up(topic: &str) -> Option<(GatewayId, Up)> {
        let (gw, rest) = split(topic, "up")?;
        let kind = Up::ALL.into_iter().find(|k| k.suffix() == rest)?;
        Some((gw, kind))
    }

    /// Parses a `down` topic into its gateway and kind.
    pub fn parse_down(topic: &str) -> Option<(GatewayId, Down)> {
        let (gw, rest) = split(topic, "down")?;
        let kind = Down::ALL.into_iter().find(|k| k.suffix() == rest)?;
        Some((gw, kind))
    }
}

/// The broker ACL of one gateway, as a broker hook applies it: a gateway may publish only
/// under `gw/{gateway}/up/` and subscribe only under `gw/{gateway}/down/`. Ids never contain
/// `/`, `+` or `#`, so a prefix match cannot be widened by a wildcard level.
pub struct GatewayAcl;

impl GatewayAcl {
    /// Whether `gateway` may publish on `topic` (a topic name, no wildcards).
    pub fn may_publish(gateway: &GatewayId, topic: &str) -> bool {
        within(gateway, "up", topic) && !topic.contains(['+', '#'])
    }

    /// Whether `gateway` may subscribe to `filter` (`#` and `+` allowed below its `down/`).
    pub fn may_subscribe(gateway: &GatewayId, filter: &str) -> bool {
        within(gateway, "down", filter)
    }
}

fn within(gateway: &GatewayId, dir: &str, topic: &str) -> bool {
    topic
        .strip_prefix(ROOT)
        .and_then(|t| t.strip_prefix('/'))
        .and_then(|t| t.strip_prefix(gateway.as_str()))
        .and_then(|t| t.strip_prefix('/'))
        .and_then(|t| t.strip_prefix(dir))
        .and_then(|t| t.strip_prefix('/'))
        .is_some_and(|rest| !rest.is_empty())
}

fn split<'a>(topic: &'a str, dir: &str) -> Option<(GatewayId, &'a str)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (gw, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix(dir)?.strip_prefix('/')?;
    Some((GatewayId::new(gw).ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> GatewayId {
        GatewayId::new("site-7").unwrap()
    }

    #[test]
    fn builds_prefixed_topics() {
        assert_eq!(Topics::up(&gw(), Up::RpcResponse), "gw/site-7/up/rpc/res");
        assert_eq!(
            Topics::down(&gw(), Down::RpcRequest),
            "gw/site-7/down/rpc/req"
        );
        assert_eq!(Topics::down_filter(&gw()), "gw/site-7/down/#");
    }

    #[test]
    fn parses_every_kind_back() {
        for k in Up::ALL {
            assert_eq!(Topics::parse_up(&Topics::up(&gw(), k)), Some((gw(), k)));
        }
        for k in Down::ALL {
            assert_eq!(Topics::parse_down(&Topics::down(&gw(), k)), Some((gw(), k)));
        }
    }

    #[test]
    fn the_acl_confines_a_gateway_to_its_own_namespace() {
        let a = gw();
        assert!(GatewayAcl::may_publish(&a, "gw/site-7/up/state"));
        assert!(GatewayAcl::may_publish(&a, "gw/site-7/up/rpc/res"));
        assert!(!GatewayAcl::may_publish(&a, "gw/site-8/up/state"));
        assert!(!GatewayAcl::may_publish(&a, "gw/site-7/down/rpc/req"));
        assert!(!GatewayAcl::may_publish(&a, "gw/site-77/up/state"));
        assert!(!GatewayAcl::may_publish(&a, "gw/site-7/up/"));
        assert!(!GatewayAcl::may_publish(&a, "gw/site-7/up"));
        assert!(GatewayAcl::may_subscribe(&a, "gw/site-7/down/#"));
        assert!(GatewayAcl::may_subscribe(&a, "gw/site-7/down/rpc/req"));
        assert!(!GatewayAcl::may_subscribe(&a, "gw/site-8/down/#"));
        assert!(!GatewayAcl::may_subscribe(&a, "gw/+/down/#"));
        assert!(!GatewayAcl::may_subscribe(&a, "gw/#"));
        assert!(!GatewayAcl::may_subscribe(&a, "#"));
        assert!(!GatewayAcl::may_subscribe(&a, "gw/site-7/up/#"));
        assert!(!GatewayAcl::may_subscribe(&a, "$share/g/gw/site-8/down/#"));
    }

    #[test]
    fn rejects_foreign_or_malformed_topics() {
        assert_eq!(Topics::parse_up("gw/site-7/down/rpc/req"), None);
        assert_eq!(Topics::parse_up("gw/site-7/up/unknown"), None);
        assert_eq!(Topics::parse_up("other/site-7/up/state"), None);
        assert_eq!(Topics::parse_up("gw/+/up/state"), None);
        assert_eq!(Topics::parse_down("gw/site-7"), None);
    }
}
