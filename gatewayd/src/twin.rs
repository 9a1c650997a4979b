//! Twin application, pure part: which desired properties to apply to a device, and how each
//! device answer becomes a reported value and an apply status. No I/O; the caller passes the
//! documents in and performs the calls.

use gatewayd_protocol::twin::same_value;
use gatewayd_protocol::{ApplyState, ApplyStatus};
use serde_json::{Map, Value};

/// One property to apply: its name and the desired value.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub property: String,
    pub value: Value,
}

/// Properties of `desired` whose value differs from `applied` (the desired document last
/// applied in full), in name order. Only the final state is applied: intermediate versions
/// never appear here. Deleted properties are not applied (the device keeps its value).
pub fn plan(desired: &Value, applied: &Value) -> Vec<Step> {
    let Some(d) = desired.as_object() else {
        return Vec::new();
    };
    let a = applied.as_object();
    let mut steps: Vec<Step> = d
        .iter()
        .filter(|(k, v)| {
            !a.and_then(|a| a.get(*k))
                .is_some_and(|av| same_value(av, v))
        })
        .map(|(k, v)| Step {
            property: k.clone(),
            value: v.clone(),
        })
        .collect();
    steps.sort_by(|x, y| x.property.cmp(&y.property));
    steps
}

/// What came of one step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The device accepted; `holds` is the value it reports (its answer, or the desired value
    /// when the mapping takes no result).
    Accepted { holds: Value },
    /// The device, or the absence of a mapping, said no.
    Refused { reason: String },
    /// Not applied yet: the device was busy or not reachable; tried again with backoff.
    Pending { reason: String, attempts: u32 },
}

/// Folds step outcomes into a reported patch and per-property apply statuses.
pub fn report(
    steps: &[(Step, StepOutcome)],
    desired_version: u64,
    now_ms: u64,
) -> (Value, std::collections::BTreeMap<String, ApplyStatus>) {
    let mut patch = Map::new();
    let mut apply = std::collections::BTreeMap::new();
    for (step, outcome) in steps {
        let (state, reason) = match outcome {
            StepOutcome::Accepted { holds } => {
                patch.insert(step.property.clone(), holds.clone());
                if same_value(holds, &step.value) {
                    (ApplyState::Applied, None)
                } else {
                    (
                        ApplyState::Different,
                        Some(format!("device holds {holds}, desired {}", step.value)),
                    )
                }
            }
            StepOutcome::Refused { reason } => (ApplyState::Refused, Some(reason.clone())),
            StepOutcome::Pending { reason, .. } => (ApplyState::Pending, Some(reason.clone())),
        };
        let attempts = match outcome {
            StepOutcome::Pending { attempts, .. } => *attempts,
            _ => 0,
        };
        apply.insert(
            step.property.clone(),
            ApplyStatus {
                state,
                desired_version,
                reason,
                at_ms: now_ms,
                attempts,
            },
        );
    }
    (Value::Object(patch), apply)
}

/// The document to record as applied after a round: the desired document, except that a
/// property the device refused, holds differently, or has not taken yet keeps its previously
/// applied value (or stays absent). So a later desired version, even one that asks the same
/// value again, applies it again: a new version is the operator asking again.
pub fn applied_after(desired: &Value, previous: &Value, steps: &[(Step, StepOutcome)]) -> Value {
    let mut doc = desired.as_object().cloned().unwrap_or_default();
    for (step, outcome) in steps {
        let taken =
            matches!(outcome, StepOutcome::Accepted { holds } if same_value(holds, &step.value));
        if !taken {
            match previous.get(&step.property) {
                Some(v) => doc.insert(step.property.clone(), v.clone()),
                None => doc.remove(&step.property),
            };
        }
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plan_applies_only_what_changed_since_the_last_application() {
        let steps = plan(
            &json!({"maxSpeed": 30, "mode": "auto", "led": true}),
            &json!({"mode": "auto"}),
        );
        let names: Vec<_> = steps.iter().map(|s| s.property.as_str()).collect();
        assert_eq!(names, vec!["led", "maxSpeed"]);
        assert!(plan(&json!({"a": 1}), &json!({"a": 1})).is_empty());
    }

    #[test]
    fn clamped_values_are_reported_as_different() {
        let steps = vec![
            (
                Step {
                    property: "maxSpeed".into(),
                    value: json!(30),
                },
                StepOutcome::Accepted { holds: json!(20) },
            ),
            (
                Step {
                    property: "mode".into(),
                    value: json!("auto"),
                },
                StepOutcome::Accepted {
                    holds: json!("auto"),
                },
            ),
            (
                Step {
                    property: "color".into(),
                    value: json!("red"),
                },
                StepOutcome::Refused {
                    reason: "no mapping for property 'color'".into(),
                },
            ),
        ];
        let (patch, apply) = report(&steps, 7, 100);
        assert_eq!(patch, json!({"maxSpeed": 20, "mode": "auto"}));
        assert_eq!(apply["maxSpeed"].state, ApplyState::Different);
        assert_eq!(apply["mode"].state, ApplyState::Applied);
        assert_eq!(apply["color"].state, ApplyState::Refused);
        assert_eq!(apply["color"].desired_version, 7);
    }

    #[test]
    fn only_what_the_device_took_counts_as_applied() {
        let step = |p: &str, v: Value| Step {
            property: p.into(),
            value: v,
        };
        let steps = vec![
            (
                step("a", json!(1)),
                StepOutcome::Accepted { holds: json!(1) },
            ),
            (
                step("b", json!(30)),
                StepOutcome::Accepted { holds: json!(20) },
            ),
            (
                step("c", json!(5)),
                StepOutcome::Refused {
                    reason: "no".into(),
                },
            ),
            (
                step("d", json!(true)),
                StepOutcome::Pending {
                    reason: "busy".into(),
                    attempts: 2,
                },
            ),
        ];
        let desired = json!({"a": 1, "b": 30, "c": 5, "d": true, "e": "kept"});
        let previous = json!({"c": 4, "e": "kept"});
        let applied = applied_after(&desired, &previous, &steps);
        assert_eq!(applied, json!({"a": 1, "c": 4, "e": "kept"}));
        // The same desired document planned again re-applies everything not taken.
        let again: Vec<_> = plan(&desired, &applied)
            .into_iter()
            .map(|s| s.property)
            .collect();
        assert_eq!(again, vec!["b", "c", "d"]);
        let (_, apply) = report(&steps, 3, 10);
        assert_eq!(apply["d"].state, ApplyState::Pending);
        assert_eq!(apply["d"].attempts, 2);
        assert_eq!(apply["a"].attempts, 0);
    }
}
