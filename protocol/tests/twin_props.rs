//! Properties of the twin rules: RFC 7386 merge patch, the document limits and the desired
//! version rule, checked on generated documents, patches and version pairs.

use gatewayd_protocol::limits::{MAX_TWIN_DEPTH, MAX_TWIN_DOC, MAX_TWIN_KEY, MAX_TWIN_VERSION};
use gatewayd_protocol::twin::{decide_desired, merge_patch, validate_doc, DesiredDecision};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Few distinct keys, so that patches and documents often name the same members.
fn key() -> impl Strategy<Value = String> {
    prop_oneof!["[abc]", "[a-d]{1,2}"]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6..1e6f64).prop_map(Value::from),
        "[a-z]{0,3}".prop_map(Value::from),
    ]
}

fn object_of(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), inner, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Any JSON value, nulls included (inside arrays and objects too).
fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            object_of(inner),
        ]
    })
}

/// A merge patch as the cloud sends it: an object.
fn patch() -> impl Strategy<Value = Value> {
    object_of(json_value())
}

fn merged(target: &Value, patch: &Value) -> Value {
    let mut out = target.clone();
    merge_patch(&mut out, patch);
    out
}

/// RFC 7386 section 2 read as a statement about the result: a non-object patch replaces the
/// target; an object patch leaves an object in which every member it names is deleted (null)
/// or the recursive merge of the target's member with it, and every other member is the
/// target's own (none when the target was not an object).
fn check_merge(target: &Value, patch: &Value, result: &Value) -> Result<(), TestCaseError> {
    let Value::Object(p) = patch else {
        prop_assert_eq!(result, patch);
        return Ok(());
    };
    let Value::Object(r) = result else {
        return Err(TestCaseError::fail(format!(
            "object patch {patch} gave a non-object {result}"
        )));
    };
    let empty = Map::new();
    let t = target.as_object().unwrap_or(&empty);
    for (k, pv) in p {
        if pv.is_null() {
            prop_assert!(!r.contains_key(k), "{k} deleted by {patch}: {result}");
        } else {
            let rv = r.get(k);
            prop_assert!(
                rv.is_some_and(|v| !v.is_null()),
                "{k} set by {patch}: {result}"
            );
            check_merge(t.get(k).unwrap_or(&Value::Null), pv, &r[k])?;
        }
    }
    for (k, rv) in r {
        if !p.contains_key(k) {
            prop_assert_eq!(Some(rv), t.get(k), "member {} not named by the patch", k);
        }
    }
    Ok(())
}

/// Every null member of `v` inside nested objects, as paths.
fn null_members(v: &Value, path: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let at = format!("{path}/{k}");
            if child.is_null() {
                out.push(at);
            } else {
                null_members(child, &at, out);
            }
        }
    }
}

/// The value at an object path (`/a/b`), if every step is an object member.
fn at<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('/')
        .skip(1)
        .try_fold(v, |v, k| v.as_object()?.get(k))
}

/// One patch with the effect of `a` then `b`, when RFC 7386 can express it (see
/// [`composable`]): `b`'s members win, objects on both sides compose recursively, and `a`'s
/// other members stay (its nulls still delete).
fn compose(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let mut out = a.clone();
            for (k, bv) in b {
                let v = match a.get(k) {
                    Some(av) if bv.is_object() => compose(av, bv),
                    _ => bv.clone(),
                };
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        _ => b.clone(),
    }
}

/// Whether `a` then `b` is one merge patch: not when `b` merges an object into a member that
/// `a` set to a non-object or deleted. Then the result is `b`'s object whatever the target
/// held there, and a merge patch can only merge into the target's member, never replace it
/// with an object.
fn composable(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (_, b) if !b.is_object() => true,
        (Value::Object(a), Value::Object(b)) => b.iter().all(|(k, bv)| match a.get(k) {
            _ if !bv.is_object() => true,
            None => true,
            Some(av) => av.is_object() && composable(av, bv),
        }),
        _ => false,
    }
}

/// The limits as documented: an object, keys 1 to 128 bytes not starting with `$` and free
/// of `.`, spaces and control characters, at most 10 nested containers (the top object
/// counts), at most 32 KiB serialized.
fn within_limits(doc: &Value) -> bool {
    fn depth(v: &Value) -> usize {
        match v {
            Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    fn keys_ok(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.iter().all(|(k, v)| {
                !k.is_empty()
                    && k.len() <= MAX_TWIN_KEY
                    && !k.starts_with('$')
                    && !k.chars().any(|c| c.is_control() || c == '.' || c == ' ')
                    && keys_ok(v)
            }),
            Value::Array(a) => a.iter().all(keys_ok),
            _ => true,
        }
    }
    doc.is_object()
        && depth(doc) <= MAX_TWIN_DEPTH
        && keys_ok(doc)
        && serde_json::to_vec(doc).unwrap().len() <= MAX_TWIN_DOC
}

/// Keys of any text, from a few bad ones to long ones.
fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z]{1,4}",
        2 => any::<String>(),
        1 => Just(String::new()),
        1 => "\\$[a-z]{0,3}",
        1 => "[a-z]{0,2}[. \\x00-\\x1f\\x7f\\u{85}][a-z]{0,2}",
        1 => "x{120,136}",
    ]
}

/// Documents of any shape, deeper and with wilder keys than [`json_value`].
fn any_doc() -> impl Strategy<Value = Value> {
    let nested = leaf().prop_recursive(14, 64, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(any_key(), inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    // A chain of containers around a leaf, across the depth limit, mostly under valid keys.
    let level = prop::option::of(prop_oneof![8 => "[a-z]{1,4}", 1 => any_key()]);
    let chain = (prop::collection::vec(level, 0..16), leaf())
        .prop_map(|(levels, leaf)| {
            levels.into_iter().fold(leaf, |inner, level| match level {
                Some(k) => json!({ k: inner }),
                None => json!([inner]),
            })
        })
        .boxed();
    let nested = prop_oneof![
        3 => prop::collection::btree_map("[a-z]{1,4}", nested.clone(), 1..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => nested,
    ];
    let chain = prop_oneof![3 => chain.clone().prop_map(|c| json!({ "top": c })), 1 => chain];
    // One string member whose length puts the document across the size limit.
    let big = (MAX_TWIN_DOC - 16..MAX_TWIN_DOC + 16).prop_map(|n| json!({ "k": "x".repeat(n) }));
    prop_oneof![3 => nested, 3 => chain, 1 => big]
}

/// Versions around the places where the rule changes.
fn version() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0..8u64,
        (MAX_TWIN_VERSION - 4..=MAX_TWIN_VERSION + 4),
        (u64::MAX - 4..=u64::MAX),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn merge_follows_rfc7386(target in json_value(), patch in prop_oneof![patch(), json_value()]) {
        check_merge(&target, &patch, &merged(&target, &patch))?;
    }

    #[test]
    fn merging_a_patch_twice_equals_merging_it_once(target in json_value(), patch in json_value()) {
        let once = merged(&target, &patch);
        prop_assert_eq!(merged(&once, &patch), once);
    }

    #[test]
    fn null_members_of_a_patch_delete(target in json_value(), patch in patch()) {
        let result = merged(&target, &patch);
        let mut deleted = Vec::new();
        null_members(&patch, "", &mut deleted);
        for path in deleted {
            let (parent, key) = path.rsplit_once('/').unwrap();
            let parent = at(&result, parent).and_then(Value::as_object);
            prop_assert!(parent.is_some_and(|p| !p.contains_key(key)), "{path} in {result}");
        }
    }

    #[test]
    fn an_object_patch_never_leaves_a_null_member_of_its_own(
        target in json_value(),
        patch in patch(),
    ) {
        // Nulls may remain only where the target had them and the patch named nothing.
        let result = merged(&target, &patch);
        let mut nulls = Vec::new();
        null_members(&result, "", &mut nulls);
        for path in nulls {
            prop_assert_eq!(at(&target, &path), Some(&Value::Null), "{} in {}", path, result);
            let named = path
                .split('/')
                .skip(1)
                .scan(String::new(), |p, k| {
                    p.push('/');
                    p.push_str(k);
                    Some(p.clone())
                })
                .any(|prefix| at(&patch, &prefix).is_some_and(|v| !v.is_object()));
            prop_assert!(!named, "{path} replaced by the patch yet null in {result}");
        }
    }

    #[test]
    fn two_patches_are_one_where_rfc7386_can_say_so(
        doc in json_value(),
        a in patch(),
        b in patch(),
    ) {
        prop_assume!(composable(&a, &b));
        prop_assert_eq!(merged(&merged(&doc, &a), &b), merged(&doc, &compose(&a, &b)));
    }

    #[test]
    fn validate_doc_accepts_exactly_the_documents_within_limits(doc in any_doc()) {
        let verdict = validate_doc(&doc);
        prop_assert_eq!(verdict.is_ok(), within_limits(&doc), "{:?}", verdict);
    }

    #[test]
    fn the_version_rule(held in version(), incoming in version(), snapshot in any::<bool>()) {
        let decision = decide_desired(held, incoming, snapshot);
        let newer = incoming > held && incoming <= MAX_TWIN_VERSION;
        let want = if !newer {
            DesiredDecision::Ignore
        } else if snapshot || incoming == held + 1 {
            DesiredDecision::Apply
        } else {
            DesiredDecision::Resync
        };
        prop_assert_eq!(decision, want);
    }

    #[test]
    fn held_versions_only_grow_and_stay_in_range(
        updates in prop::collection::vec((version(), any::<bool>()), 0..32),
    ) {
        let mut held = 0;
        for (incoming, snapshot) in updates {
            if decide_desired(held, incoming, snapshot) == DesiredDecision::Apply {
                prop_assert!(incoming > held && incoming <= MAX_TWIN_VERSION);
                held = incoming;
            }
        }
    }
}

#[test]
fn two_patches_are_not_always_one() {
    // `a` sets `x` to a number; `b` merges an object into it. In sequence `x` becomes `b`'s
    // object whatever the document held, which no single merge patch expresses: it would
    // merge into the document's `x` (here keeping `w`).
    let (a, b) = (json!({"x": 1}), json!({"x": {"z": 2}}));
    let doc = json!({"x": {"w": 0}});
    assert_eq!(merged(&merged(&doc, &a), &b), json!({"x": {"z": 2}}));
    assert_eq!(merged(&doc, &b), json!({"x": {"w": 0, "z": 2}}));
    assert!(!composable(&a, &b));
    assert!(!composable(&json!({"x": null}), &b));
    assert!(composable(&json!({"x": {"y": 1}, "q": 1}), &b));
}
