//! PostgreSQL for the integration tests: one throwaway cluster per test binary, one fresh database
//! per test.
//!
//! [`cluster`] starts an [`EmbeddedPg`] the first time a test asks (synchronously, so tests with
//! different tokio runtimes can share it) and stops it from an `atexit` hook, because statics are
//! never dropped and a `cargo test` run must not leave a `postgres` behind. With
//! `TEST_DATABASE_URL` set (a superuser URL to a server with `wal_level=logical`), that server is
//! used instead and nothing is started; its test databases are left for inspection.
//!
//! [`fresh_db`] gives each test its own database with the Django fixture loaded, so tests can run
//! in parallel without seeing each other's rows.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use outbox_relay::demo::embedded_pg::{self, EmbeddedPg, EmbeddedPgError, DJANGO_FIXTURE};

/// The server the tests talk to.
pub struct PgServer {
    embedded: Option<EmbeddedPg>,
    /// TEST_DATABASE_URL, when set.
    external: Option<String>,
}

impl PgServer {
    /// The embedded cluster, unless the tests run against TEST_DATABASE_URL.
    pub fn embedded(&self) -> Option<&EmbeddedPg> {
        self.embedded.as_ref()
    }

    pub fn port(&self) -> u16 {
        match (&self.embedded, &self.external) {
            (Some(pg), _) => pg.port(),
            (None, Some(url)) => {
                url.parse::<tokio_postgres::Config>().ok().and_then(|c| c.get_ports().first().copied()).unwrap_or(5432)
            }
            (None, None) => unreachable!("PgServer is built with one of the two"),
        }
    }

    /// URL of database `dbname` on this server.
    pub fn url(&self, dbname: &str) -> String {
        match (&self.embedded, &self.external) {
            (Some(pg), _) => pg.url(dbname),
            (None, Some(url)) => with_dbname(url, dbname),
            (None, None) => unreachable!("PgServer is built with one of the two"),
        }
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, EmbeddedPgError> {
        match &self.embedded {
            Some(pg) => pg.create_database(name).await,
            None => {
                embedded_pg::create_database_at(&self.url("postgres"), name).await?;
                Ok(self.url(name))
            }
        }
    }

    /// Crash and restart the server on the same port. Only the embedded cluster can; note it
    /// drops every other test's connections, so crash tests should rather start their own
    /// [`EmbeddedPg`].
    pub fn restart_immediate(&self) -> Result<(), EmbeddedPgError> {
        match &self.embedded {
            Some(pg) => pg.restart_immediate(),
            None => panic!("restart_immediate needs the embedded cluster: unset TEST_DATABASE_URL"),
        }
    }

    /// Data directory of the embedded cluster.
    pub fn data_dir(&self) -> &Path {
        match &self.embedded {
            Some(pg) => pg.data_dir(),
            None => panic!("no data directory with TEST_DATABASE_URL"),
        }
    }
}

/// Replaces the database part of a postgres:// URL, keeping user, host and query parameters.
pub fn with_dbname(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{}", &base[..authority_end], dbname);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();

extern "C" fn destroy_cluster_at_exit() {
    if let Some(Ok(PgServer { embedded: Some(pg), .. })) = SERVER.get() {
        pg.destroy();
    }
}

/// The process-wide server, started on first use. Panics (failing the calling test) with the
/// reason if PostgreSQL cannot be started; later calls report the same reason without retrying.
pub fn cluster() -> &'static PgServer {
    let server = SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
            if !url.trim().is_empty() {
                return Ok(PgServer { embedded: None, external: Some(url) });
            }
        }
        let pg = EmbeddedPg::start().map_err(|e| e.to_string())?;
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(destroy_cluster_at_exit);
        }
        Ok(PgServer { embedded: Some(pg), external: None })
    });
    match server {
        Ok(server) => server,
        Err(reason) => panic!("cannot start the test PostgreSQL cluster: {reason}"),
    }
}

/// A database of its own for one test, with the Django fixture loaded.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A new connection to this database, driven on the current tokio runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        embedded_pg::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to test database {}: {e}", self.name))
    }
}

/// Creates a uniquely named database (`<prefix>_<pid>_<n>_<random>`) holding the Django fixture.
pub async fn fresh_db(prefix: &str) -> TestDb {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut clean: String =
        prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    clean.truncate(30);
    // pid and counter make names unique within a run; the random part across runs sharing a
    // TEST_DATABASE_URL server.
    let name = format!(
        "t_{clean}_{}_{}_{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    );
    let server = cluster();
    let url = server.create_database(&name).await.unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    let db = TestDb { name, url };
    db.client()
        .await
        .batch_execute(DJANGO_FIXTURE)
        .await
        .unwrap_or_else(|e| panic!("loading the Django fixture into {}: {e}", db.name));
    db
}
