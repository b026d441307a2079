//! Proxy mode in front of the real OpenBao: answers are OpenBao's, faults
//! and the request log are devvault's, `sys/devvault/` stays local.

use devvault::DevVault;
use devvault::testing::{Api, OpenBao};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_openbao_with_faults_and_the_request_log() {
    let bao = tokio::task::spawn_blocking(OpenBao::start).await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    let proxy = DevVault::start_proxy("127.0.0.1:0".parse().unwrap(), &bao.root_token, &bao.url()).await.unwrap();
    let api = Api::new(&proxy.url(), Some(&bao.root_token));

    // OpenBao answers, with its own version and error texts.
    let health = api.ok("GET", "sys/health", None).await;
    assert_eq!(health["version"], "2.7.2");
    let (status, body) = api.call("PUT", "sys/policies/acl/empty", Some(json!({"policy": ""}))).await;
    assert_eq!((status, body["errors"][0].as_str().unwrap()), (400, "'policy' parameter not supplied or empty"));
    // A body and a query reach it intact.
    api.ok("POST", "sys/mounts/kv", Some(json!({"type": "kv", "options": {"version": "2"}}))).await;
    api.ok("PUT", "kv/data/a", Some(json!({"data": {"x": "1"}}))).await;
    let read = api.ok("GET", "kv/data/a?version=1", None).await;
    assert_eq!(read["data"]["data"]["x"], "1");

    // A fault answers instead of OpenBao, once; then OpenBao again.
    let fault = json!({"path_prefix": "kv/data/a", "method": "GET", "status": 503, "errors": ["injected"], "count": 1});
    api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    let (status, body) = api.call("GET", "kv/data/a", None).await;
    assert_eq!((status, body), (503, json!({"errors": ["injected"]})));
    assert_eq!(api.call("GET", "kv/data/a", None).await.0, 200);

    // The request log has every request with OpenBao's statuses; the audit
    // log shows that the faulted one never reached OpenBao.
    let log = api.requests().await;
    let reads: Vec<u64> = log
        .iter()
        .filter(|e| e["path"] == "kv/data/a" && e["method"] == "GET")
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(reads, [200, 503, 200]);
    assert!(log.iter().any(|e| e["path"] == "sys/policies/acl/empty" && e["status"] == 400));
    let reached = bao.responses("kv/data/a").iter().filter(|e| e.operation == "read").count();
    assert_eq!(reached, 2);
    // `sys/devvault/` needs the root token, also in proxy mode.
    assert_eq!(api.with_token("nope").call("GET", "sys/devvault/requests", None).await.0, 403);

    // An upstream that is gone is a 502 with a Vault error body.
    // (The watchdog kills it once its stdin closes: wait for that.)
    drop(bao);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = api.call("GET", "sys/health", None).await;
        if status != 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(status, 502);
    assert!(body["errors"][0].as_str().unwrap().contains("upstream"), "{body}");
}
