//! The proxy's SCRAM-SHA-256 client against any server-first and
//! server-final message (split at the first 0xFF byte): an error, never a
//! panic, and never more PBKDF2 work than the documented iteration cap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (first, last) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut scram = pgproxy::scram::Scram::new("pencil");
    let _ = scram.first();
    if scram.respond(first).is_ok() {
        let _ = scram.finish(last);
    }
});
