//! Request data with Vault's field typing: durations as integers, numeric
//! strings, Go durations or `<n>d`; lists as arrays or comma strings; unknown
//! keys remembered for the "ignored these unrecognized parameters" warning.

use serde_json::{Map, Value};

use crate::api::Failure;

pub struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    pub fn new(map: Map<String, Value>) -> Self {
        Fields { map }
    }

    /// Keys of the request that the endpoint does not know, sorted as Vault does.
    pub fn unknown(&self, known: &[&str]) -> Vec<String> {
        let mut keys: Vec<String> = self.map.keys().filter(|k| !known.contains(&k.as_str())).cloned().collect();
        keys.sort();
        keys
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn str(&self, key: &str) -> Result<String, Failure> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Bool(b)) => Ok(b.to_string()),
            Some(v) => Err(invalid(key, v, "expected a string")),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, Failure> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) => match s.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
                _ => Err(invalid(key, &Value::String(s.clone()), "invalid syntax")),
            },
            Some(Value::Number(n)) if n.as_i64() == Some(0) => Ok(false),
            Some(Value::Number(n)) if n.as_i64() == Some(1) => Ok(true),
            Some(v) => Err(invalid(key, v, "expected a bool")),
        }
    }

    /// Seconds; absent and null are 0 (`parseutil.ParseDurationSecond`).
    pub fn duration(&self, key: &str) -> Result<i64, Failure> {
        self.duration_opt(key).map(|d| d.unwrap_or(0))
    }

    pub fn duration_opt(&self, key: &str) -> Result<Option<i64>, Failure> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(0)),
            Some(v) => parse_duration(v).map(Some).map_err(|e| invalid(key, v, &e)),
        }
    }

    /// A list given as a JSON array of strings or as a comma-separated string.
    pub fn list(&self, key: &str) -> Result<Option<Vec<String>>, Failure> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(vec![])),
            Some(Value::String(s)) => {
                Ok(Some(s.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()))
            }
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => out.push(s.trim().to_string()),
                        Value::Number(n) => out.push(n.to_string()),
                        other => return Err(invalid(key, other, "expected a string in the list")),
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(invalid(key, v, "expected a list of strings")),
        }
    }

    /// Statements lists (`creation_statements` …): unlike comma lists, a plain
    /// string is one element, since SQL contains commas.
    pub fn statements(&self, key: &str) -> Result<Option<Vec<String>>, Failure> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(Some(if s.trim().is_empty() { vec![] } else { vec![s.clone()] })),
            _ => self.list(key),
        }
    }

    pub fn map_of_strings(&self, key: &str) -> Result<Option<Vec<(String, String)>>, Failure> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                    .collect(),
            )),
            Some(v) => Err(invalid(key, v, "expected a map")),
        }
    }
}

fn invalid(key: &str, _value: &Value, why: &str) -> Failure {
    Failure::resp(400, format!("Field validation failed: error converting input for field \"{key}\": {why}"))
}

/// `ParseDurationSecond`: integer seconds, numeric string, `<n>d`, or a Go
/// duration string such as `1h30m` or `1.5h`.
pub fn parse_duration(v: &Value) -> Result<i64, String> {
    match v {
        Value::Null => Ok(0),
        Value::Number(n) => {
            let secs = n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)).ok_or("invalid duration")?;
            if secs < 0 {
                return Err(format!("cannot provide negative value '{n}'"));
            }
            Ok(secs)
        }
        Value::String(s) => parse_duration_str(s),
        _ => Err("invalid duration".to_string()),
    }
}

pub fn parse_duration_str(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    if let Some(days) = s.strip_suffix('d')
        && let Ok(n) = days.parse::<i64>()
    {
        return Ok(n * 86400);
    }
    go_duration(s).ok_or_else(|| format!("time: invalid duration \"{s}\""))
}

fn go_duration(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest.is_empty() {
        return None;
    }
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total_ns += value * scale;
    }
    let secs = (total_ns / 1e9).trunc() as i64;
    Some(if neg { -secs } else { secs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_in_all_vault_forms() {
        assert_eq!(parse_duration(&json!(90)).unwrap(), 90);
        assert_eq!(parse_duration(&json!("90")).unwrap(), 90);
        assert_eq!(parse_duration(&json!("1h30m")).unwrap(), 5400);
        assert_eq!(parse_duration(&json!("1.5h")).unwrap(), 5400);
        assert_eq!(parse_duration(&json!("2d")).unwrap(), 172800);
        assert_eq!(parse_duration(&json!(null)).unwrap(), 0);
        assert!(parse_duration(&json!("soon")).is_err());
        assert!(parse_duration(&json!([1])).is_err());
    }

    #[test]
    fn lists_from_strings_and_arrays() {
        let f = Fields::new(json!({"a": "x, y", "b": ["p"], "c": 3}).as_object().unwrap().clone());
        assert_eq!(f.list("a").unwrap().unwrap(), vec!["x", "y"]);
        assert_eq!(f.list("b").unwrap().unwrap(), vec!["p"]);
        let err = f.list("c").unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.errors[0].starts_with("Field validation failed"));
    }
}
