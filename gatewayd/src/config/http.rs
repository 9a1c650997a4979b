//! The HTTP half of an action compiled once: path, query, header and body templates parsed,
//! so a call renders values into ready templates and can never fail on configuration.

use super::ActionConfig;
use crate::template::{Escape, Template};
use serde_json::{Map, Value};
use std::sync::{Arc, OnceLock};

/// A compiled HTTP action.
#[derive(Debug)]
pub struct HttpAction {
    pub path: Template,
    pub query: Vec<(String, Template)>,
    pub headers: Vec<(String, Template)>,
    pub body: Option<JsonTemplate>,
}

/// A JSON body template: a string that is exactly one placeholder becomes the value itself
/// (type kept; left out of an object when absent), `{{params}}` the whole params object, other
/// strings are rendered as text.
#[derive(Debug)]
pub enum JsonTemplate {
    Var(String),
    Text(Template),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
    Literal(Value),
}

impl JsonTemplate {
    /// Compiles a JSON value whose strings are templates.
    pub fn compile(v: &Value) -> Result<JsonTemplate, String> {
        Ok(match v {
            Value::String(s) => {
                let t = Template::parse(s).map_err(|e| e.to_string())?;
                match t.single_var() {
                    Some(name) => JsonTemplate::Var(name.to_string()),
                    None => JsonTemplate::Text(t),
                }
            }
            Value::Array(items) => JsonTemplate::Array(
                items
                    .iter()
                    .map(JsonTemplate::compile)
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => JsonTemplate::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), JsonTemplate::compile(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => JsonTemplate::Literal(other.clone()),
        })
    }

    /// The rendered value; `None` for a placeholder whose value is absent.
    pub fn render(&self, vars: &Map<String, Value>) -> Option<Value> {
        match self {
            JsonTemplate::Var(name) => vars.get(name).filter(|v| !v.is_null()).cloned(),
            JsonTemplate::Text(t) => Some(Value::String(t.render(vars, Escape::None))),
            JsonTemplate::Array(items) => Some(Value::Array(
                items
                    .iter()
                    .map(|t| t.render(vars).unwrap_or(Value::Null))
                    .collect(),
            )),
            JsonTemplate::Object(fields) => Some(Value::Object(
                fields
                    .iter()
                    .filter_map(|(k, t)| t.render(vars).map(|v| (k.clone(), v)))
                    .collect(),
            )),
            JsonTemplate::Literal(v) => Some(v.clone()),
        }
    }
}

/// The HTTP half of an action, compiled once and kept with it: at validation, or at the
/// first call of an action that was never validated.
#[derive(Clone, Default)]
pub struct CompiledHttp(OnceLock<Result<Arc<HttpAction>, String>>);

impl CompiledHttp {
    /// The compiled HTTP half of `action` (whose slot this is), or what is wrong with it.
    pub fn get(&self, action: &ActionConfig) -> Result<Arc<HttpAction>, String> {
        self.0.get_or_init(|| compile(action).map(Arc::new)).clone()
    }
}

impl std::fmt::Debug for CompiledHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.get() {
            None => "CompiledHttp(not yet)",
            Some(Ok(_)) => "CompiledHttp(ok)",
            Some(Err(_)) => "CompiledHttp(invalid)",
        })
    }
}

fn compile(a: &ActionConfig) -> Result<HttpAction, String> {
    let parse =
        |field: &str, text: &str| Template::parse(text).map_err(|e| format!("{field}: {e}"));
    let path = parse("path", a.path.as_deref().ok_or("the action has no path")?)?;
    let query = a
        .query
        .iter()
        .map(|(k, v)| Ok((k.clone(), parse(&format!("query.{k}"), v)?)))
        .collect::<Result<_, String>>()?;
    let headers = a
        .headers
        .iter()
        .map(|(k, v)| Ok((k.clone(), parse(&format!("headers.{k}"), v)?)))
        .collect::<Result<_, String>>()?;
    let body = a
        .body
        .as_ref()
        .map(JsonTemplate::compile)
        .transpose()
        .map_err(|e| format!("body: {e}"))?;
    Ok(HttpAction {
        path,
        query,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_body_template_keeps_types_and_leaves_out_absent_values() {
        let t = JsonTemplate::compile(
            &json!({"x": "{{x}}", "tag": "t-{{x}}", "n": 3, "opt": "{{opt}}"}),
        )
        .unwrap();
        let vars = json!({"x": 1.5}).as_object().unwrap().clone();
        assert_eq!(
            t.render(&vars),
            Some(json!({"x": 1.5, "tag": "t-1.5", "n": 3}))
        );
    }

    #[test]
    fn an_action_compiles_once_and_reports_what_is_wrong() {
        let a: ActionConfig =
            serde_json::from_value(json!({"path": "/api/{{k}}", "query": {"q": "{{q"}})).unwrap();
        let err = a.compiled_http.get(&a).unwrap_err();
        assert!(err.contains("query.q"), "{err}");
        let a: ActionConfig = serde_json::from_value(json!({"path": "/api/{{k}}"})).unwrap();
        let first = a.compiled_http.get(&a).unwrap();
        let again = a.compiled_http.get(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
    }
}
