//! Template rendering: the first line is a template, the rest the secret's
//! data (a JSON object). Errors, never panics; fuel bounds the work.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::time::{Duration, SystemTime};

use agent::render::{Context, Renderer};
use vault::secret::{LeaseId, SecretData};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (template, json) = text.split_once('\n').unwrap_or((text, "{}"));
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) else { return };
    // The template as a YAML literal, so any text gets through the config.
    let yaml = format!(
        "vault:\n  address: http://v:8200\nauth:\n  kubernetes:\n    role: r\nsecrets:\n  - name: s\n    path: p\n    files:\n      - path: /nonexistent/f\n        template: {}\n",
        serde_json::Value::String(template.to_string())
    );
    let path = Path::new("/nonexistent/leasehold.yaml");
    let Ok(config) = config::Config::parse(&yaml, path, &|_| None) else { return };
    let Ok(renderer) = Renderer::compile(&config, path) else { return };
    let data = SecretData::new(map);
    let lease = LeaseId::new("p/x".into());
    let ctx = Context {
        name: "s",
        data: &data,
        lease_id: &lease,
        lease_duration: Duration::from_secs(60),
        issued_at: SystemTime::UNIX_EPOCH,
        expires_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(60)),
        previous: Some(&data),
        proxy: None,
    };
    let _ = renderer.templates("s").render(&ctx);
});
