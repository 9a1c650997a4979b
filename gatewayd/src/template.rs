//! `{{name}}` templates for paths, queries, headers and JSON bodies. Pure: parsing happens at
//! config load (so a bad template is a config error), rendering takes the values in.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};

/// Characters left as they are in a path segment or query value.
const SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed '{{{{' in template")]
    Unclosed,
    #[error("empty or invalid placeholder '{{{{{0}}}}}'")]
    BadName(String),
}

/// How substituted values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// Percent-encode (paths and query values), so a value can never add a path segment.
    Url,
    /// As is, except that CR and LF become spaces (JSON body text, serial lines).
    None,
    /// Header values: every ASCII control character (CR, LF, NUL, DEL, ...) becomes a space,
    /// so a value can neither start a new header line nor make the request unbuildable.
    Header,
}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(TemplateError::Unclosed)?;
            let name = after[..end].trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(TemplateError::BadName(name.to_string()));
            }
            parts.push(Part::Var(name.to_string()));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Placeholder names, in order.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The name when the template is exactly one placeholder.
    pub fn single_var(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Var(v)] => Some(v),
            _ => None,
        }
    }

    /// Renders with `vars`; absent or null values render as empty text.
    pub fn render(&self, vars: &Map<String, Value>, escape: Escape) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => {
                    let text = lookup(vars, name).map(scalar_text).unwrap_or_default();
                    match escape {
                        Escape::Url => out.extend(utf8_percent_encode(&text, SAFE)),
                        Escape::None => out.push_str(&text.replace(['\r', '\n'], " ")),
                        Escape::Header => {
                            out.extend(text.chars().map(
                                |c| {
                                    if c.is_ascii_control() {
                                        ' '
                                    } else {
                                        c
                                    }
                                },
                            ))
                        }
                    }
                }
            }
        }
        out
    }
}

fn lookup<'a>(vars: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    vars.get(name).filter(|v| !v.is_null())
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parses_and_lists_vars() {
        let t = Template::parse("/api/{{kind}}/x/{{ id }}").unwrap();
        assert_eq!(t.vars().collect::<Vec<_>>(), vec!["kind", "id"]);
        assert_eq!(Template::parse("/a/{{b"), Err(TemplateError::Unclosed));
        assert_eq!(
            Template::parse("{{}}"),
            Err(TemplateError::BadName(String::new()))
        );
        assert_eq!(
            Template::parse("{{a b}}"),
            Err(TemplateError::BadName("a b".into()))
        );
    }

    #[test]
    fn url_escaping_keeps_values_inside_their_segment() {
        let t = Template::parse("/api/config/{{key}}").unwrap();
        let out = t.render(&vars(json!({"key": "../../admin?x=1"})), Escape::Url);
        assert_eq!(out, "/api/config/..%2F..%2Fadmin%3Fx%3D1");
    }

    #[test]
    fn scalars_render_as_text_and_absent_as_empty() {
        let t = Template::parse("v={{n}};b={{b}};s={{s}};m={{missing}}").unwrap();
        let out = t.render(
            &vars(json!({"n": 2.5, "b": true, "s": "x y"})),
            Escape::None,
        );
        assert_eq!(out, "v=2.5;b=true;s=x y;m=");
    }

    #[test]
    fn header_values_cannot_inject_lines() {
        let t = Template::parse("{{v}}").unwrap();
        assert_eq!(
            t.render(&vars(json!({"v": "a\r\nX-Evil: 1"})), Escape::None),
            "a  X-Evil: 1"
        );
    }

    #[test]
    fn header_escaping_removes_every_control_character() {
        let t = Template::parse("x-{{v}}").unwrap();
        let out = t.render(
            &vars(json!({"v": "a\r\nb\u{0}c\td\u{7f}é"})),
            Escape::Header,
        );
        assert_eq!(out, "x-a  b c d é");
        assert!(reqwest::header::HeaderValue::try_from(out).is_ok());
    }
}
