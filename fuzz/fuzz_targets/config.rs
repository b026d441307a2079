//! The config parser and the template compiler over any text: an error
//! naming the key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/nonexistent/leasehold.yaml");
    if let Ok(config) = config::Config::parse(text, path, &|_| None) {
        let _ = agent::render::Renderer::compile(&config, path);
    }
});
