//! `postgresql-database-plugin`: runs a role's statements on a real
//! PostgreSQL the way Vault's plugin does (vault-api.md §4.4).

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::sql::{quote_ident, split_statements, substitute};

pub struct PgPlugin {
    conn_str: String,
    root_password: String,
    client: Mutex<Option<Client>>,
}

const DEFAULT_RENEW: &str = "ALTER ROLE \"{{name}}\" VALID UNTIL '{{expiration}}';";
const DEFAULT_ROTATE_ROOT: &str = "ALTER ROLE \"{{username}}\" WITH PASSWORD '{{password}}';";

impl PgPlugin {
    pub fn new(connection_url: &str, username: &str, password: &str, disable_escaping: bool) -> Result<Self, String> {
        if connection_url.is_empty() {
            return Err("connection_url cannot be empty".into());
        }
        let esc = |s: &str| {
            if disable_escaping { s.to_string() } else { path_escape(s) }
        };
        let conn_str = connection_url
            .replace("{{username}}", &esc(username))
            .replace("{{password}}", &esc(password))
            .replace("{{name}}", &esc(username));
        Ok(PgPlugin { conn_str, root_password: password.to_string(), client: Mutex::new(None) })
    }

    /// PostgreSQL's own message, as Vault's lib/pq prints it (`pq: …`);
    /// tokio-postgres's `Display` says only "db error".
    fn pg_text(e: &tokio_postgres::Error) -> String {
        match e.as_db_error() {
            Some(db) => format!("pq: {}", db.message()),
            None => e.to_string(),
        }
    }

    /// Error texts never carry the root password (Vault replaces it too).
    fn sanitize(&self, e: impl std::fmt::Display) -> String {
        let text = e.to_string();
        if self.root_password.is_empty() { text } else { text.replace(&self.root_password, "[password]") }
    }

    async fn with_client<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let connect = tokio_postgres::connect(&self.conn_str, NoTls);
            let (client, connection) = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                .await
                .map_err(|_| "timeout connecting to the database".to_string())?
                .map_err(|e| self.sanitize(Self::pg_text(&e)))?;
            tokio::spawn(connection);
            *guard = Some(client);
        }
        let Some(client) = guard.as_mut() else {
            return Err("no database connection".into());
        };
        let result = f(client).await;
        if client.is_closed() {
            *guard = None;
        }
        result.map_err(|e| self.sanitize(Self::pg_text(&e)))
    }

    pub async fn verify(&self) -> Result<(), String> {
        self.with_client(async |c| c.simple_query("SELECT 1").await.map(|_| ())).await
    }

    async fn in_transaction(&self, queries: Vec<String>) -> Result<(), String> {
        self.with_client(async move |c| {
            let tx = c.transaction().await?;
            for q in &queries {
                tx.batch_execute(q).await?;
            }
            tx.commit().await
        })
        .await
    }

    pub async fn new_user(
        &self,
        statements: &[String],
        username: &str,
        password: &str,
        expiration: &str,
    ) -> Result<(), String> {
        if statements.iter().all(|s| s.trim().is_empty()) {
            return Err("empty creation statements".into());
        }
        let vars = [("name", username), ("username", username), ("password", password), ("expiration", expiration)];
        self.in_transaction(render(statements, &vars)).await
    }

    pub async fn update_expiration(
        &self,
        username: &str,
        expiration: &str,
        statements: &[String],
    ) -> Result<(), String> {
        let statements = if statements.is_empty() { vec![DEFAULT_RENEW.to_string()] } else { statements.to_vec() };
        let vars = [("name", username), ("username", username), ("expiration", expiration)];
        self.in_transaction(render(&statements, &vars)).await
    }

    pub async fn delete_user(&self, username: &str, statements: &[String]) -> Result<(), String> {
        if !statements.is_empty() {
            let vars = [("name", username), ("username", username)];
            return self.in_transaction(render(statements, &vars)).await;
        }
        self.default_revoke(username).await
    }

    /// Vault's default revocation: revoke what can be revoked, outside a
    /// transaction and continuing on errors, then drop the role.
    async fn default_revoke(&self, username: &str) -> Result<(), String> {
        let user = username.to_string();
        self.with_client(async move |c| {
            let exists = c.query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user]).await?;
            if exists.is_empty() {
                return Ok(Ok(()));
            }
            let q = quote_ident(&user);
            let mut queries = Vec::new();
            let schemas = c
                .query(
                    "SELECT DISTINCT table_schema FROM information_schema.role_column_grants WHERE grantee = $1",
                    &[&user],
                )
                .await?;
            for row in schemas {
                let schema: String = row.get(0);
                let s = quote_ident(&schema);
                queries.push(format!("REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA {s} FROM {q};"));
                queries.push(format!("REVOKE USAGE ON SCHEMA {s} FROM {q};"));
            }
            let db: String = c.query_one("SELECT current_database()", &[]).await?.get(0);
            queries.push(format!("REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM {q};"));
            queries.push(format!("REVOKE ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public FROM {q};"));
            queries.push(format!("REVOKE USAGE ON SCHEMA public FROM {q};"));
            queries.push(format!("REVOKE CONNECT ON DATABASE {} FROM {q};", quote_ident(&db)));
            let mut failures = Vec::new();
            for query in &queries {
                if let Err(e) = c.batch_execute(query).await {
                    failures.push(Self::pg_text(&e));
                }
            }
            if !failures.is_empty() {
                return Ok(Err(format!("could not perform all revocation statements: {}", failures.join("; "))));
            }
            c.batch_execute(&format!("DROP ROLE IF EXISTS {q};")).await?;
            Ok(Ok(()))
        })
        .await?
    }

    pub async fn rotate_root(&self, username: &str, new_password: &str, statements: &[String]) -> Result<(), String> {
        let statements =
            if statements.is_empty() { vec![DEFAULT_ROTATE_ROOT.to_string()] } else { statements.to_vec() };
        let vars = [("name", username), ("username", username), ("password", new_password)];
        self.in_transaction(render(&statements, &vars)).await
    }
}

fn render(statements: &[String], vars: &[(&str, &str)]) -> Vec<String> {
    split_statements(statements).into_iter().map(|q| substitute(&q, vars)).collect()
}

/// Go's `url.PathEscape`.
fn path_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || "-._~$&+,;=:@".contains(c) {
            out.push(c);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
