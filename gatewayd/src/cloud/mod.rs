//! The cloud link: one MQTT session carrying every device of this gateway. Only this module
//! knows MQTT; everything else sees decoded protocol payloads.

mod session;

pub use session::{Session, SessionError};
