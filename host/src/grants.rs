//! Grants: the capabilities beyond the base API that the operator gives
//! which scripts. Config `grants:` maps script path patterns to
//! capabilities and their parameters:
//!
//! ```yaml
//! grants:
//!   sensors/*.lua: { http: ["api.example.com", "192.168.1.10:8080"] }
//!   "*":           { http: { hosts: ["time.example.org"], timeout_ms: 2000 } }
//! ```
//!
//! A script gets every grant whose pattern matches its path (`*` matches
//! any run of characters, `/` included); default: nothing. Grants are
//! node-local: each node decides what its own scripts may reach. What a
//! capability's parameters mean is the capability's business
//! (`capabilities::check_grant` validates them when the config is read).

use std::fmt;

use serde_json::{Map, Value};

use crate::pattern::Pattern;

#[derive(Clone, Debug, Default)]
pub struct Grants {
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    text: String,
    pattern: Pattern,
    caps: Map<String, Value>,
}

/// A malformed `grants:` section.
#[derive(Debug, thiserror::Error)]
#[error("grants: {0}")]
pub struct GrantsError(String);

impl Grants {
    /// Parse the `grants:` value (a map of path pattern → map of capability
    /// name → parameters). `check` validates each capability's parameters.
    pub fn parse(
        value: &Value,
        check: impl Fn(&str, &Value) -> Result<(), String>,
    ) -> Result<Self, GrantsError> {
        let rules = match value {
            Value::Null => return Ok(Grants::default()),
            Value::Object(rules) => rules,
            other => {
                return Err(GrantsError(format!(
                    "expected a map of script path patterns to capabilities, got {other}"
                )));
            }
        };
        let mut out = Vec::with_capacity(rules.len());
        for (text, caps) in rules {
            let Value::Object(caps) = caps else {
                return Err(GrantsError(format!(
                    "{text}: expected a map of capabilities (e.g. {{ http: [\"host\"] }}), got {caps}"
                )));
            };
            for (name, params) in caps {
                check(name, params).map_err(|e| GrantsError(format!("{text}: {name}: {e}")))?;
            }
            out.push(Rule {
                text: text.clone(),
                pattern: Pattern::new(text),
                caps: caps.clone(),
            });
        }
        Ok(Grants { rules: out })
    }

    /// The parameters of every rule granting `capability` to `script`
    /// (rules sorted by pattern); empty: not granted.
    pub fn params<'a>(&'a self, script: &str, capability: &str) -> Vec<&'a Value> {
        self.rules
            .iter()
            .filter(|r| r.pattern.matches(script))
            .filter_map(|r| r.caps.get(capability))
            .collect()
    }

    /// What `script` is granted, for `covey scripts`: one entry per
    /// matching rule and capability, e.g. `http ["api.example.com"]`.
    pub fn describe(&self, script: &str) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.pattern.matches(script))
            .flat_map(|r| {
                r.caps
                    .iter()
                    .map(|(name, params)| format!("{name} {params}"))
            })
            .collect()
    }
}

impl fmt::Display for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            let caps: Vec<&str> = r.caps.keys().map(String::as_str).collect();
            let sep = if i == 0 { "" } else { "; " };
            write!(f, "{sep}{}: {}", r.text, caps.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn only_http(name: &str, _: &Value) -> Result<(), String> {
        (name == "http")
            .then_some(())
            .ok_or_else(|| format!("unknown capability `{name}`"))
    }

    #[test]
    fn every_matching_rule_applies_and_nothing_else_is_granted() {
        let g = Grants::parse(
            &json!({
                "sensors/*.lua": { "http": ["a.example"] },
                "*": { "http": ["b.example"] },
                "other.lua": { "http": ["c.example"] },
            }),
            only_http,
        )
        .unwrap();
        let hosts = |s| g.params(s, "http");
        assert_eq!(
            hosts("sensors/t.lua"),
            [&json!(["b.example"]), &json!(["a.example"])]
        );
        assert_eq!(hosts("x.wasm"), [&json!(["b.example"])]);
        assert!(g.params("sensors/t.lua", "mqtt").is_empty());
        assert_eq!(
            g.describe("other.lua"),
            ["http [\"b.example\"]", "http [\"c.example\"]"]
        );
        assert!(Grants::default().params("x.lua", "http").is_empty());
    }

    #[test]
    fn malformed_grants_are_refused_with_where() {
        let err = |v| Grants::parse(&v, only_http).unwrap_err().to_string();
        assert!(err(json!(["x"])).contains("expected a map"));
        assert!(err(json!({ "a.lua": "http" })).contains("a.lua: expected a map"));
        assert!(err(json!({ "a.lua": { "shell": true } })).contains("a.lua: shell: unknown"));
    }
}
