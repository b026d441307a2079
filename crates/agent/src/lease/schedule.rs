//! When to renew and when to re-issue a lease: pure functions of time and
//! lease, unit-tested without sleeping. The supervisor loop only sleeps
//! until the instant these return and acts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::timing::part;
pub use crate::timing::{MIN_RETRY, Policy, renew_point, renewal_capped, retry_delay};

/// What we know of a lease we hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseTimes {
    /// The TTL Vault first granted: the renewal increment and the yardstick
    /// for how much overlap a replacement needs.
    pub first_ttl: Duration,
    /// When the last grant (issue or renewal) was received.
    pub granted_at: SystemTime,
    /// TTL of the last grant.
    pub ttl: Duration,
    pub renewable: bool,
    /// The last renewal was capped by the max TTL: the expiry is final.
    pub capped: bool,
}

impl LeaseTimes {
    pub fn issued(now: SystemTime, ttl: Duration, renewable: bool) -> Self {
        LeaseTimes { first_ttl: ttl, granted_at: now, ttl, renewable, capped: false }
    }

    pub fn expires_at(&self) -> SystemTime {
        self.granted_at + self.ttl
    }

    /// The latest the lease may really end. Vault reports TTLs in whole
    /// seconds, rounded (OpenBao grants 7200 for 7199.6 s left), and the
    /// grant is timed when its answer arrives: the end may come up to a
    /// second before `expires_at`. Re-issuing counts from this one.
    pub fn safe_end(&self) -> SystemTime {
        self.expires_at() - ROUNDING.min(self.ttl / 2)
    }

    /// The lease after a successful renewal.
    pub fn renewed(&self, now: SystemTime, granted: Duration, renewable: bool, warnings: &[String]) -> Self {
        LeaseTimes {
            granted_at: now,
            ttl: granted,
            renewable,
            capped: renewal_capped(self.first_ttl, granted, warnings),
            ..*self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Renew,
    /// New credentials are needed before `Bound` ends the lease.
    Reissue(Bound),
}

/// What ends a lease that cannot be extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Its own max TTL, or it is not renewable.
    Lease,
    /// The token that created it expires for good first (Vault revokes the
    /// lease with it): the auth role's `token_max_ttl` is too short.
    Token,
    /// Renewals keep failing (refused by policy, or Vault failing): the
    /// lease ends at its current TTL.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    pub action: Action,
    pub at: SystemTime,
}

/// How much earlier than reported a lease may end (see `LeaseTimes::safe_end`).
pub const ROUNDING: Duration = Duration::from_secs(1);

/// The next thing to do for a lease.
///
/// `token_end` is the expiry of the token that created the lease when that
/// expiry is final (Vault revokes the lease with the token): it bounds the
/// lease's life like the max TTL does.
///
/// A lease that cannot be extended (capped, not renewable, or outlived by its
/// bound) is re-issued so that the new credentials exist while the old lease
/// still has `(1 - renew_at) × first TTL` left (counted from its safe end);
/// otherwise it is renewed at `renew_at` of its current TTL.
///
/// `renew_retry` is set after a renewal failed (refused, or Vault failing):
/// the renewal is tried again then, unless that is past the replacement
/// point, where the lease still has `(1 - reissue_at) × first TTL` left;
/// then it is re-issued at that point instead, so refused renewals never
/// outlive the credentials. With `reissue_at` later than `renew_at` (0.75
/// against 0.5), a Vault gap shorter than the window between them ends in
/// a renewal, the same database user, not a new one and pool churn.
pub fn next(
    lease: &LeaseTimes,
    token_end: Option<SystemTime>,
    policy: &Policy,
    sample: f64,
    renew_retry: Option<SystemTime>,
) -> Next {
    let jitter = part(lease.first_ttl, policy.jitter * sample);
    let overlap = part(lease.first_ttl, 1.0 - policy.renew_at) + jitter;
    let reissue_before = |end: SystemTime| end.checked_sub(overlap).unwrap_or(SystemTime::UNIX_EPOCH);
    let planned = plan(lease, token_end, policy, sample, &reissue_before);
    match (planned.action, renew_retry) {
        (Action::Renew, Some(retry)) => {
            let deadline = replace_by(lease, token_end, policy, sample);
            if retry < deadline {
                Next { action: Action::Renew, at: retry }
            } else {
                Next { action: Action::Reissue(Bound::Refused), at: deadline }
            }
        }
        _ => planned,
    }
}

/// How long replaced credentials are guaranteed to keep working after the
/// new ones are written (the files' "rotation window"): until
/// `revoke_replaced_after`, or until the old lease ends, which the schedule
/// places at least `(1 - reissue_at) × first TTL` after the replacement
/// (`(1 - renew_at)` when the replacement is the planned one before max
/// TTL; `reissue_at` is never earlier). An app that reads the files keeps
/// a pooled connection at most this long (its pool's max lifetime), so no
/// connection of it outlives its role.
pub fn rotation_window(first_ttl: Duration, policy: &Policy, revoke_replaced_after: Duration) -> Duration {
    part(first_ttl, 1.0 - policy.reissue_at.max(policy.renew_at)).min(revoke_replaced_after)
}

/// The replacement point of a lease whose renewals fail: it still has
/// `(1 - reissue_at) × first TTL` (and the jitter's share) left before its
/// safe end, or its token's end when that comes first. No renewal is
/// waited for past it.
pub fn replace_by(lease: &LeaseTimes, token_end: Option<SystemTime>, policy: &Policy, sample: f64) -> SystemTime {
    let end = token_end.map_or(lease.safe_end(), |t| t.min(lease.safe_end()));
    let overlap = part(lease.first_ttl, 1.0 - policy.reissue_at.max(policy.renew_at))
        + part(lease.first_ttl, policy.jitter * sample);
    end.checked_sub(overlap).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// After an outage every lease of a fleet was granted in the same second,
/// and `renew_at` minus a little jitter would keep their renewals in waves
/// from then on (measured: 100 agents renewing within a second, every
/// ~9.5 s). The first renewal of a grant that followed failures is drawn
/// uniformly over the whole window before its normal point instead (at
/// least a second after the grant), once: the fleet spreads over the
/// renewal period and keeps that phase. Never later than `next` said.
pub fn spread_renewal(next: Next, lease: &LeaseTimes, policy: &Policy, sample: f64) -> Next {
    if next.action != Action::Renew {
        return next;
    }
    let drawn = lease.granted_at + part(lease.ttl, policy.renew_at * (1.0 - sample.clamp(0.0, 1.0)));
    let floor = lease.granted_at + Duration::from_secs(1);
    Next { at: next.at.min(drawn.max(floor)), ..next }
}

/// How long one renewal or issue may take, the client's own retries
/// included: `request_timeout`, but never past `until` (a renewal: its
/// lease's `replace_by`; an issue: the end of the credentials in hand), so
/// a request hanging on a dead link cannot outlast the point where
/// something else must be tried. At least `MIN_CALL`; once `until` has
/// passed (the credentials are dead) there is nothing left to race, and a
/// slow Vault gets the whole `request_timeout` to create new ones.
pub fn call_deadline(now: SystemTime, until: Option<SystemTime>, request_timeout: Duration) -> Duration {
    match until.and_then(|u| u.duration_since(now).ok()) {
        Some(left) => request_timeout.min(left).max(MIN_CALL),
        None => request_timeout,
    }
}

/// The shortest deadline a call gets: a round trip to Vault and its
/// database plugin (creating a role) within it, even at the last moment.
pub const MIN_CALL: Duration = Duration::from_secs(1);

fn plan(
    lease: &LeaseTimes,
    token_end: Option<SystemTime>,
    policy: &Policy,
    sample: f64,
    reissue_before: &dyn Fn(SystemTime) -> SystemTime,
) -> Next {
    if !lease.renewable || lease.capped {
        return match token_end.filter(|t| *t <= lease.safe_end()) {
            Some(end) => Next { action: Action::Reissue(Bound::Token), at: reissue_before(end) },
            None => Next { action: Action::Reissue(Bound::Lease), at: reissue_before(lease.safe_end()) },
        };
    }
    // Never past the safe end: a grant rounded up to a whole TTL may end up
    // to a second early (a short TTL with a late `renew_at` otherwise
    // renewed after the lease had really ended).
    let renew_at = renew_point(lease.granted_at, lease.ttl, policy, sample).min(lease.safe_end());
    // Renewals extend the lease, but not past the end of its token.
    if let Some(end) = token_end
        && reissue_before(end) <= renew_at
    {
        return Next { action: Action::Reissue(Bound::Token), at: reissue_before(end) };
    }
    Next { action: Action::Renew, at: renew_at }
}

/// When to re-read a secret without a lease. One that says when it ends
/// (`data.expiration`, e.g. an unleased PKI certificate) is re-read at
/// `renew_at` of its validity, never sooner: every read of `pki/issue` mints
/// a certificate. Others (KV) are polled every `refresh_interval`.
pub fn refresh_at(
    fetched_at: SystemTime,
    expiration: Option<SystemTime>,
    refresh_interval: Duration,
    policy: &Policy,
    sample: f64,
) -> SystemTime {
    match expiration.and_then(|end| end.duration_since(fetched_at).ok()) {
        Some(validity) => renew_point(fetched_at, validity, policy, sample),
        None => fetched_at + refresh_interval,
    }
}

/// When to re-read a static role (`database/static-creds`): right after
/// Vault rotates its password, `rotates_in` after the read, plus 1–2 s
/// (random per read, so the pods sharing a role do not read at once), not
/// every `refresh_interval`.
pub fn static_reread_at(fetched_at: SystemTime, rotates_in: Duration, sample: f64) -> SystemTime {
    fetched_at + rotates_in + Duration::from_secs(1) + Duration::from_secs_f64(sample.clamp(0.0, 1.0))
}

/// What to do with a replaced lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetiredAction {
    /// Nothing until the instant returned (or a proxied connection of it ends).
    Wait,
    /// Ask its proxied connections to close between transactions.
    Drain,
    Renew,
    Revoke,
}

/// A replaced lease as `retired` weighs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetiredLease {
    pub times: LeaseTimes,
    /// `revoke_replaced_after` after the replacement.
    pub revoke_at: SystemTime,
    /// When its connections were asked to close.
    pub draining_since: Option<SystemTime>,
    pub sample: f64,
}

/// How long proxied connections of a replaced lease get to finish their
/// transaction before the lease is revoked under them: 5 s, or an eighth
/// of the lease's TTL when that is shorter.
pub fn drain_time(first_ttl: Duration) -> Duration {
    Duration::from_secs(5).min(first_ttl / 8)
}

/// The next step for a replaced lease, and when. `open`: its proxied
/// connections; `keep`: `replaced_connections: keep`, where they stay until
/// the client closes them and the lease is renewed meanwhile; `end`: when
/// the lease ends for good (its safe end, or its token's if sooner).
///
/// Without connections it is revoked at `revoke_at`. With them, they are
/// asked to close then or `drain_time` before `end` if sooner (`close`), or
/// only `drain_time` before `end` (`keep`, and `migrate`, whose sessions
/// that could not move stay), and it is revoked when the last one closed or
/// `drain_time` later.
pub fn retired(
    now: SystemTime,
    r: &RetiredLease,
    open: u64,
    keep: bool,
    end: SystemTime,
    policy: &Policy,
) -> (RetiredAction, SystemTime) {
    use RetiredAction::*;
    let drain = drain_time(r.times.first_ttl);
    if let Some(since) = r.draining_since {
        let until = (since + drain).min(end);
        return if open == 0 || now >= until { (Revoke, now) } else { (Wait, until) };
    }
    let last_call = end.checked_sub(drain).unwrap_or(UNIX_EPOCH);
    let renew = (keep && r.times.renewable && !r.times.capped)
        .then(|| renew_point(r.times.granted_at, r.times.ttl, policy, r.sample));
    let renew_or_wait = |until: SystemTime| match renew {
        Some(at) if at <= now => (Renew, now),
        Some(at) => (Wait, at.min(until)),
        None => (Wait, until),
    };
    // Connections are asked to close before the lease can end, whatever
    // `revoke_replaced_after` says: Vault drops the role at the lease's end,
    // under any session still on it.
    let drain_at = if keep { last_call } else { r.revoke_at.min(last_call) };
    if open > 0 && now >= drain_at {
        return (Drain, now);
    }
    if now < r.revoke_at {
        return renew_or_wait(if open > 0 { r.revoke_at.min(drain_at) } else { r.revoke_at });
    }
    if open == 0 {
        return (Revoke, now);
    }
    renew_or_wait(drain_at)
}

/// How much earlier a secret's next step may run, so that the steps of a
/// process's secrets share wakeups. Two of the 64 ms slots of tokio's timer
/// wheel: a deadline on a slot boundary fires at the wheel's first wakeup
/// for it instead of being re-filed into a finer level and woken again.
pub const SLACK: Duration = Duration::from_millis(128);

// A coalesced retry must still wait (`timing::MIN_RETRY`).
const _: () = assert!(MIN_RETRY.as_millis() >= 2 * SLACK.as_millis());

/// `due` moved earlier onto the process's grid of `SLACK` cells (offset by
/// `phase`, per process, so that pods stay spread): the deadlines of
/// several secrets that fall in one cell fire in one wakeup, and a wakeup
/// costs far more CPU than a renewal's own work. Never later than `due`,
/// less than `SLACK` earlier.
pub fn coalesce(due: SystemTime, phase: Duration) -> SystemTime {
    let Ok(since) = due.duration_since(UNIX_EPOCH) else { return due };
    let grid = SLACK.as_nanos();
    let (t, p) = (since.as_nanos(), phase.as_nanos() % grid);
    if t < p {
        return due;
    }
    let early = (t - p) % grid;
    due - Duration::from_nanos(early as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn coalesced_deadlines_move_earlier_onto_one_grid() {
        use super::{SLACK, coalesce};
        use std::time::{Duration, UNIX_EPOCH};
        let phase = Duration::from_millis(37);
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        // Two secrets due 60 ms apart in one cell: one wakeup.
        // 10_021 = 37 + 78 cells of 128 ms.
        assert_eq!(coalesce(at(10_040), phase), at(10_021));
        assert_eq!(coalesce(at(10_100), phase), at(10_021));
        assert_eq!(coalesce(at(10_149), phase), at(10_149), "on the grid: unchanged");
        for ms in [0u64, 5, 36, 37, 38, 99, 100, 127, 128, 12_345, 1_000_000_000] {
            for phase in [Duration::ZERO, phase, Duration::from_millis(127), Duration::from_secs(7)] {
                let c = coalesce(at(ms), phase);
                assert!(c <= at(ms) && at(ms).duration_since(c).unwrap() < SLACK, "{ms} {phase:?}");
            }
        }
        // Another process's phase: another grid.
        assert_ne!(coalesce(at(10_040), Duration::from_millis(80)), at(10_021));
    }
    use super::*;
    use crate::clock;

    const POLICY: Policy = Policy { renew_at: 0.5, jitter: 0.05, reissue_at: 0.5 };

    /// A replaced lease granted 60 s at 0 (renewable), revoke_at 10 s.
    fn replaced(renewable: bool, draining_since: Option<SystemTime>) -> RetiredLease {
        RetiredLease {
            times: LeaseTimes::issued(t(0.0), s(60.0), renewable),
            revoke_at: t(10.0),
            draining_since,
            sample: 0.0,
        }
    }

    #[test]
    fn a_replaced_lease_without_connections_is_revoked_at_revoke_at() {
        use RetiredAction::*;
        let r = replaced(true, None);
        for keep in [false, true] {
            assert_eq!(retired(t(9.0), &r, 0, keep, t(59.0), &POLICY), (Wait, t(10.0)));
            assert_eq!(retired(t(10.0), &r, 0, keep, t(59.0), &POLICY), (Revoke, t(10.0)), "keep {keep}");
        }
    }

    #[test]
    fn close_drains_connections_at_revoke_at_then_revokes() {
        use RetiredAction::*;
        let r = replaced(true, None);
        assert_eq!(retired(t(9.0), &r, 3, false, t(59.0), &POLICY), (Wait, t(10.0)), "no renewal in close mode");
        assert_eq!(retired(t(10.0), &r, 3, false, t(59.0), &POLICY), (Drain, t(10.0)));
        let d = replaced(true, Some(t(10.0)));
        assert_eq!(
            retired(t(11.0), &d, 1, false, t(59.0), &POLICY),
            (Wait, t(10.0) + drain_time(s(60.0))),
            "a transaction runs"
        );
        assert_eq!(retired(t(11.0), &d, 0, false, t(59.0), &POLICY), (Revoke, t(11.0)), "the last one closed");
        assert_eq!(
            retired(t(10.0) + drain_time(s(60.0)), &d, 1, false, t(59.0), &POLICY),
            (Revoke, t(10.0) + drain_time(s(60.0))),
            "no longer"
        );
        // Never past the lease's own end.
        assert_eq!(retired(t(11.0), &d, 1, false, t(12.0), &POLICY), (Wait, t(12.0)));
    }

    /// #22: with `revoke_replaced_after` (5 min by default) past the old
    /// lease's end, its connections waited for `revoke_at` while Vault's
    /// expiry dropped their role under them.
    #[test]
    fn close_drains_before_the_lease_ends_when_that_comes_before_revoke_at() {
        use RetiredAction::*;
        let late = RetiredLease { revoke_at: t(300.0), ..replaced(false, None) };
        let last_call = t(59.0) - drain_time(s(60.0));
        assert_eq!(retired(t(20.0), &late, 2, false, t(59.0), &POLICY), (Wait, last_call));
        assert_eq!(retired(last_call, &late, 2, false, t(59.0), &POLICY), (Drain, last_call));
        // Without connections, nothing to hurry: revoked at revoke_at (Vault
        // has let it expire by then).
        assert_eq!(retired(t(20.0), &late, 0, false, t(59.0), &POLICY), (Wait, t(300.0)));
    }

    #[test]
    fn keep_renews_while_connections_stay_and_drains_before_the_end() {
        use RetiredAction::*;
        let r = replaced(true, None);
        // Renewed at half its TTL, before or after revoke_at.
        assert_eq!(retired(t(10.0), &r, 2, true, t(59.0), &POLICY), (Wait, t(30.0)));
        assert_eq!(retired(t(30.0), &r, 2, true, t(59.0), &POLICY), (Renew, t(30.0)));
        let short = RetiredLease { revoke_at: t(40.0), ..r };
        assert_eq!(retired(t(31.0), &short, 2, true, t(59.0), &POLICY), (Renew, t(31.0)), "before revoke_at too");
        // Capped or not renewable: left alone until its drain time before its end.
        let capped = RetiredLease { times: LeaseTimes { capped: true, ..r.times }, ..r };
        assert_eq!(retired(t(10.0), &capped, 2, true, t(59.0), &POLICY), (Wait, t(59.0) - drain_time(s(60.0))));
        assert_eq!(
            retired(t(59.0) - drain_time(s(60.0)), &capped, 2, true, t(59.0), &POLICY),
            (Drain, t(59.0) - drain_time(s(60.0)))
        );
        assert_eq!(drain_time(s(8.0)), s(1.0), "short leases drain for an eighth of their TTL");
        let fixed = replaced(false, None);
        assert_eq!(retired(t(54.0), &fixed, 1, true, t(59.0), &POLICY), (Drain, t(54.0)));
    }

    #[test]
    fn the_rotation_window_is_the_overlap_or_revoke_replaced_after() {
        // 1 h leases, the defaults: a quarter of the TTL left at the latest
        // replacement, less than revoke_replaced_after's 5 min? No: 15 min.
        assert_eq!(rotation_window(s(3600.0), &POLICY_DEFAULTS, s(300.0)), s(300.0));
        assert_eq!(rotation_window(s(600.0), &POLICY_DEFAULTS, s(300.0)), s(150.0));
        assert_eq!(rotation_window(s(4.0), &POLICY, s(300.0)), s(2.0), "reissue_at 0.5 here");
    }

    const POLICY_DEFAULTS: Policy = Policy { renew_at: 0.5, jitter: 0.1, reissue_at: 0.75 };

    fn t(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_000_000.0 + secs)
    }

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn renews_at_half_the_ttl_without_jitter() {
        let lease = LeaseTimes::issued(t(0.0), s(4.0), true);
        assert_eq!(next(&lease, None, &POLICY, 0.0, None), Next { action: Action::Renew, at: t(2.0) });
    }

    #[test]
    fn jitter_only_moves_renewal_earlier_and_within_bounds() {
        let lease = LeaseTimes::issued(t(0.0), s(100.0), true);
        for sample in [0.0, 0.25, 0.5, 0.999] {
            let n = next(&lease, None, &POLICY, sample, None);
            assert_eq!(n.action, Action::Renew);
            assert!(n.at <= t(50.0) && n.at >= t(45.0), "sample {sample}: {:?}", n.at);
        }
    }

    #[test]
    fn renewable_unbounded_lease_is_only_ever_renewed() {
        let mut lease = LeaseTimes::issued(t(0.0), s(10.0), true);
        for round in 0..20 {
            let n = next(&lease, None, &POLICY, 0.999, None);
            assert_eq!(n.action, Action::Renew, "round {round}");
            lease = lease.renewed(n.at, s(10.0), true, &[]);
        }
    }

    #[test]
    fn renewal_uses_the_current_ttl() {
        let lease = LeaseTimes::issued(t(0.0), s(4.0), true).renewed(t(2.0), s(4.0), true, &[]);
        assert!(!lease.capped);
        assert_eq!(next(&lease, None, &POLICY, 0.0, None), Next { action: Action::Renew, at: t(4.0) });
    }

    #[test]
    fn capped_renewal_schedules_reissue_with_overlap() {
        // TTL 4 s, max 12 s: the renewal at t=8 is capped to 3 s (ends at 11,
        // or up to a second sooner: Vault rounds TTLs to whole seconds).
        let lease = LeaseTimes::issued(t(0.0), s(4.0), true).renewed(t(8.0), s(3.0), true, &[]);
        assert!(lease.capped);
        let n = next(&lease, None, &POLICY, 0.0, None);
        assert_eq!(n, Next { action: Action::Reissue(Bound::Lease), at: t(8.0) });
        // New credentials in place with (1 - 0.5) × 4 s = 2 s left on the
        // old, counted from its safe end.
        assert_eq!(lease.safe_end().duration_since(n.at).unwrap(), s(2.0));
        assert_eq!(lease.expires_at().duration_since(lease.safe_end()).unwrap(), ROUNDING);
    }

    #[test]
    fn failed_renewals_are_retried_until_the_lease_must_be_replaced() {
        // TTL 10 s: the renewal at t=5 failed. Replacement is due by
        // 10 - 1 (rounding) - 5 (overlap) = t=4, already past: re-issue now.
        let lease = LeaseTimes::issued(t(0.0), s(10.0), true);
        let n = next(&lease, None, &POLICY, 0.0, Some(t(5.5)));
        assert_eq!(n, Next { action: Action::Reissue(Bound::Refused), at: t(4.0) });
        // TTL 100 s, renewal at t=50 failed: retried at t=51 and until t=49+…;
        // a retry later than t=49 (100 - 1 - 50) is not waited for.
        let long = LeaseTimes::issued(t(0.0), s(100.0), true);
        let deadline = t(49.0);
        let retry = long.granted_at + s(30.0);
        assert_eq!(next(&long, None, &POLICY, 0.0, Some(retry)), Next { action: Action::Renew, at: retry });
        let late = next(&long, None, &POLICY, 0.0, Some(t(60.0)));
        assert_eq!(late, Next { action: Action::Reissue(Bound::Refused), at: deadline });
        // Without a failure nothing changes; a capped lease is re-issued as before.
        assert_eq!(next(&long, None, &POLICY, 0.0, None), Next { action: Action::Renew, at: t(50.0) });
        let capped = LeaseTimes::issued(t(0.0), s(4.0), true).renewed(t(8.0), s(3.0), true, &[]);
        assert_eq!(next(&capped, None, &POLICY, 0.0, Some(t(8.5))), next(&capped, None, &POLICY, 0.0, None));
    }

    #[test]
    fn a_renewal_failing_in_a_short_vault_gap_is_retried_not_replaced() {
        // #21: with renew_at 0.5 the first failed renewal fell on the
        // replacement point, so a leader election of a few seconds meant a
        // new database user. TTL 30 s, the renewal at 15 s failed.
        let policy = Policy { reissue_at: 0.75, ..POLICY };
        let lease = LeaseTimes::issued(t(0.0), s(30.0), true);
        assert_eq!(next(&lease, None, &policy, 0.0, None), Next { action: Action::Renew, at: t(15.0) });
        assert_eq!(next(&lease, None, &policy, 0.0, Some(t(16.0))), Next { action: Action::Renew, at: t(16.0) });
        // Retries go on until 30 - 1 (rounding) - 7.5 (a quarter of the TTL).
        assert_eq!(next(&lease, None, &policy, 0.0, Some(t(21.0))), Next { action: Action::Renew, at: t(21.0) });
        let late = next(&lease, None, &policy, 0.0, Some(t(22.0)));
        assert_eq!(late, Next { action: Action::Reissue(Bound::Refused), at: t(21.5) });
        // A lease known to end (capped) is still replaced with half its TTL left.
        let capped = LeaseTimes { capped: true, ..lease };
        assert_eq!(next(&capped, None, &policy, 0.0, None).at, t(14.0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { failure_persistence: None, ..Default::default() })]
        /// Failed renewals are retried between the renewal point and the
        /// replacement point, and the replacement still leaves
        /// `(1 - reissue_at)` of the TTL before the lease's safe end.
        #[test]
        fn failed_renewals_are_retried_until_reissue_at_and_no_later(
            ttl in 2u64..=86_400,
            renew_at in 0.1f64..0.9,
            window in 0.0f64..1.0,
            jitter_part in 0.0f64..1.0,
            sample in 0.0f64..1.0,
            retry_part in 0.0f64..1.2,
        ) {
            let reissue_at = renew_at + (1.0 - renew_at) * window * 0.99;
            let policy = Policy { renew_at, jitter: renew_at * jitter_part * 0.5, reissue_at };
            let lease = LeaseTimes::issued(t(0.0), s(ttl as f64), true);
            let retry = t(ttl as f64 * retry_part);
            let n = next(&lease, None, &policy, sample, Some(retry));
            let last_overlap = part(s(ttl as f64), 1.0 - reissue_at) + part(s(ttl as f64), policy.jitter * sample);
            let deadline = lease.safe_end().checked_sub(last_overlap).unwrap_or(UNIX_EPOCH);
            match n.action {
                Action::Renew => proptest::prop_assert!(n.at == retry && retry < deadline),
                Action::Reissue(Bound::Refused) => proptest::prop_assert!(n.at == deadline && retry >= deadline),
                other => proptest::prop_assert!(false, "{other:?}"),
            }
        }
    }

    #[test]
    fn a_call_never_outlasts_the_point_where_something_else_must_be_tried() {
        // #21: a renewal hung 10 s (request_timeout) on a cut link while the
        // lease had 3 s left.
        let timeout = s(10.0);
        assert_eq!(call_deadline(t(0.0), Some(t(3.0)), timeout), s(3.0));
        assert_eq!(call_deadline(t(0.0), Some(t(300.0)), timeout), timeout);
        assert_eq!(call_deadline(t(0.0), None, timeout), timeout, "nothing in hand: the request timeout");
        assert_eq!(call_deadline(t(2.5), Some(t(3.0)), timeout), MIN_CALL, "almost late: still a chance");
        assert_eq!(call_deadline(t(5.0), Some(t(3.0)), timeout), timeout, "dead: a slow Vault gets its time");
        let policy = Policy { reissue_at: 0.75, ..POLICY };
        let lease = LeaseTimes::issued(t(0.0), s(30.0), true);
        assert_eq!(replace_by(&lease, None, &policy, 0.0), t(21.5));
        assert_eq!(replace_by(&lease, Some(t(20.0)), &policy, 0.0), t(12.5), "the token ends first");
    }

    #[test]
    fn a_fleet_synchronised_by_an_outage_spreads_over_the_renewal_period() {
        // #21: 100 agents recovered in the same second then renewed in waves
        // of 100. 1,000 leases of 20 s granted at once after an outage: with
        // the normal jitter (5%) their renewals fall in 1 s; spread, no
        // second of the 10 s period holds more than twice the mean.
        let lease = LeaseTimes::issued(t(100.0), s(20.0), true);
        let (mut normal, mut spread) = ([0u32; 12], [0u32; 12]);
        for i in 0..1000 {
            // Each agent's own draw: evenly over [0, 1).
            let sample = (i as f64 + 0.5) / 1000.0;
            let n = next(&lease, None, &POLICY, sample, None);
            let bin = |at: SystemTime| at.duration_since(t(100.0)).unwrap().as_secs() as usize;
            normal[bin(n.at)] += 1;
            let sp = spread_renewal(n, &lease, &POLICY, sample);
            assert!(sp.at <= n.at && sp.at >= t(101.0), "{:?}", sp.at);
            spread[bin(sp.at)] += 1;
        }
        assert!(normal.iter().max().unwrap() >= &500, "the normal jitter keeps a wave: {normal:?}");
        let mean = 1000 / 9;
        assert!(*spread.iter().max().unwrap() <= 2 * mean, "{spread:?}");
        // Only renewals move; a re-issue keeps its point.
        let capped = LeaseTimes { capped: true, ..lease };
        let n = next(&capped, None, &POLICY, 0.3, None);
        assert_eq!(spread_renewal(n, &capped, &POLICY, 0.3), n);
    }

    #[test]
    fn capping_is_recognised_by_warning_too() {
        let w =
            vec!["TTL of \"4s\" exceeded the effective max_ttl of \"4s\"; TTL value is capped accordingly".to_string()];
        assert!(renewal_capped(s(4.0), s(4.0), &w));
        assert!(!renewal_capped(s(4.0), s(4.0), &[]));
        assert!(renewal_capped(s(4.0), s(2.0), &[]));
    }

    #[test]
    fn non_renewable_lease_is_reissued_before_it_ends() {
        let lease = LeaseTimes::issued(t(0.0), s(10.0), false);
        assert_eq!(next(&lease, None, &POLICY, 0.0, None), Next { action: Action::Reissue(Bound::Lease), at: t(4.0) });
        // A 1 s lease keeps half of itself as the rounding margin, not all.
        let tiny = LeaseTimes::issued(t(0.0), s(1.0), false);
        assert_eq!(tiny.safe_end(), t(0.5));
    }

    #[test]
    fn token_expiry_bounds_the_lease() {
        // Lease for 60 s, but its token dies for good at t=10.
        let lease = LeaseTimes::issued(t(0.0), s(60.0), true);
        assert_eq!(
            next(&lease, Some(t(10.0)), &POLICY, 0.0, None),
            Next { action: Action::Reissue(Bound::Token), at: t(0.0) - s(20.0) }
        );
        let short = LeaseTimes::issued(t(0.0), s(4.0), true);
        assert_eq!(next(&short, Some(t(10.0)), &POLICY, 0.0, None), Next { action: Action::Renew, at: t(2.0) });
        // A token that outlives the lease changes nothing.
        assert_eq!(next(&short, Some(t(100.0)), &POLICY, 0.0, None), next(&short, None, &POLICY, 0.0, None));
        // Near the token's end the re-issue comes before the renewal.
        let late = short.renewed(t(7.0), s(4.0), true, &[]);
        assert_eq!(
            next(&late, Some(t(10.0)), &POLICY, 0.0, None),
            Next { action: Action::Reissue(Bound::Token), at: t(8.0) }
        );
    }

    #[test]
    fn a_capped_lease_names_whichever_ends_first() {
        // Capped: the lease ends at t=11 (safely: t=10).
        let lease = LeaseTimes::issued(t(0.0), s(4.0), true).renewed(t(8.0), s(3.0), true, &[]);
        let token_first = next(&lease, Some(t(9.5)), &POLICY, 0.0, None);
        assert_eq!(token_first, Next { action: Action::Reissue(Bound::Token), at: t(7.5) });
        let lease_first = next(&lease, Some(t(11.5)), &POLICY, 0.0, None);
        assert_eq!(lease_first, Next { action: Action::Reissue(Bound::Lease), at: t(8.0) });
    }

    #[test]
    fn static_roles_are_reread_just_after_their_rotation() {
        use super::static_reread_at;
        assert_eq!(static_reread_at(t(10.0), s(30.0), 0.0), t(41.0));
        assert_eq!(static_reread_at(t(10.0), s(30.0), 0.5), t(41.5));
        // Being rotated now (ttl 0): soon, not in a loop.
        assert_eq!(static_reread_at(t(10.0), s(0.0), 0.99), t(11.99));
    }

    #[test]
    fn unleased_secrets_with_an_expiration_are_reread_at_renew_at_of_their_validity() {
        let five_min = s(300.0);
        // A certificate valid for 100 s: re-read at 50 s, not after 5 minutes.
        assert_eq!(refresh_at(t(0.0), Some(t(100.0)), five_min, &POLICY, 0.0), t(50.0));
        // Nor before, even if refresh_interval is shorter.
        assert_eq!(refresh_at(t(0.0), Some(t(100.0)), s(10.0), &POLICY, 0.0), t(50.0));
        let jittered = refresh_at(t(0.0), Some(t(100.0)), five_min, &POLICY, 0.99);
        assert!(jittered < t(50.0) && jittered >= t(45.0));
        // KV (no expiration) and an expiration already passed: the interval.
        assert_eq!(refresh_at(t(0.0), None, five_min, &POLICY, 0.0), t(300.0));
        assert_eq!(refresh_at(t(10.0), Some(t(5.0)), five_min, &POLICY, 0.0), t(310.0));
    }

    #[test]
    fn a_late_renewal_point_never_falls_past_the_safe_end() {
        // Found by the property below: ttl 2 s, renew_at 0.89, a grant of
        // a whole TTL with 1.54 s really left (Vault rounds): renewing at
        // 1.78 s came after the real end, and the re-issue with it.
        let policy = Policy { renew_at: 0.89, jitter: 0.0, reissue_at: 0.89 };
        let lease = LeaseTimes::issued(t(12.46), s(2.0), true);
        let n = next(&lease, None, &policy, 0.0, None);
        assert_eq!(n.action, Action::Renew);
        assert_eq!(n.at, lease.safe_end());
        assert!(n.at < t(14.0), "the lease may really end at 14 s: {:?}", n.at);
    }

    #[test]
    fn retries_wait_at_most_a_quarter_of_the_life_left() {
        // #21: a 30 s backoff step while the lease had 3 s left kept its
        // credentials dead long after Vault answered again.
        let backoff = s(30.0);
        assert_eq!(retry_delay(backoff, t(0.0), None, 0.5), backoff, "nothing in hand: the backoff");
        assert_eq!(retry_delay(backoff, t(0.0), Some(t(3.0)), 0.5), s(0.75));
        assert_eq!(retry_delay(s(0.5), t(0.0), Some(t(300.0)), 0.5), s(0.5), "a short step stays");
        for sample in [0.0, 0.5, 0.999] {
            let dead = retry_delay(backoff, t(10.0), Some(t(3.0)), sample);
            assert!(dead >= s(1.0) && dead < s(2.0), "dead credentials: every 1-2 s, not {dead:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { failure_persistence: None, ..Default::default() })]
        /// A retry comes at least `SLACK` after the failure even once the
        /// loop has coalesced it, whatever the life left and the phase (on
        /// CI, a lease's last 100 ms once saw 43 issue attempts).
        #[test]
        fn a_coalesced_retry_never_collapses_to_no_wait(
            now_ms in 1_000_000u64..2_000_000,
            left_ms in 0u64..5_000,
            backoff_ms in 0u64..60_000,
            phase_ms in 0u64..1_000,
            sample in 0.0f64..1.0,
        ) {
            let now = UNIX_EPOCH + Duration::from_millis(now_ms);
            let end = now + Duration::from_millis(left_ms);
            let delay = retry_delay(Duration::from_millis(backoff_ms), now, Some(end), sample);
            let due = coalesce(now + delay, Duration::from_millis(phase_ms));
            proptest::prop_assert!(due.duration_since(now).unwrap_or_default() >= SLACK, "{delay:?} -> {due:?}");
        }
    }

    #[test]
    fn reissue_jitter_only_adds_overlap() {
        let lease = LeaseTimes::issued(t(0.0), s(100.0), false);
        let calm = next(&lease, None, &POLICY, 0.0, None).at;
        let jittered = next(&lease, None, &POLICY, 0.99, None).at;
        assert!(jittered <= calm && calm.duration_since(jittered).unwrap() <= s(5.0));
    }

    #[test]
    fn coalesced_deadlines_are_whole_grid_cells_after_the_anchor() {
        // So that they fall on slot boundaries of tokio's timer wheel.
        let cell = SLACK;
        for ms in [0u64, 1, 127, 128, 5_300, 1_999_999] {
            let due = clock::now() + Duration::from_millis(ms);
            let line = coalesce(due, clock::grid_phase(cell));
            // The anchor's own instant: `instant_at` of any time before it.
            let after = clock::instant_at(line) - clock::instant_at(SystemTime::UNIX_EPOCH);
            assert_eq!(after.as_nanos() % cell.as_nanos(), 0, "{ms} ms: {after:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A lease's whole life under the schedule, with Vault answering as
        /// it does: renewals granted `ttl` seconds, capped (whole seconds,
        /// rounded) at the max TTL; the token that created it ends for good
        /// at `token_life`. Returns the re-issue time and the real end.
        fn life(ttl: u64, max: u64, token_life: Option<u64>, policy: Policy, sample: f64) -> (Next, SystemTime, u32) {
            let issued = t(0.0);
            let hard_end = issued + Duration::from_secs(max.max(ttl));
            let token_end = token_life.map(|l| issued + Duration::from_secs(l));
            let end = token_end.map_or(hard_end, |t| t.min(hard_end));
            let mut lease = LeaseTimes::issued(issued, s(ttl as f64), true);
            let mut renewals = 0;
            loop {
                let n = next(&lease, token_end, &policy, sample, None);
                let Action::Renew = n.action else { return (n, end, renewals) };
                // A renewal never lands after the lease's end.
                assert!(n.at < lease.expires_at(), "renewal at {:?} after the end {:?}", n.at, lease.expires_at());
                let left = hard_end.duration_since(n.at).unwrap_or_default().as_secs_f64();
                let granted = (ttl as f64).min(left.round());
                lease = lease.renewed(n.at, s(granted), true, &[]);
                renewals += 1;
                assert!(renewals < 10_000, "the schedule never converged");
            }
        }

        proptest! {
            // No regressions file at the crate root: a failure prints its
            // minimal input, which becomes a unit test above.
            #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn renewals_come_in_time_and_replacements_with_the_promised_overlap(
                // Short TTLs, where a second of rounding matters, and long ones.
                ttl in prop_oneof![2u64..=60, 2u64..=86_400],
                max_factor in 1u64..=20,
                token_factor in prop::option::of(1u64..=40),
                renew_at in 0.1f64..0.9,
                jitter_part in 0.0f64..1.0,
                // No jitter drawn: the overlap at its tightest.
                sample in prop_oneof![Just(0.0), 0.0f64..1.0],
            ) {
                let max = ttl * max_factor;
                let token_life = token_factor.map(|f| ttl * f / 2 + 1);
                let policy = Policy { renew_at, jitter: renew_at * jitter_part * 0.5, reissue_at: renew_at };
                let (n, end, _) = life(ttl, max, token_life, policy, sample);
                prop_assert!(matches!(n.action, Action::Reissue(_)));
                // New credentials while the old lease still has (1 - renew_at)
                // of its TTL left, and a second more for Vault's rounding,
                // whenever the lease lives that long at all.
                let overlap = s(ttl as f64 * (1.0 - renew_at));
                let needed = overlap + ROUNDING.min(s(ttl as f64) / 2);
                if end.duration_since(t(0.0)).unwrap() >= needed {
                    let left = end.duration_since(n.at).unwrap_or_default();
                    prop_assert!(left >= overlap, "{left:?} left, {overlap:?} promised");
                }
            }
        }
    }
}
