//! The cloud link: one MQTT session carrying every device of this gateway. Only this module
//! knows MQTT; everything else sees decoded protocol payloads and a `Publisher`.

pub mod adapter;
mod link;
mod session;

pub use link::Publisher;
pub use session::{
    ConfigReports, Endpoint, Reconfigure, RemoteDesired, Session, SessionError, Shared, Switch,
};
