//! Size and time limits shared by both sides. The cloud refuses what exceeds them before
//! publishing; gatewayd refuses again on receipt, so neither side trusts the other.

/// Largest RPC `params` or `result` document, serialized (128 KiB).
pub const MAX_RPC_PAYLOAD: usize = 128 * 1024;
/// Largest message payload, serialized (64 KiB).
pub const MAX_MESSAGE_PAYLOAD: usize = 64 * 1024;
/// Largest twin half (desired or reported), serialized (32 KiB).
pub const MAX_TWIN_DOC: usize = 32 * 1024;
/// Deepest nesting of a twin document; the top-level object is depth 1.
pub const MAX_TWIN_DEPTH: usize = 10;
/// Longest twin property key, in bytes.
pub const MAX_TWIN_KEY: usize = 128;
/// Largest MQTT packet either side accepts.
pub const MAX_MQTT_PACKET: usize = 4 * 1024 * 1024;
/// Largest publish a gateway sends by default (AWS IoT Core takes 128 KB, Azure IoT Hub 256
/// KB): announcements are split to fit, anything else that would not fit is a coded error.
pub const DEFAULT_MAX_PUBLISH: usize = 128 * 1024;
/// Room kept in each part for the payload's own fields and the MQTT header.
pub const PART_OVERHEAD: usize = 512;
/// RPC timeout bounds, seconds.
pub const RPC_TIMEOUT_MIN_S: u64 = 1;
/// RPC timeout upper bound, seconds.
pub const RPC_TIMEOUT_MAX_S: u64 = 300;
/// RPC timeout when the caller gives none, seconds.
pub const RPC_TIMEOUT_DEFAULT_S: u64 = 30;
/// Message time-to-live bounds, seconds.
pub const MESSAGE_TTL_MIN_S: u64 = 1;
/// Message time-to-live upper bound (2 days), seconds.
pub const MESSAGE_TTL_MAX_S: u64 = 172_800;
/// Message time-to-live when the caller gives none, seconds.
pub const MESSAGE_TTL_DEFAULT_S: u64 = 3_600;
/// Highest twin version either side accepts (2^53 - 1, exact in every JSON parser). A version
/// above it is refused on receipt, so a hostile value can never wedge a twin or overflow.
pub const MAX_TWIN_VERSION: u64 = (1 << 53) - 1;
