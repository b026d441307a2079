//! Every complete config example in the docs passes `leasehold check`.

use crate::support::Agent;

fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```yaml") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks.into_iter().filter(|b| b.contains("secrets:") && b.contains("vault:")).collect()
}

#[tokio::test]
async fn config_examples_in_the_docs_pass_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for doc in ["README.md", "docs/config.md"] {
        let text = std::fs::read_to_string(format!("{root}/{doc}")).unwrap();
        for (i, block) in yaml_blocks(&text).into_iter().enumerate() {
            let path = dir.path().join(format!("example-{checked}.yaml"));
            std::fs::write(&path, &block).unwrap();
            let mut check = Agent::spawn(&["check", "-c", &path.display().to_string()], dir.path()).await;
            let code = check.wait(std::time::Duration::from_secs(10)).await;
            assert_eq!(code, 0, "{doc} example {i} fails check:\n{}\n{block}", check.output());
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} examples");
}

/// docs/reliability.md's table names tests that exist, and names every
/// scenario of the fault matrix.
#[test]
fn the_reliability_table_names_real_tests_and_every_matrix_scenario() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/docs/reliability.md")).unwrap();
    let source = |module: &str| -> String {
        let mut candidates = vec![format!("{root}/tests/it/{module}.rs")];
        for krate in ["config", "vault", "pgproxy", "injector", "agent"] {
            candidates.push(format!("{root}/crates/{krate}/src/{module}.rs"));
            candidates.push(format!("{root}/crates/{krate}/src/{module}/mod.rs"));
            candidates.push(format!("{root}/crates/{krate}/tests/{module}.rs"));
        }
        candidates.push(format!("{root}/crates/agent/src/lease/{module}.rs"));
        candidates.push(format!("{root}/crates/{module}/src/lib.rs"));
        candidates.iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect()
    };
    let mut named = 0;
    let rows: String = doc.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>().join("\n");
    for cite in rows.split('`').filter(|s| s.contains("::") && !s.contains(' ')) {
        let (module, test) = cite.rsplit_once("::").unwrap();
        let module = module.rsplit("::").next().unwrap();
        if test.contains('…') || !test.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            continue;
        }
        let text = source(module);
        assert!(!text.is_empty(), "docs/reliability.md names {cite}: no such test file or module");
        assert!(text.contains(&format!("fn {test}(")), "docs/reliability.md names {cite}, which does not exist");
        named += 1;
    }
    assert!(named >= 40, "{named} tests named");
    let matrix = std::fs::read_to_string(format!("{root}/tests/it/matrix.rs")).unwrap();
    let mut lines = matrix.lines();
    let mut scenarios = 0;
    while let Some(line) = lines.next() {
        if line.starts_with("#[tokio::test") {
            let name = lines.next().unwrap().trim_start_matches("async fn ").split('(').next().unwrap().to_string();
            assert!(doc.contains(&format!("matrix::{name}`")), "docs/reliability.md lacks matrix::{name}");
            scenarios += 1;
        }
    }
    assert!(scenarios >= 20, "{scenarios} scenarios");
}
