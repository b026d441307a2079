//! Every decoder of Vault's answers (login, token renewal, secret read,
//! lease renewal, lookups) and the lease times derived from them, over any
//! body: an error, never a panic or an overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let at = agent::clock::now();
    for ttl in vault::decode_every_answer(data).into_iter().flatten() {
        let _ = agent::lease::schedule::LeaseTimes::issued(at, ttl, true).safe_end();
    }
});
