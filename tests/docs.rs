//! Every complete config example in the docs passes `leasehold check`.

mod common;

use common::Agent;

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
