//! devvault: a Vault-compatible development server.
//!
//! It answers the subset of Vault's HTTP API that leasehold and common
//! clients (hvac, the Vault CLI) use — Kubernetes auth, token
//! self-management, the database secrets engine with a real PostgreSQL
//! plugin, leases, ACL policies — with Vault's paths, envelopes, status codes,
//! error texts and TTL arithmetic. `sys/devvault/` adds fault injection and a
//! request log for tests. Known differences from Vault: `devvault/README.md`.
//!
//! # Layout
//! - `server`: HTTP decoding, faults, request log, Vault's headers.
//! - `core`: state and the pipeline (token → ACL → route).
//! - `system`, `token`, `kubernetes`, `database`, `kv`, `pki`: the mounts.
//! - `expiration`: lease renew/revoke, expiry, token→lease coupling.
//! - `ttl`, `fields`, `policy`, `api`: Vault's rules for TTLs, request
//!   fields, ACLs and responses.
//! - `jwt`: ServiceAccount JWT minting for tests and the demo.
//! - `tls`: `-dev-tls`: a throwaway CA and server certificate.
//! - `proxy`: `--upstream`: forwarding to a real server behind the faults.

#![forbid(unsafe_code)]

mod api;
mod core;
mod database;
mod expiration;
mod fields;
mod glob;
mod ids;
pub mod jwt;
mod kubernetes;
mod kv;
mod pem;
mod pki;
mod policy;
pub mod proxy;
mod router;
mod server;
mod system;
mod testext;
pub mod tls;
mod token;
mod ttl;

#[cfg(feature = "testing")]
pub mod testing;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use jwt::{ServiceAccountIssuer, SigningAlg};
pub use tls::DevTls;

pub use system::VAULT_VERSION;

/// A running devvault. Dropping it stops the server.
pub struct DevVault {
    addr: SocketAddr,
    core: Arc<core::Core>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    tls: bool,
}

impl DevVault {
    /// Binds `listen` (port 0 picks a free port) and serves until dropped.
    pub async fn start(listen: SocketAddr, root_token: &str) -> std::io::Result<DevVault> {
        Self::serve(listen, root_token, None, None).await
    }

    /// Proxy mode: forwards every request outside `sys/devvault/` to
    /// `upstream` (a real Vault/OpenBao at `http://host:port`), applying
    /// injected faults and logging each request. `root_token` guards
    /// `sys/devvault/`; give the upstream's root token so one client
    /// configures both.
    pub async fn start_proxy(listen: SocketAddr, root_token: &str, upstream: &str) -> std::io::Result<DevVault> {
        let upstream = proxy::Upstream::parse(upstream).map_err(std::io::Error::other)?;
        Self::serve(listen, root_token, None, Some(upstream)).await
    }

    /// As `start`, serving HTTPS with `tls`'s server certificate.
    pub async fn start_tls(listen: SocketAddr, root_token: &str, tls: &DevTls) -> std::io::Result<DevVault> {
        let acceptor = tls.acceptor().map_err(std::io::Error::other)?;
        Self::serve(listen, root_token, Some(acceptor), None).await
    }

    async fn serve(
        listen: SocketAddr,
        root_token: &str,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        upstream: Option<proxy::Upstream>,
    ) -> std::io::Result<DevVault> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let core = core::Core::new(root_token, upstream);
        let cancel = CancellationToken::new();
        let tls = acceptor.is_some();
        let tasks = vec![
            tokio::spawn(server::serve(listener, acceptor, core.clone(), cancel.clone())),
            tokio::spawn(expiration::run(core.clone())),
        ];
        Ok(DevVault { addr, core, cancel, tasks, tls })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` (`https://` with TLS), the value for `VAULT_ADDR`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn root_token(&self) -> &str {
        &self.core.root_token
    }

    /// Users live in every `memory-database-plugin` connection, with their
    /// `VALID UNTIL` text.
    pub fn memory_users(&self) -> Vec<(String, String)> {
        database::memory_users(&self.core.state())
    }

    /// Number of leases the expiration manager tracks.
    pub fn lease_count(&self) -> usize {
        self.core.state().leases.len()
    }
}

impl Drop for DevVault {
    fn drop(&mut self) {
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}
