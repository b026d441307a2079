//! Relaying a logged-in connection both ways while following the message
//! framing, so that a connection whose credentials were replaced is closed
//! between transactions, never under a running query.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Follows a stream of protocol messages (type byte, then a length that
/// counts itself) and reports each message's type and first body byte.
#[derive(Default)]
pub struct Framer {
    head: [u8; 5],
    have: usize,
    left: usize,
    first: Option<u8>,
    /// The stream stopped being PostgreSQL framing; nothing more is reported.
    lost: bool,
}

impl Framer {
    /// Reads `b`; `done(kind, first_body_byte)` for each message completed.
    pub fn feed(&mut self, mut b: &[u8], mut done: impl FnMut(u8, Option<u8>)) {
        while !self.lost && !b.is_empty() {
            if self.have < 5 {
                let n = (5 - self.have).min(b.len());
                self.head[self.have..self.have + n].copy_from_slice(&b[..n]);
                self.have += n;
                b = &b[n..];
                if self.have < 5 {
                    return;
                }
                let len = i32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                let Some(left) = usize::try_from(len).ok().and_then(|l| l.checked_sub(4)) else {
                    self.lost = true;
                    return;
                };
                self.left = left;
                self.first = None;
                if left == 0 {
                    self.have = 0;
                    done(self.head[0], None);
                }
                continue;
            }
            let n = self.left.min(b.len());
            if self.first.is_none() {
                self.first = b.first().copied();
            }
            self.left -= n;
            b = &b[n..];
            if self.left == 0 {
                self.have = 0;
                done(self.head[0], self.first);
            }
        }
    }

    /// Between messages (nothing half-read).
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.have == 0
    }

    pub fn lost(&self) -> bool {
        self.lost
    }
}

/// Whether a session is between transactions with nothing asked of the
/// server: every `Query`, `Sync` and `FunctionCall` the client sent has had
/// its `ReadyForQuery`, the last of which said idle (`I`, not in a
/// transaction block), and the client has sent nothing since.
#[derive(Default)]
pub struct Idle {
    /// Requests sent minus `ReadyForQuery` answers (one task updates it).
    outstanding: AtomicI64,
    /// The last `ReadyForQuery` said `I`.
    ready_idle: AtomicBool,
    /// The client sent messages after its last request, or half a message.
    client_pending: AtomicBool,
    /// Framing was lost in either direction: never idle.
    lost: AtomicBool,
    /// A chunk read from the client, or from the server, is being written
    /// on: the session is not idle until its bytes are all through (a
    /// message cut there would be lost to the swap).
    up_writing: AtomicBool,
    down_writing: AtomicBool,
}

impl Idle {
    /// A session past its login's `ReadyForQuery` (read by
    /// `upstream::until_ready`): idle until the client asks something.
    pub fn logged_in() -> Idle {
        let idle = Idle::default();
        idle.ready_idle.store(true, Ordering::Relaxed);
        idle
    }

    pub fn is_idle(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
            && self.outstanding.load(Ordering::Relaxed) <= 0
            && self.ready_idle.load(Ordering::Relaxed)
            && !self.client_pending.load(Ordering::Relaxed)
            && !self.up_writing.load(Ordering::Relaxed)
            && !self.down_writing.load(Ordering::Relaxed)
    }

    /// The flag `pump` holds while it writes, for each direction.
    pub fn writing(&self, up: bool) -> &AtomicBool {
        if up { &self.up_writing } else { &self.down_writing }
    }

    fn client(&self, framer: &mut Framer, b: &[u8]) {
        let mut pending = self.client_pending.load(Ordering::Relaxed);
        framer.feed(b, |kind, _| match kind {
            b'Q' | b'S' | b'F' => {
                self.outstanding.fetch_add(1, Ordering::Relaxed);
                pending = false;
            }
            _ => pending = true,
        });
        self.client_pending.store(pending || !framer.at_boundary(), Ordering::Relaxed);
        self.lost.fetch_or(framer.lost(), Ordering::Relaxed);
    }

    fn server(&self, framer: &mut Framer, b: &[u8]) {
        framer.feed(b, |kind, first| {
            if kind == b'Z' {
                // The login's own ReadyForQuery answers no request.
                let o = self.outstanding.load(Ordering::Relaxed);
                self.outstanding.store((o - 1).max(0), Ordering::Relaxed);
                self.ready_idle.store(first == Some(b'I'), Ordering::Relaxed);
            }
        });
        self.lost.fetch_or(framer.lost(), Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until `from` ends (false) or `seen`, told of each
/// chunk once written, says stop (true). `writing` is set while a chunk is
/// read but not all written: dropped then, the pump would lose it.
pub async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut seen: impl FnMut(&[u8]) -> bool,
    bytes: &std::sync::atomic::AtomicU64,
    writing: &AtomicBool,
) -> std::io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        writing.store(true, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
        writing.store(false, Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        if seen(&buf[..n]) {
            return Ok(true);
        }
    }
}

/// The client-to-server side's bookkeeping.
pub fn client_side<'a>(idle: &'a Idle) -> impl FnMut(&[u8]) -> bool + 'a {
    let mut framer = Framer::default();
    move |b| {
        idle.client(&mut framer, b);
        false
    }
}

/// The server-to-client side's: true (stop) when the session went idle
/// while `stop_at_idle` is set.
pub fn server_side<'a>(idle: &'a Idle, stop_at_idle: &'a AtomicBool) -> impl FnMut(&[u8]) -> bool + 'a {
    let mut framer = Framer::default();
    move |b| {
        idle.server(&mut framer, b);
        stop_at_idle.load(Ordering::Relaxed) && idle.is_idle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn messages_are_found_across_any_split() {
        let stream = [msg(b'T', b"abcdef"), msg(b'Z', b"I"), msg(b'X', b""), msg(b'Z', b"T")].concat();
        for chunk in 1..stream.len() {
            let mut f = Framer::default();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                f.feed(c, |k, first| got.push((k, first)));
            }
            assert_eq!(
                got,
                vec![(b'T', Some(b'a')), (b'Z', Some(b'I')), (b'X', None), (b'Z', Some(b'T'))],
                "chunks of {chunk}"
            );
            assert!(f.at_boundary());
        }
    }

    #[test]
    fn a_bad_length_loses_the_framing() {
        let mut f = Framer::default();
        f.feed(&[b'Q', 0, 0, 0, 2], |_, _| panic!("nothing completes"));
        assert!(f.lost() && !f.at_boundary());
    }

    #[test]
    fn idle_only_between_transactions_with_nothing_asked() {
        let idle = Idle::default();
        let (mut c, mut s) = (Framer::default(), Framer::default());
        assert!(!idle.is_idle(), "before the login's ReadyForQuery");
        idle.server(&mut s, &msg(b'Z', b"I"));
        assert!(idle.is_idle(), "after login");
        idle.client(&mut c, &msg(b'Q', b"SELECT 1\0"));
        assert!(!idle.is_idle(), "the login's ReadyForQuery answered no query");
        idle.server(&mut s, &msg(b'Z', b"I"));
        idle.client(&mut c, &msg(b'Q', b"BEGIN\0"));
        assert!(!idle.is_idle(), "a query is running");
        idle.server(&mut s, &msg(b'Z', b"T"));
        assert!(!idle.is_idle(), "inside a transaction block");
        idle.client(&mut c, &msg(b'Q', b"COMMIT\0")[..4]);
        assert!(!idle.is_idle(), "half a message sent");
        idle.client(&mut c, &msg(b'Q', b"COMMIT\0")[4..]);
        idle.server(&mut s, &msg(b'Z', b"I"));
        assert!(idle.is_idle(), "committed");
        // Extended protocol: Parse, Bind, Execute, then Sync.
        idle.client(
            &mut c,
            &[msg(b'P', b"\0SELECT 1\0\0\0"), msg(b'B', b"\0\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0")].concat(),
        );
        assert!(!idle.is_idle(), "messages without their Sync");
        idle.client(&mut c, &msg(b'S', b""));
        assert!(!idle.is_idle(), "Sync not answered");
        idle.server(&mut s, &msg(b'Z', b"I"));
        assert!(idle.is_idle());
        // Two pipelined queries: idle only after both answers.
        idle.client(&mut c, &[msg(b'Q', b"SELECT 1\0"), msg(b'Q', b"SELECT 2\0")].concat());
        idle.server(&mut s, &msg(b'Z', b"I"));
        assert!(!idle.is_idle(), "one of two answered");
        idle.server(&mut s, &msg(b'Z', b"I"));
        assert!(idle.is_idle());
        assert!(Idle::logged_in().is_idle(), "the login's ReadyForQuery read before relaying");
        // A chunk half written either way: not idle (the swap would cut it).
        for up in [true, false] {
            idle.writing(up).store(true, Ordering::Relaxed);
            assert!(!idle.is_idle());
            idle.writing(up).store(false, Ordering::Relaxed);
        }
        assert!(idle.is_idle());
    }
}
