//! Properties of template parsing and rendering: no text makes the parser panic, and no value
//! leaves the place its escaping gives it (a URL path segment, a header value, a line).

use crate::config::action::ActionConfig;
use crate::config::DeviceConfig;
use crate::device::http::{client, probe_client, HttpDriver};
use crate::device::CallError;
use crate::template::{Escape, Template};
use gatewayd_protocol::DeviceId;
use percent_encoding::percent_decode_str;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

/// Values as params carry them: text of any kind (with path, query and line syntax often),
/// numbers, booleans, null, and nested JSON (rendered as its JSON text).
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[./?#%\\\\@:;&= a-z\\r\\n\\t\\x00\\x7f\\u{85}é]{0,8}".prop_map(Value::from),
        2 => any::<String>().prop_map(Value::from),
        1 => prop_oneof![Just("."), Just(".."), Just("%2e"), Just(".%2E"), Just("")]
            .prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!({"a": "/x?y#z", "b": [1, "\r\n"]})),
    ]
}

/// The text a value renders from (before escaping).
fn text_of(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn vars(pairs: &[(&str, &Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).clone()))
        .collect()
}

/// One driver under `http://10.0.0.5:8080/base/`, built once.
fn driver() -> &'static HttpDriver {
    static DRIVER: OnceLock<HttpDriver> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let dc: DeviceConfig = serde_json::from_value(
            json!({"kind": "http", "base_url": "http://10.0.0.5:8080/base/"}),
        )
        .unwrap();
        HttpDriver::new(
            client().unwrap(),
            probe_client().unwrap(),
            DeviceId::new("d").unwrap(),
            &dc,
        )
        .unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parsing_any_text_never_panics(text in prop_oneof![
        any::<String>(),
        "[{} a_\\-é.]{0,24}",
    ]) {
        if let Ok(t) = Template::parse(&text) {
            for var in t.vars() {
                prop_assert!(
                    !var.is_empty()
                        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                    "{var:?} from {text:?}"
                );
            }
            if !text.contains("{{") {
                prop_assert_eq!(t.render(&Map::new(), Escape::Url), text);
            }
        }
    }

    #[test]
    fn a_url_escaped_value_stays_inside_its_segment(v in value()) {
        let out = Template::parse("{{v}}").unwrap().render(&vars(&[("v", &v)]), Escape::Url);
        prop_assert!(!out.contains(['/', '?', '#', '\\']), "{out:?}");
        prop_assert!(out.bytes().all(|b| b.is_ascii_graphic()), "{out:?}");
        // Nothing is lost or added: the segment decodes to the value's text.
        prop_assert_eq!(percent_decode_str(&out).decode_utf8().unwrap(), text_of(&v));
        // A dot segment only from a value that is one; `%2e` stays escaped (`%252e`).
        let text = text_of(&v);
        prop_assert_eq!(out == "." || out == "..", text == "." || text == "..");
    }

    #[test]
    fn a_url_keeps_its_host_and_shape_whatever_the_values(
        a in value(),
        b in value(),
        q in value(),
    ) {
        let action: ActionConfig = serde_json::from_value(json!({
            "path": "/api/{{a}}/{{b}}.json",
            "query": {"q": "{{q}}", "fixed": "1"}
        }))
        .unwrap();
        let (ta, tb) = (text_of(&a), text_of(&b));
        match driver().url(&action, &vars(&[("a", &a), ("b", &b), ("q", &q)])) {
            Err(CallError::Refused(_)) => {
                // Only a whole `.` or `..` segment is refused; `{{b}}.json` never is one.
                prop_assert!(ta == "." || ta == "..", "{ta:?} {tb:?}");
            }
            Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
            Ok(url) => {
                prop_assert!(ta != "." && ta != "..");
                prop_assert_eq!(url.scheme(), "http");
                prop_assert_eq!(url.host_str(), Some("10.0.0.5"));
                prop_assert_eq!(url.port(), Some(8080));
                prop_assert_eq!(url.fragment(), None);
                let segments: Vec<String> = url
                    .path_segments()
                    .unwrap()
                    .map(|s| percent_decode_str(s).decode_utf8().unwrap().into_owned())
                    .collect();
                prop_assert_eq!(segments, vec!["base".into(), "api".into(), ta, format!("{tb}.json")]);
                let mut pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
                pairs.sort();
                let mut want = vec![("fixed".to_string(), "1".to_string())];
                if !q.is_null() {
                    want.push(("q".into(), text_of(&q).replace(['\r', '\n'], " ")));
                }
                want.sort();
                prop_assert_eq!(pairs, want);
            }
        }
    }

    #[test]
    fn a_header_value_has_no_control_character(v in value()) {
        let out = Template::parse("x-{{v}}").unwrap().render(&vars(&[("v", &v)]), Escape::Header);
        prop_assert!(!out.chars().any(|c| c.is_ascii_control()), "{out:?}");
        prop_assert_eq!(out.chars().count(), 2 + text_of(&v).chars().count());
        prop_assert!(reqwest::header::HeaderValue::try_from(out.as_str()).is_ok(), "{out:?}");
    }

    #[test]
    fn an_unescaped_value_never_breaks_the_line(v in value()) {
        let out = Template::parse("a {{v}} b").unwrap().render(&vars(&[("v", &v)]), Escape::None);
        prop_assert!(!out.contains(['\r', '\n']), "{out:?}");
    }
}
