//! The proxy's SCRAM-SHA-256 client against any server-first and
//! server-final message (split at the first 0xFF byte): an error, never a
//! panic, and never more PBKDF2 work than the documented iteration cap.
//! The same bytes as a server certificate for `tls-server-end-point`
//! binding: an error or a hash, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgproxy::scram::{Binding, Scram};

fuzz_target!(|data: &[u8]| {
    let bound = pgproxy::binding::server_end_point(data);
    let (first, last) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let binding = match (data.first().map(|b| b % 3), bound) {
        (Some(0), Ok(hash)) => Binding::ServerEndPoint(hash),
        (Some(1), _) => Binding::ServerDoesNot,
        _ => Binding::No,
    };
    let mut scram = Scram::new("pencil", binding);
    let _ = scram.first();
    if scram.respond(first).is_ok() {
        let _ = scram.finish(last);
    }
});
