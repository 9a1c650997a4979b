//! The gatewayd <-> cloud wire protocol: topic names, payload types, error codes, size limits,
//! twin merge and version rules, and message states. Plain data and functions, no I/O; both
//! `gatewayd` and `cloud-stub` speak through this crate, so the two sides cannot drift apart.
//!
//! The prose description lives in `docs/protocol.md`; keep the two in step.

pub mod chunk;
pub mod error;
pub mod ids;
pub mod limits;
pub mod message;
pub mod payload;
pub mod topic;
pub mod twin;

pub use error::{ErrorCode, RpcError};
pub use ids::{DeviceId, GatewayId, IdError, MessageId, RequestId};
pub use payload::*;
pub use topic::{Down, GatewayAcl, Topics, Up};

/// Version carried as `"v"` in every payload. A receiver refuses payloads with a higher major
/// version than its own, and ignores fields it does not know.
pub const PROTOCOL_VERSION: u32 = 1;
