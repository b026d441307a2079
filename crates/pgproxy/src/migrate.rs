//! Moving a session to new credentials at an idle point (between
//! transactions, nothing asked of the server): the server says what the
//! session holds (`SNAPSHOT`, catalog views only, no SQL of the client's
//! parsed), a new upstream connection logs in with the current
//! credentials, the session's settings and prepared statements are
//! re-applied there, and the proxy swaps it under the client, which sees
//! nothing. State that cannot move (`State::blockers`) keeps the session
//! where it is, for `unmigratable` to decide.
//!
//! What is decided (what the snapshot means, what to send, what the client
//! must be told, when to try again) is pure and unit-tested; `snapshot`,
//! `login` and `apply` only exchange the messages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::wire::{self, error_code, error_message, message, read_message};
use super::{Io, ProxyError};
use config::ProxyConfig;
use vault::secret::SecretData;

/// What the server tells of a session at an idle point, in one round trip:
/// `s` settings the session changed (`SET`), `p` prepared statements made
/// with the protocol's `Parse`, `b` what cannot move, `r` the values of the
/// parameters the server reports to clients (`ParameterStatus`).
pub const SNAPSHOT: &str = "SELECT 's', name, setting, NULL FROM pg_catalog.pg_settings WHERE source = 'session' \
UNION ALL SELECT 'p', name, statement, parameter_types::pg_catalog.oid[]::text FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql \
UNION ALL SELECT 'b', 'statements prepared with SQL PREPARE', NULL, NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
UNION ALL SELECT 'b', 'temporary tables', NULL, NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
UNION ALL SELECT 'b', 'SET ROLE', NULL, NULL WHERE current_user <> session_user \
UNION ALL SELECT 'b', 'LISTEN', NULL, NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) \
UNION ALL SELECT 'b', 'session advisory locks', NULL, NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_locks WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory') \
UNION ALL SELECT 'b', 'WITH HOLD cursors', NULL, NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable) \
UNION ALL SELECT 'r', n, pg_catalog.current_setting(n, true), NULL FROM pg_catalog.unnest(ARRAY['application_name', 'client_encoding', 'DateStyle', 'default_transaction_read_only', 'in_hot_standby', 'integer_datetimes', 'IntervalStyle', 'is_superuser', 'scram_iterations', 'search_path', 'server_encoding', 'server_version', 'session_authorization', 'standard_conforming_strings', 'TimeZone']) n";

/// The most session state (the snapshot's rows, as the server sent them) a
/// move carries. A session past it stays where it is, named so, like one
/// holding a temporary table: a server that streams rows (hostile, or an
/// app with tens of thousands of prepared statements) could otherwise make
/// the proxy hold whatever it sends within the move's deadline.
pub const MAX_STATE: usize = 8 << 20;

/// Settings the snapshot may list that are not the session's to carry:
/// the transaction's own (there is none at an idle point), and the role,
/// which names the old credentials' user or a role granted to it.
fn carried(name: &str) -> bool {
    !(name.starts_with("transaction_") || name == "role" || name == "session_authorization")
}

/// A prepared statement, as `Parse` made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub name: String,
    pub statement: String,
    pub types: Vec<u32>,
}

/// A session's state at an idle point.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    /// `SET` by the session (`pg_settings.source = 'session'`).
    pub settings: Vec<(String, String)>,
    pub prepared: Vec<Prepared>,
    /// What cannot move, named for logs and the client's error.
    pub blockers: Vec<String>,
    /// The reported parameters' values, to tell the client only those that
    /// differ on the new connection.
    pub reported: BTreeMap<String, String>,
}

impl State {
    /// Reads one row of `SNAPSHOT` (its four text columns).
    pub fn add(&mut self, row: &[Option<String>]) -> Result<(), String> {
        let [Some(kind), Some(name), value, extra] = row else {
            return Err(format!("a snapshot row of {} columns", row.len()));
        };
        match (kind.as_str(), value) {
            ("s", Some(v)) if carried(name) => self.settings.push((name.clone(), v.clone())),
            ("s", _) => {}
            ("p", Some(statement)) => self.prepared.push(Prepared {
                name: name.clone(),
                statement: statement.clone(),
                types: oids(extra.as_deref().unwrap_or("{}"))?,
            }),
            ("b", _) => self.blockers.push(name.clone()),
            ("r", Some(v)) => {
                self.reported.insert(name.clone(), v.clone());
            }
            ("r", None) => {}
            (other, _) => return Err(format!("a snapshot row of kind {other:?}")),
        }
        Ok(())
    }
}

/// `{23,25}` (an `oid[]` as text) as numbers.
fn oids(text: &str) -> Result<Vec<u32>, String> {
    let inner = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).ok_or_else(|| format!("oids {text:?}"))?;
    if inner.is_empty() {
        return Ok(Vec::new());
    }
    inner.split(',').map(|o| o.trim().parse::<u32>().map_err(|_| format!("oids {text:?}"))).collect()
}

/// The messages that give a new connection the session's state: each
/// setting through `set_config` (parameters, so no value is quoted into
/// SQL), then each statement parsed under its name with its parameter
/// types, then `Sync`. One round trip.
pub fn replay(state: &State) -> Vec<u8> {
    let mut out = Vec::new();
    if !state.settings.is_empty() {
        let mut parse = b"\0SELECT pg_catalog.set_config($1, $2, false)\0".to_vec();
        parse.extend_from_slice(&2i16.to_be_bytes());
        parse.extend_from_slice(&25u32.to_be_bytes());
        parse.extend_from_slice(&25u32.to_be_bytes());
        out.extend(message(b'P', &parse));
        for (name, value) in &state.settings {
            // Portal "", statement "", no parameter formats (text), two
            // parameters, no result formats.
            let mut bind = vec![0, 0, 0, 0];
            bind.extend_from_slice(&2i16.to_be_bytes());
            for v in [name, value] {
                bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
                bind.extend_from_slice(v.as_bytes());
            }
            bind.extend_from_slice(&0i16.to_be_bytes());
            out.extend(message(b'B', &bind));
            out.extend(message(b'E', &[0, 0, 0, 0, 0]));
        }
    }
    for p in &state.prepared {
        let mut parse = Vec::new();
        for s in [&p.name, &p.statement] {
            parse.extend_from_slice(s.as_bytes());
            parse.push(0);
        }
        parse.extend_from_slice(&(p.types.len() as i16).to_be_bytes());
        for t in &p.types {
            parse.extend_from_slice(&t.to_be_bytes());
        }
        out.extend(message(b'P', &parse));
    }
    out.extend(message(b'S', &[]));
    out
}

/// The `ParameterStatus` messages the client needs after the swap: the
/// new connection's reported values that differ from what the old one
/// had (its user's `session_authorization`, a new server's version).
pub fn news(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in new {
        if old.get(name) != Some(value) {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
            out.extend(message(b'S', &body));
        }
    }
    out
}

/// How long after a failed or refused attempt a session tries again: 1 s
/// doubling to 30 s, so a session that holds a temporary table is asked
/// again now and then (it may drop it), not at every transaction.
pub fn retry_after(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(5)).min(Duration::from_secs(30))
}

/// A `DataRow`'s columns as text.
fn columns(body: &[u8]) -> Result<Vec<Option<String>>, String> {
    let bad = || "a malformed DataRow".to_string();
    let n = i16::from_be_bytes(body.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let mut at = 2usize;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = at + len as usize;
        let v = body.get(at..end).ok_or_else(bad)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        at = end;
    }
    Ok(out)
}

/// Why a session did not move.
#[derive(Debug)]
pub enum Failed {
    /// The old connection is in a state the proxy cannot know (an error or
    /// a deadline in the middle of the snapshot): the session must end.
    Lost(ProxyError),
    /// The session holds state that cannot move.
    Blocked(Vec<String>),
    /// Nothing moved and the old connection is as it was: try again later.
    Again(ProxyError),
}

/// Asks the old connection what the session holds. Messages the server
/// sends on its own meanwhile (notices, notifications, parameter changes)
/// reach the client as they would have.
pub async fn snapshot(old: &mut Box<dyn Io>, client: &mut Box<dyn Io>) -> Result<State, Failed> {
    snapshot_within(old, client, MAX_STATE).await
}

async fn snapshot_within(old: &mut Box<dyn Io>, client: &mut Box<dyn Io>, max: usize) -> Result<State, Failed> {
    let lost = Failed::Lost;
    let mut query = SNAPSHOT.as_bytes().to_vec();
    query.push(0);
    old.write_all(&message(b'Q', &query)).await.map_err(|e| lost(e.into()))?;
    let mut state = State::default();
    let mut error = None;
    let mut size = 0usize;
    loop {
        let (kind, body) = read_message(old).await.map_err(lost)?;
        match kind {
            b'T' | b'C' => {}
            // Past `max`, rows are read to the end (the connection must
            // reach its idle point again) and dropped.
            b'D' => {
                size = size.saturating_add(body.len());
                if size <= max {
                    let row = columns(&body).map_err(|e| lost(ProxyError::Protocol(e)))?;
                    state.add(&row).map_err(|e| lost(ProxyError::Protocol(e)))?;
                }
            }
            b'E' => error = Some(body),
            b'A' | b'N' | b'S' => client.write_all(&message(kind, &body)).await.map_err(|e| lost(e.into()))?,
            // The session is as it was: idle, outside a transaction.
            b'Z' if body == b"I" => break,
            _ => return Err(lost(ProxyError::Protocol(format!("message {:?} in the snapshot", kind as char)))),
        }
    }
    if size > max {
        state.blockers.push(format!("more than {} KiB of settings and prepared statements", max >> 10));
    }
    match error {
        Some(body) => Err(Failed::Again(ProxyError::Server(body))),
        None => Ok(state),
    }
}

/// What a new connection's login said after `AuthenticationOk`: its
/// cancel key and reported parameters (the client hears only of changes).
pub struct LoggedIn {
    pub server: Box<dyn Io>,
    pub key: Option<Vec<u8>>,
    pub reported: BTreeMap<String, String>,
}

/// Logs in a new upstream connection with `creds`, as the client's own
/// login did, and gives it the session's state.
pub async fn login(
    cfg: &ProxyConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    params: &BTreeMap<String, String>,
    creds: &SecretData,
    state: &State,
) -> Result<LoggedIn, ProxyError> {
    let mut server = super::upstream::open(cfg, tls, params, creds).await?;
    let mut key = None;
    let mut reported = BTreeMap::new();
    server.write_all(&replay(state)).await?;
    // The login's ReadyForQuery, then the replay's.
    let mut ready = 0;
    let mut failed = None;
    while ready < 2 {
        let (kind, body) = read_message(&mut server).await?;
        match kind {
            b'K' => key = Some(body),
            b'S' => {
                let mut parts = body.split(|b| *b == 0).map(|p| String::from_utf8_lossy(p).into_owned());
                if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                    reported.insert(k, v);
                }
            }
            b'E' if ready == 0 => return Err(ProxyError::Server(body)),
            b'E' => failed = failed.or(Some(body)),
            b'Z' => ready += 1,
            _ => {}
        }
    }
    if let Some(body) = failed {
        let _ = server.write_all(&wire::TERMINATE).await;
        return Err(ProxyError::Replay(format!("{} ({})", error_message(&body), error_code(&body))));
    }
    Ok(LoggedIn { server, key, reported })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A `D` message of `cols` text columns.
    fn data_row(cols: &[&str]) -> Vec<u8> {
        let mut body = (cols.len() as u16).to_be_bytes().to_vec();
        for c in cols {
            body.extend((c.len() as i32).to_be_bytes());
            body.extend(c.as_bytes());
        }
        message(b'D', &body)
    }

    /// `rows` prepared-statement rows, then ReadyForQuery, from a fake
    /// server; the snapshot as `snapshot_within(max)` read it.
    async fn snapshot_of(rows: usize, max: usize) -> State {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut query = [0u8; 5];
            theirs.read_exact(&mut query).await.unwrap();
            for i in 0..rows {
                let name = format!("s{i}");
                theirs.write_all(&data_row(&["p", &name, "SELECT 1", "{}"])).await.unwrap();
            }
            theirs.write_all(&message(b'Z', b"I")).await.unwrap();
            // Holds its end open until the snapshot is read.
            let mut rest = Vec::new();
            let _ = theirs.read_to_end(&mut rest).await;
        });
        let mut old: Box<dyn Io> = Box::new(ours);
        let (client, _client_end) = tokio::io::duplex(64);
        let mut client: Box<dyn Io> = Box::new(client);
        let state = snapshot_within(&mut old, &mut client, max).await.unwrap();
        drop(old);
        server.await.unwrap();
        state
    }

    #[tokio::test]
    async fn a_snapshot_past_its_bound_is_read_to_the_end_and_blocks_the_move() {
        // A row is about 32 bytes: 100 fit in 4 KiB, 200 do not.
        let under = snapshot_of(100, 4096).await;
        assert_eq!((under.prepared.len(), under.blockers.len()), (100, 0));
        let over = snapshot_of(200, 4096).await;
        assert!(over.prepared.len() < 200, "rows past the bound are not kept");
        assert_eq!(over.blockers, vec!["more than 4 KiB of settings and prepared statements"]);
    }

    fn row(cols: &[Option<&str>]) -> Vec<Option<String>> {
        cols.iter().map(|c| c.map(str::to_string)).collect()
    }

    #[test]
    fn a_snapshot_reads_into_settings_statements_and_blockers() {
        let mut s = State::default();
        for r in [
            row(&[Some("s"), Some("search_path"), Some("\"$user\", public"), None]),
            row(&[Some("s"), Some("transaction_isolation"), Some("read committed"), None]),
            row(&[Some("s"), Some("role"), Some("v-old"), None]),
            row(&[Some("p"), Some("_pg3_0"), Some("SELECT $1::int"), Some("{23}")]),
            row(&[Some("p"), Some("s1"), Some("SELECT now()"), Some("{}")]),
            row(&[Some("r"), Some("session_authorization"), Some("v-old"), None]),
            row(&[Some("r"), Some("scram_iterations"), None, None]),
        ] {
            s.add(&r).unwrap();
        }
        assert_eq!(s.settings, vec![("search_path".to_string(), "\"$user\", public".to_string())]);
        assert_eq!(
            s.prepared[0],
            Prepared { name: "_pg3_0".into(), statement: "SELECT $1::int".into(), types: vec![23] }
        );
        assert!(s.prepared[1].types.is_empty() && s.blockers.is_empty());
        assert_eq!(s.reported.len(), 1);
        s.add(&row(&[Some("b"), Some("temporary tables"), None, None])).unwrap();
        assert_eq!(s.blockers, vec!["temporary tables"]);
        assert!(s.add(&row(&[Some("x"), Some("y"), None, None])).is_err());
        assert!(s.add(&row(&[Some("s")])).is_err());
        assert!(s.add(&row(&[Some("p"), Some("q"), Some("SELECT 1"), Some("{a}")])).is_err());
    }

    #[test]
    fn the_replay_is_one_pipeline_ending_in_sync() {
        let state = State {
            settings: vec![("statement_timeout".into(), "5000".into())],
            prepared: vec![Prepared { name: "s1".into(), statement: "SELECT $1".into(), types: vec![25] }],
            ..State::default()
        };
        let out = replay(&state);
        let mut kinds = Vec::new();
        let mut f = crate::relay::Framer::default();
        f.feed(&out, |k, _| kinds.push(k));
        assert_eq!(kinds, b"PBEPS");
        // The value travels as a parameter, never inside the SQL.
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("set_config($1, $2, false)") && text.contains("statement_timeout"));
        assert_eq!(replay(&State::default()), message(b'S', &[]), "nothing to apply: only Sync");
    }

    #[test]
    fn the_client_hears_only_of_parameters_that_changed() {
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let old = map(&[("session_authorization", "v-old"), ("TimeZone", "UTC")]);
        let new = map(&[("session_authorization", "v-new"), ("TimeZone", "UTC")]);
        assert_eq!(news(&old, &new), message(b'S', b"session_authorization\0v-new\0"));
        assert!(news(&old, &old).is_empty());
    }

    #[test]
    fn attempts_back_off_to_thirty_seconds() {
        let secs: Vec<u64> = (0..8).map(|a| retry_after(a).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn data_rows_are_read_with_nulls_and_bounds() {
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ab");
        assert_eq!(columns(&body).unwrap(), vec![None, Some("ab".to_string())]);
        body.truncate(body.len() - 1);
        assert!(columns(&body).is_err(), "a length past the end");
    }
}
