//! Which pod holds a session, in the upstream `application_name`
//! (`proxy.attribution`).

use std::collections::BTreeMap;

/// The pod a session comes from, for the upstream `application_name`
/// (`attribution`): the downward API's `POD_NAMESPACE` and `POD_NAME`.
#[derive(Debug, Clone, Default)]
pub struct Pod {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Pod {
    pub fn from_env() -> Pod {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Pod { namespace: var("POD_NAMESPACE"), name: var("POD_NAME") }
    }

    /// The client's parameters as sent upstream: `application_name` gets
    /// ` [namespace/pod]` after the client's own (or `leasehold`), the
    /// client's part shortened so the whole fits the server's 63 bytes.
    pub fn attribute(&self, mut params: BTreeMap<String, String>) -> BTreeMap<String, String> {
        let tag = match (&self.namespace, &self.name) {
            (Some(ns), Some(pod)) => format!(" [{ns}/{pod}]"),
            (None, Some(pod)) => format!(" [{pod}]"),
            _ => return params,
        };
        let app = params.remove("application_name").filter(|a| !a.is_empty()).unwrap_or_else(|| "leasehold".into());
        let room = 63usize.saturating_sub(tag.len());
        let mut cut = app.len().min(room);
        while !app.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut name = format!("{}{tag}", &app[..cut]);
        while name.len() > 63 {
            name.pop();
        }
        params.insert("application_name".into(), name);
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_says_which_pod_within_63_bytes() {
        let pod = Pod { namespace: Some("shop".into()), name: Some("api-7d9f-x2x".into()) };
        let params = |app: Option<&str>| {
            let mut p = BTreeMap::from([("user".to_string(), "app".to_string())]);
            if let Some(a) = app {
                p.insert("application_name".into(), a.into());
            }
            p
        };
        let name = |p: BTreeMap<String, String>| p["application_name"].clone();
        assert_eq!(name(pod.attribute(params(Some("psql")))), "psql [shop/api-7d9f-x2x]");
        assert_eq!(name(pod.attribute(params(None))), "leasehold [shop/api-7d9f-x2x]");
        // A long (multibyte) name is cut, never the pod.
        let long = name(pod.attribute(params(Some(&"é".repeat(60)))));
        assert!(long.len() <= 63 && long.ends_with(" [shop/api-7d9f-x2x]"), "{long}");
        // Outside Kubernetes (no downward API): as the client sent it.
        assert_eq!(Pod::default().attribute(params(Some("psql"))), params(Some("psql")));
    }
}
