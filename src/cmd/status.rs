//! `leasehold status`: a running agent's `/v1/status` as a table.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

pub fn main(addr: &str) -> ExitCode {
    let url = format!("http://{addr}/v1/status");
    let fetched =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string()).and_then(|rt| {
            rt.block_on(async {
                let builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
                let client = vault::without_unused_roots(builder, &url).build().map_err(|e| e.to_string())?;
                let resp = client.get(&url).send().await.map_err(|e| format!("cannot reach {url}: {e}"))?;
                resp.json::<Value>().await.map_err(|e| format!("{url} did not answer with status JSON: {e}"))
            })
        });
    match fetched {
        Ok(status) => {
            print!("{}", table(&status));
            ExitCode::SUCCESS
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
