//! Which of the upstream's authentication requests the proxy answers, and
//! how: a pure function of the settings and of what the server asked. The
//! rule (#23): the password, or its md5 hash, goes only to a server whose
//! certificate was verified; where it was not, the server must show it is
//! the database by SCRAM with channel binding, which a man in the middle
//! cannot complete.

use config::{ChannelBinding, UpstreamTls};

/// What the settings allow.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub tls: UpstreamTls,
    pub binding: ChannelBinding,
    pub allow_plain_password: bool,
}

/// An authentication request of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `AuthenticationOk`.
    Ok,
    Cleartext,
    Md5,
    /// `AuthenticationSASL`, with whether SCRAM-SHA-256 and
    /// SCRAM-SHA-256-PLUS are among its mechanisms.
    Sasl {
        scram: bool,
        plus: bool,
    },
}

/// How far SCRAM got on this login.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Progress {
    #[default]
    None,
    /// Started, the server's proof not yet checked.
    Started,
    /// The server proved it knows the password; `bound`: over this very
    /// TLS session.
    Proved { bound: bool },
}

/// The GS2 channel-binding flag of SCRAM (RFC 5802 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gs2 {
    /// `n`: the client does not bind.
    No,
    /// `y`: the client could bind but the server did not offer it: a server
    /// that does offer it (the offer stripped on the way) then refuses.
    ServerDoesNot,
    /// `p=tls-server-end-point`: SCRAM-SHA-256-PLUS.
    Bound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Logged in.
    Accept,
    SendCleartext,
    SendMd5,
    Scram(Gs2),
    /// Refused, with why (for the client's error and the log).
    Refuse(String),
}

/// The answer to `request`, given how far SCRAM got.
pub fn answer(p: Policy, progress: Progress, request: Request) -> Answer {
    let tls = p.tls != UpstreamTls::Disable;
    let require = p.binding == ChannelBinding::Require;
    match request {
        Request::Ok => match progress {
            Progress::Started => {
                Answer::Refuse("SCRAM: the server said ok without proving it knows the password".into())
            }
            Progress::Proved { bound: false } | Progress::None if require => Answer::Refuse(
                "the server let the proxy in without channel binding, and channel_binding is require".into(),
            ),
            _ => Answer::Accept,
        },
        Request::Cleartext | Request::Md5 => {
            let what = if request == Request::Md5 { "an md5" } else { "a cleartext" };
            if require {
                Answer::Refuse(format!(
                    "the server asks for {what} password and channel_binding is require (only SCRAM-SHA-256-PLUS); the password was not sent"
                ))
            } else if p.tls == UpstreamTls::VerifyFull || p.allow_plain_password {
                if request == Request::Md5 { Answer::SendMd5 } else { Answer::SendCleartext }
            } else {
                Answer::Refuse(format!(
                    "the server asks for {what} password, and its certificate is not verified: the password was not sent (use upstream_tls: verify-full, or allow_plain_password)"
                ))
            }
        }
        Request::Sasl { plus, scram } => {
            if tls && plus && p.binding != ChannelBinding::Disable {
                Answer::Scram(Gs2::Bound)
            } else if require {
                Answer::Refuse(
                    "the server does not offer SCRAM-SHA-256-PLUS, and channel_binding is require (is TLS ended by something in between?)".into(),
                )
            } else if scram {
                Answer::Scram(if tls && p.binding == ChannelBinding::Prefer { Gs2::ServerDoesNot } else { Gs2::No })
            } else {
                Answer::Refuse("the server offers no SCRAM-SHA-256".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChannelBinding as B;
    use UpstreamTls as T;

    fn p(tls: T, binding: B, allow_plain_password: bool) -> Policy {
        Policy { tls, binding, allow_plain_password }
    }

    const BOTH: Request = Request::Sasl { scram: true, plus: true };
    const PLAIN_SCRAM: Request = Request::Sasl { scram: true, plus: false };

    #[test]
    fn the_default_sends_nothing_but_bound_scram() {
        let d = p(T::Require, B::Require, false);
        assert_eq!(answer(d, Progress::None, BOTH), Answer::Scram(Gs2::Bound));
        for r in [Request::Cleartext, Request::Md5, PLAIN_SCRAM, Request::Ok] {
            assert!(matches!(answer(d, Progress::None, r), Answer::Refuse(_)), "{r:?}");
        }
        assert!(matches!(answer(d, Progress::Proved { bound: false }, Request::Ok), Answer::Refuse(_)));
        assert_eq!(answer(d, Progress::Proved { bound: true }, Request::Ok), Answer::Accept);
    }

    #[test]
    fn passwords_go_only_where_the_certificate_is_verified_or_explicitly_allowed() {
        for (policy, sent) in [
            (p(T::VerifyFull, B::Prefer, false), true),
            (p(T::Require, B::Prefer, false), false),
            (p(T::Disable, B::Prefer, false), false),
            (p(T::Require, B::Disable, false), false),
            (p(T::Require, B::Prefer, true), true),
            (p(T::Disable, B::Disable, true), true),
            (p(T::VerifyFull, B::Require, true), false),
        ] {
            let got =
                (answer(policy, Progress::None, Request::Cleartext), answer(policy, Progress::None, Request::Md5));
            let want = if sent { (Answer::SendCleartext, Answer::SendMd5) } else { (got.0.clone(), got.1.clone()) };
            assert_eq!(got, want, "{policy:?}");
            if !sent {
                assert!(matches!(got, (Answer::Refuse(_), Answer::Refuse(_))), "{policy:?}: {got:?}");
            }
        }
    }

    #[test]
    fn scram_binds_when_it_can_and_says_so_when_it_cannot() {
        assert_eq!(answer(p(T::VerifyFull, B::Prefer, false), Progress::None, BOTH), Answer::Scram(Gs2::Bound));
        assert_eq!(
            answer(p(T::VerifyFull, B::Prefer, false), Progress::None, PLAIN_SCRAM),
            Answer::Scram(Gs2::ServerDoesNot)
        );
        assert_eq!(answer(p(T::Require, B::Disable, false), Progress::None, BOTH), Answer::Scram(Gs2::No));
        // Without TLS there is nothing to bind to, whatever is offered.
        assert_eq!(answer(p(T::Disable, B::Prefer, false), Progress::None, BOTH), Answer::Scram(Gs2::No));
        let none = Request::Sasl { scram: false, plus: false };
        assert!(matches!(answer(p(T::Disable, B::Prefer, false), Progress::None, none), Answer::Refuse(_)));
    }

    #[test]
    fn ok_in_the_middle_of_scram_is_never_believed() {
        for policy in
            [p(T::Disable, B::Disable, true), p(T::VerifyFull, B::Prefer, false), p(T::Require, B::Require, false)]
        {
            assert!(matches!(answer(policy, Progress::Started, Request::Ok), Answer::Refuse(_)), "{policy:?}");
        }
        // Trust authentication, where nothing binds it to the database.
        assert_eq!(answer(p(T::VerifyFull, B::Prefer, false), Progress::None, Request::Ok), Answer::Accept);
    }
}
