//! Twin rules: JSON merge patch (RFC 7386), document limits, the desired/reported delta, and the
//! version rule that decides whether an incoming desired update is applied, ignored or needs a
//! snapshot resync.

use crate::limits::{MAX_TWIN_DEPTH, MAX_TWIN_DOC, MAX_TWIN_KEY};
use serde_json::{Map, Value};

/// Applies `patch` to `target` per RFC 7386: objects merge recursively, `null` deletes a key,
/// anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else {
        unreachable!("target was just made an object")
    };
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Why a twin document or patch is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinDocError {
    #[error("twin document must be a JSON object")]
    NotAnObject,
    #[error("twin document is {size} bytes, the limit is {MAX_TWIN_DOC}")]
    TooLarge { size: usize },
    #[error("twin document nests {depth} levels deep at '{path}', the limit is {MAX_TWIN_DEPTH}")]
    TooDeep { depth: usize, path: String },
    #[error("twin key '{key}' is invalid: {why}")]
    BadKey { key: String, why: &'static str },
}

/// Checks a patch's shape before it is merged: an object, keys valid, depth within limits.
pub fn validate_patch(patch: &Value) -> Result<(), TwinDocError> {
    if !patch.is_object() {
        return Err(TwinDocError::NotAnObject);
    }
    check_depth(patch, 1, "")
}

/// Checks a whole document after a merge: shape and serialized size.
pub fn validate_doc(doc: &Value) -> Result<(), TwinDocError> {
    validate_patch(doc)?;
    let size = serde_json::to_vec(doc)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_TWIN_DOC {
        return Err(TwinDocError::TooLarge { size });
    }
    Ok(())
}

fn check_depth(v: &Value, depth: usize, path: &str) -> Result<(), TwinDocError> {
    match v {
        Value::Object(m) => {
            if depth > MAX_TWIN_DEPTH {
                return Err(TwinDocError::TooDeep {
                    depth,
                    path: path.to_string(),
                });
            }
            for (k, child) in m {
                check_key(k)?;
                check_depth(child, depth + 1, &format!("{path}/{k}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            if depth > MAX_TWIN_DEPTH {
                return Err(TwinDocError::TooDeep {
                    depth,
                    path: path.to_string(),
                });
            }
            for (i, child) in items.iter().enumerate() {
                check_depth(child, depth + 1, &format!("{path}/{i}"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_key(k: &str) -> Result<(), TwinDocError> {
    let bad = |why| {
        Err(TwinDocError::BadKey {
            key: k.chars().take(40).collect(),
            why,
        })
    };
    if k.is_empty() {
        return bad("empty");
    }
    if k.len() > MAX_TWIN_KEY {
        return bad("longer than 128 bytes");
    }
    if k.starts_with('$') {
        return bad("keys starting with '$' are reserved");
    }
    if k.chars().any(|c| c.is_control() || c == '.' || c == ' ') {
        return bad("keys may not contain '.', spaces or control characters");
    }
    Ok(())
}

/// JSON equality where numbers compare by value, so `30` and `30.0` (a device that answers in
/// floats) are the same setting.
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// Top-level desired properties whose reported value differs or is missing, sorted.
pub fn delta(desired: &Value, reported: &Value) -> Vec<String> {
    let Some(d) = desired.as_object() else {
        return Vec::new();
    };
    let r = reported.as_object();
    let mut out: Vec<String> = d
        .iter()
        .filter(|(k, v)| {
            !r.and_then(|r| r.get(*k))
                .is_some_and(|rv| same_value(rv, v))
        })
        .map(|(k, _)| k.clone())
        .collect();
    out.sort();
    out
}

/// What a gateway does with an incoming desired update, given the version it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredDecision {
    /// Apply: a snapshot newer than held, or the patch right after the held version.
    Apply,
    /// Not newer than what is held: stale or duplicated.
    Ignore,
    /// A patch that skips versions: ask for a snapshot instead of applying a partial state.
    Resync,
}

/// The version rule. `is_snapshot` distinguishes a snapshot from a patch.
/// A version above [`crate::limits::MAX_TWIN_VERSION`] is ignored whatever is held.
pub fn decide_desired(held: u64, incoming: u64, is_snapshot: bool) -> DesiredDecision {
    if incoming <= held || incoming > crate::limits::MAX_TWIN_VERSION {
        DesiredDecision::Ignore
    } else if is_snapshot || Some(incoming) == held.checked_add(1) {
        DesiredDecision::Apply
    } else {
        DesiredDecision::Resync
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn depth_limit_counts_the_top_object_as_one() {
        let mut ok = json!(1);
        for _ in 0..10 {
            ok = json!({ "k": ok });
        }
        assert!(validate_patch(&ok).is_ok());
        let too_deep = json!({ "k": ok });
        assert!(matches!(
            validate_patch(&too_deep),
            Err(TwinDocError::TooDeep { depth: 11, .. })
        ));
    }

    #[test]
    fn size_limit_is_enforced_on_whole_documents() {
        let big = json!({ "blob": "x".repeat(MAX_TWIN_DOC) });
        assert!(matches!(
            validate_doc(&big),
            Err(TwinDocError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(validate_patch(&json!({"$version": 1})).is_err());
        assert!(validate_patch(&json!({"a.b": 1})).is_err());
        assert!(validate_patch(&json!({"": 1})).is_err());
        assert_eq!(validate_patch(&json!([1])), Err(TwinDocError::NotAnObject));
    }

    #[test]
    fn delta_lists_differing_and_missing_properties() {
        let d = json!({"maxSpeed": 30, "mode": "auto", "led": true});
        let r = json!({"maxSpeed": 20, "led": true});
        assert_eq!(delta(&d, &r), vec!["maxSpeed", "mode"]);
        assert!(delta(&d, &d).is_empty());
        assert!(
            delta(&json!({"t": 30}), &json!({"t": 30.0})).is_empty(),
            "30 and 30.0 agree"
        );
        assert!(same_value(&json!({"a": [1, 2.0]}), &json!({"a": [1.0, 2]})));
        assert!(!same_value(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    }

    #[test]
    fn version_rule() {
        use DesiredDecision::*;
        assert_eq!(decide_desired(4, 5, false), Apply);
        assert_eq!(decide_desired(4, 4, false), Ignore);
        assert_eq!(decide_desired(4, 3, true), Ignore);
        assert_eq!(decide_desired(4, 7, false), Resync);
        assert_eq!(decide_desired(4, 7, true), Apply);
        let max = crate::limits::MAX_TWIN_VERSION;
        assert_eq!(decide_desired(4, u64::MAX, true), Ignore);
        assert_eq!(decide_desired(4, max + 1, true), Ignore);
        assert_eq!(decide_desired(max - 1, max, false), Apply);
        assert_eq!(decide_desired(u64::MAX, 3, false), Ignore);
    }
}
