//! Identifier newtypes. Ids become MQTT topic levels and URL path segments, so they are
//! restricted to a safe alphabet: ASCII letters, digits, `-`, `_`, `.`, 1 to 64 characters.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than 64 characters")]
    TooLong,
    #[error("id contains {0:?}; only ASCII letters, digits, '-', '_' and '.' are allowed")]
    BadChar(char),
}

/// Checks that `s` is a valid identifier.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > 64 {
        return Err(IdError::TooLong);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar(c));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        // Deserializing validates too: an id read off the wire obeys the same rules as one
        // built with `new`.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate_id(&s)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A gateway, unique within the cloud; the first level under the topic prefix.
    GatewayId
);
id_type!(
    /// A device, unique within the cloud (the operator API addresses devices without naming
    /// their gateway).
    DeviceId
);
id_type!(
    /// One RPC invocation, chosen by the cloud.
    RequestId
);
id_type!(
    /// One cloud-to-device message, chosen by the cloud; the de-duplication key for at-most-once
    /// execution.
    MessageId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_ids() {
        assert!(DeviceId::new("agv-1").is_ok());
        assert!(DeviceId::new("Line_3.scale").is_ok());
    }

    #[test]
    fn refuses_topic_wildcards_and_separators() {
        assert_eq!(DeviceId::new("a/b"), Err(IdError::BadChar('/')));
        assert_eq!(DeviceId::new("+"), Err(IdError::BadChar('+')));
        assert_eq!(DeviceId::new("#"), Err(IdError::BadChar('#')));
        assert_eq!(DeviceId::new(""), Err(IdError::Empty));
        assert_eq!(DeviceId::new("x".repeat(65)), Err(IdError::TooLong));
    }

    #[test]
    fn ids_serialize_as_plain_strings() {
        let id = DeviceId::new("agv-1").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"agv-1\"");
        let back: DeviceId = serde_json::from_str("\"agv-1\"").unwrap();
        assert_eq!(back, id);
    }
}
