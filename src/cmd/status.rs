//! `leasehold status`: a running agent's `/v1/status` as a table.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// `/v1/status` of an agent given as `http://HOST:PORT[/…]`, `HOST:PORT`,
/// `:PORT` or `PORT` (the last two on the loopback).
pub fn status_url(given: &str) -> Result<String, String> {
    let g = given.trim();
    if g.starts_with("https://") {
        return Err(format!("{given:?}: the agent's telemetry is plain HTTP (telemetry.listen): use http://"));
    }
    let rest = g.strip_prefix("http://").unwrap_or(g);
    let host_port = rest.split('/').next().unwrap_or_default();
    let host_port = match host_port {
        p if p.parse::<u16>().is_ok() => format!("127.0.0.1:{p}"),
        p if p.starts_with(':') && p[1..].parse::<u16>().is_ok() => format!("127.0.0.1{p}"),
        p => p.to_string(),
    };
    let port_ok = host_port.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !port_ok {
        return Err(format!("{given:?} is not an agent's address (http://HOST:PORT, HOST:PORT or :PORT)"));
    }
    Ok(format!("http://{host_port}/v1/status"))
}

/// Exit 0 when every secret is ready, 1 when not (or the agent cannot be
/// reached), 2 for an address that is not one.
pub fn main(addr: &str) -> ExitCode {
    let url = match status_url(addr) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("leasehold status: {e}");
            return ExitCode::from(2);
        }
    };
    let fetched =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string()).and_then(|rt| {
            rt.block_on(async {
                let builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
                let client = vault::without_unused_roots(builder, &url).build().map_err(|e| e.to_string())?;
                let resp = client.get(&url).send().await.map_err(|e| {
                    format!("cannot reach {url}: {e} (is the agent running, and is this its telemetry.listen? In a cluster: kubectl port-forward POD 9102)")
                })?;
                resp.json::<Value>().await.map_err(|e| format!("{url} did not answer with status JSON: {e}"))
            })
        });
    match fetched {
        Ok(status) => {
            print!("{}", table(&status));
            let secrets = status["secrets"].as_array().map(Vec::as_slice).unwrap_or_default();
            let waiting: Vec<String> = secrets
                .iter()
                .filter(|s| s["ready"] != true)
                .map(|s| format!("{}: {}", cell(&s["name"]), cell(&s["reason"])))
                .collect();
            // The agent's own verdict when it gives one (it also counts an
            // agent with no secret yet as not ready).
            let ready = status["ready"].as_bool().unwrap_or(waiting.is_empty());
            if ready {
                ExitCode::SUCCESS
            } else {
                let why = if waiting.is_empty() { "no secret rendered yet".to_string() } else { waiting.join("; ") };
                eprintln!("leasehold status: not ready: {why}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("leasehold status: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One row per secret, columns padded to their widest cell.
pub fn table(status: &Value) -> String {
    let header = ["SECRET", "READY", "LEASE", "TTL", "EXPIRES", "RENEWALS", "ISSUES", "LAST ERROR"];
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for s in status["secrets"].as_array().into_iter().flatten() {
        rows.push(vec![
            cell(&s["name"]),
            if s["ready"] == true { "yes".into() } else { "no".into() },
            cell(&s["lease"]),
            format!("{}s", cell(&s["ttl_secs"])),
            cell(&s["expires_at"]),
            cell(&s["renewals"]),
            cell(&s["issues"]),
            cell(&s["last_error"]),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let token = &status["token"];
    out.push_str(&format!("token accessor {} expires {}\n", cell(&token["accessor"]), cell(&token["expires_at"])));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn addresses_as_users_type_them() {
        for (given, url) in [
            ("http://127.0.0.1:9102", "http://127.0.0.1:9102/v1/status"),
            ("http://10.0.0.5:9102/v1/status", "http://10.0.0.5:9102/v1/status"),
            ("localhost:9102", "http://localhost:9102/v1/status"),
            (":9102", "http://127.0.0.1:9102/v1/status"),
            ("9102", "http://127.0.0.1:9102/v1/status"),
        ] {
            assert_eq!(super::status_url(given).as_deref(), Ok(url), "{given}");
        }
        assert!(super::status_url("https://x:1").unwrap_err().contains("plain HTTP"));
        assert!(super::status_url("localhost").is_err());
    }

    #[test]
    fn one_row_per_secret() {
        let status = json!({"secrets": [
            {"name": "db", "ready": true, "lease": "database/creds/app/AbCd…", "ttl_secs": 60, "expires_at": "2026-11-27T14:00:00Z", "renewals": 2, "issues": 1, "last_error": null},
            {"name": "kv", "ready": false, "lease": null, "ttl_secs": 0, "expires_at": null, "renewals": 0, "issues": 0, "last_error": "issue: timed out"}
        ], "token": {"accessor": "abc", "expires_at": null}});
        let t = super::table(&status);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("db ") && lines[1].contains("yes"));
        assert!(lines[2].contains("issue: timed out"));
    }
}
