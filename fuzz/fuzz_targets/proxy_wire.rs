//! The proxy's reading of a client: the startup packet (SSL and GSS
//! requests, cancel requests, protocol versions, parameters) and the
//! message framing after it, over any bytes: an error, never a panic, an
//! allocation the length field asks for without the bytes behind it, or a
//! hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else { return };
    rt.block_on(async {
        let mut client = tokio::io::join(std::io::Cursor::new(data.to_vec()), tokio::io::sink());
        if pgproxy::wire::read_startup(&mut client).await.is_err() {
            return;
        }
        while pgproxy::wire::read_message(&mut client).await.is_ok() {}
    });
});
