//! Loading the state file: whatever it holds, it is loaded or set aside
//! with a warning, and the times derived from its records never overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join("state.json"), data).is_err() {
        return;
    }
    let Ok((store, _warning)) = agent::state::StateStore::open(dir.path()) else { return };
    let state = store.snapshot();
    for t in &state.tokens {
        let _ = agent::state::time(t.granted_at) + agent::state::secs(t.ttl);
    }
    for s in state.secrets.values() {
        for r in s.current.iter().chain(&s.retired) {
            let _ = r.expires_at();
        }
    }
});
