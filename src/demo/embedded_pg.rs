//! A throwaway PostgreSQL cluster for the test suite, the `demo` subcommand and the benchmark.
//!
//! [`EmbeddedPg::start`] runs `initdb` into a fresh temporary directory, starts the server on a free
//! 127.0.0.1 port with `wal_level=logical` (what the relay needs), and waits until it accepts
//! connections. Dropping the value (or calling [`EmbeddedPg::destroy`]) stops the server the way
//! `pg_ctl stop -m immediate` does and deletes the directory. A small watchdog process does the
//! same if this process dies without running destructors (SIGKILL, a CI timeout), so no stray
//! `postgres` is left behind.
//!
//! The postmaster is our own child process rather than one daemonized by `pg_ctl start`: we see
//! at once when it exits during start-up, we reap it (some containers' PID 1 never reaps orphans,
//! leaving `<defunct>` postgres entries), and a terminal Ctrl-C reaches it too, which PostgreSQL
//! treats as a fast shutdown. Stopping sends the same signals `pg_ctl stop` sends.
//!
//! Starting is synchronous on purpose: it only runs short external commands, and a sync API lets a
//! process-wide cluster be shared by tests that each run their own tokio runtime.
//!
//! Binaries: `$PG_BIN` if set, else the highest version in `/usr/lib/postgresql/*/bin` (Debian's
//! layout), else `initdb`/`postgres` on `PATH`. Both refuse to run as root, so when this process
//! is root they run as the `postgres` system user and the directory is given to that user.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The Django project's tables (auth_user, operators_*) with 20 operators, as `migrate` leaves
/// them. Loaded by the tests and the demo into each fresh database.
pub const DJANGO_FIXTURE: &str = include_str!("../../tests/fixtures/django_operators.sql");

/// How long a start may wait for the server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often start-up readiness is polled.
const START_POLL: Duration = Duration::from_millis(20);
/// Another process may grab the port between our probe and the server's bind; try a few others.
const PORT_ATTEMPTS: usize = 8;
/// Lines of the server log quoted in a start error.
const LOG_TAIL_LINES: usize = 30;

/// Why the throwaway cluster could not be created or used. Everything here is permanent for the
/// caller (a test or the demo): it needs a fix on the machine, not a retry — except
/// [`EmbeddedPgError::Sql`], whose [`tokio_postgres::Error`] says what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found: looked in {searched}. \
         Install the Debian package `postgresql` (apt-get install postgresql) \
         or set PG_BIN to the directory holding initdb and postgres"
    )]
    BinariesNotFound { searched: String },

    #[error(
        "running as root, but there is no `postgres` system user to run initdb/postgres as \
         (PostgreSQL refuses to run as root); install the Debian package `postgresql` or create the user"
    )]
    NoPostgresUser,

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}): {output}")]
    Command { command: String, status: String, output: String },

    #[error("PostgreSQL did not start: {reason}\n--- last lines of {log} ---\n{log_tail}")]
    StartFailed { reason: String, log: String, log_tail: String },

    #[error("invalid database name {0:?}: use 1 to 63 characters among a-z, 0-9 and _")]
    InvalidDatabaseName(String),

    #[error("SQL on the throwaway cluster failed: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmbeddedPgError {
    let what = what.into();
    move |source| EmbeddedPgError::Io { what, source }
}

/// Where `initdb` and `postgres` live.
#[derive(Debug, Clone)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

impl Binaries {
    fn find() -> Result<Binaries, EmbeddedPgError> {
        if let Some(dir) = std::env::var_os("PG_BIN") {
            let dir = PathBuf::from(dir);
            let found = Binaries { initdb: dir.join("initdb"), postgres: dir.join("postgres") };
            // An explicit PG_BIN that is wrong is an error, not a reason to silently pick another
            // version.
            return if found.initdb.is_file() && found.postgres.is_file() {
                Ok(found)
            } else {
                Err(EmbeddedPgError::BinariesNotFound { searched: format!("PG_BIN={}", dir.display()) })
            };
        }

        if let Some(found) = Self::highest_debian_version(Path::new("/usr/lib/postgresql")) {
            return Ok(found);
        }

        let on_path = |name: &str| {
            std::env::var_os("PATH")
                .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()))
        };
        match (on_path("initdb"), on_path("postgres")) {
            (Some(initdb), Some(postgres)) => Ok(Binaries { initdb, postgres }),
            _ => Err(EmbeddedPgError::BinariesNotFound {
                searched: "$PG_BIN (unset), /usr/lib/postgresql/*/bin and $PATH".into(),
            }),
        }
    }

    /// Debian installs each major version side by side; the newest one is the best bet.
    fn highest_debian_version(root: &Path) -> Option<Binaries> {
        let mut best: Option<(Vec<u32>, PathBuf)> = None;
        for entry in fs::read_dir(root).ok()?.flatten() {
            let name = entry.file_name();
            let Some(version) =
                name.to_str().and_then(|v| v.split('.').map(|n| n.parse::<u32>().ok()).collect::<Option<Vec<_>>>())
            else {
                continue;
            };
            let bin = entry.path().join("bin");
            if !bin.join("initdb").is_file() || !bin.join("postgres").is_file() {
                continue;
            }
            let newer = match &best {
                Some((v, _)) => version > *v,
                None => true,
            };
            if newer {
                best = Some((version, bin));
            }
        }
        best.map(|(_, bin)| Binaries { initdb: bin.join("initdb"), postgres: bin.join("postgres") })
    }
}

/// uid/gid of the `postgres` system user.
fn postgres_user() -> Result<(u32, u32), EmbeddedPgError> {
    let name = CString::new("postgres").map_err(|_| EmbeddedPgError::NoPostgresUser)?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized memory owned by this frame; the
    // reentrant variant is used because tests call this from several threads.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(EmbeddedPgError::NoPostgresUser);
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// A port nobody listens on right now. Racy by nature (the server binds later), hence the
/// retries in [`EmbeddedPg::start`].
fn free_port() -> Result<u16, EmbeddedPgError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding 127.0.0.1:0"))?;
    let port = listener.local_addr().map_err(io_err("reading the probe socket's port"))?.port();
    Ok(port)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a test may add to a cluster: TLS settings, its own pg_hba.conf, and
/// the files they name (certificates, keys), written into the data directory
/// with mode 0600 and owned by the server's user, as PostgreSQL requires of a
/// key file.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Lines appended to the generated settings, e.g. `ssl = on`.
    pub extra_conf: String,
    /// Replaces initdb's pg_hba.conf when set.
    pub hba: Option<String>,
    /// (file name in the data directory, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A running, private PostgreSQL cluster in a temporary directory. See the module docs.
pub struct EmbeddedPg {
    bins: Binaries,
    /// Some((uid, gid)) when we are root and must run the server tools as `postgres`.
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// The running postmaster; None once stopped.
    server: Mutex<Option<Child>>,
    watchdog: Mutex<Option<Child>>,
    destroyed: AtomicBool,
    extra_conf: String,
}

impl std::fmt::Debug for EmbeddedPg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPg").field("port", &self.port).field("data_dir", &self.data).finish_non_exhaustive()
    }
}

impl EmbeddedPg {
    /// Creates and starts a brand-new cluster; returns once it accepts connections (about a
    /// second: initdb is most of it). Blocking: from async code, call it in `spawn_blocking`.
    pub fn start() -> Result<EmbeddedPg, EmbeddedPgError> {
        Self::start_with(ClusterOptions::default())
    }

    /// [`Self::start`], with extra settings, pg_hba.conf and files (see [`ClusterOptions`]).
    pub fn start_with(options: ClusterOptions) -> Result<EmbeddedPg, EmbeddedPgError> {
        let bins = Binaries::find()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 { Some(postgres_user()?) } else { None };

        // As root the server runs as `postgres`, which must be able to reach the directory: /tmp
        // is world-traversable whereas $TMPDIR might sit under /root.
        let base = if run_as.is_some() { PathBuf::from("/tmp") } else { std::env::temp_dir() };
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-")
            .tempdir_in(&base)
            .map_err(io_err(format!("creating a temporary directory in {}", base.display())))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io_err(format!("giving {} to the postgres user", dir.path().display())))?;
        }

        let mut pg = EmbeddedPg {
            bins,
            run_as,
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            dir,
            port: 0,
            server: Mutex::new(None),
            watchdog: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            extra_conf: options.extra_conf.clone(),
        };
        // From here on, Drop cleans up whatever got created.
        pg.spawn_watchdog();
        pg.initdb()?;
        pg.install(&options)?;
        pg.start_on_free_port()?;
        Ok(pg)
    }

    /// The TCP port the server listens on (127.0.0.1 only); unchanged by [`Self::restart_immediate`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/dbname` (trust authentication, no password).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, dbname)
    }

    /// The cluster's data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server's log file (stderr of the postmaster).
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// Creates an empty database `name` (1–63 chars of `a-z0-9_`) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, EmbeddedPgError> {
        create_database_at(&self.url("postgres"), name).await?;
        Ok(self.url(name))
    }

    /// Simulates a crash: stops the server like `pg_ctl stop -m immediate` (SIGQUIT: no
    /// checkpoint, so the next start runs crash recovery), then starts it again on the same port.
    /// Committed data survives. Existing connections are cut.
    pub fn restart_immediate(&self) -> Result<(), EmbeddedPgError> {
        self.signal_and_wait(libc::SIGQUIT);
        self.start_server(self.port).map_err(|(e, _port_in_use)| e)
    }

    /// Stops the server cleanly, like `pg_ctl stop -m fast` (SIGINT), and keeps the directory
    /// until drop. Does nothing if the server is already down.
    pub fn stop(&self) {
        self.signal_and_wait(libc::SIGINT);
    }

    /// Stops the server at once and deletes its directory; idempotent. Drop calls it; it is public
    /// for owners that are never dropped (a `static` shared by tests, stopped from an atexit hook).
    pub fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut guard) = self.watchdog.lock() {
            if let Some(mut child) = guard.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.signal_and_wait(libc::SIGQUIT);
        let _ = fs::remove_dir_all(self.dir.path());
    }

    /// Sends the postmaster a shutdown signal (SIGINT fast, SIGQUIT immediate — PostgreSQL's
    /// documented shutdown modes) and reaps it. The postmaster only exits once its backends have,
    /// so the wait is bounded by PostgreSQL's own shutdown logic.
    fn signal_and_wait(&self, signal: libc::c_int) {
        let Ok(mut guard) = self.server.lock() else {
            return;
        };
        if let Some(mut child) = guard.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: plain kill(2) on our own, not yet reaped, child: the pid cannot have been
                // reused.
                unsafe {
                    libc::kill(pid, signal);
                }
            }
            let _ = child.wait();
        }
    }

    /// A `sh` process that waits for EOF on its stdin — which happens when this process exits for
    /// any reason, including SIGKILL — then stops the server and removes the directory. Drop and
    /// atexit hooks cover orderly exits; this covers kills and CI timeouts. It runs in its own
    /// process group so the terminal's Ctrl-C does not kill it before it has done its job.
    fn spawn_watchdog(&mut self) {
        // The /proc check avoids signalling an unrelated process that reused a stale pid. The
        // postmaster deletes postmaster.pid as it exits (pg_ctl waits on that too); its process
        // may linger as a zombie where PID 1 does not reap, so `kill -0` would wait in vain.
        const SCRIPT: &str = r#"
            read _unused
            pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
                comm=$(cat "/proc/$pid/comm" 2>/dev/null || echo postgres)
                case "$comm" in postgres*)
                    kill -QUIT "$pid"
                    i=0
                    while [ -e "$1/data/postmaster.pid" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
                esac
            fi
            rm -rf "$1"
        "#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("outbox-relay-pg-watchdog")
            .arg(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        // Without a watchdog only an abnormal exit leaks the cluster; not worth failing over.
        if let Ok(child) = child {
            if let Ok(mut guard) = self.watchdog.lock() {
                *guard = Some(child);
            }
        }
    }

    /// A command for a server program, run as `postgres` when we are root. std's `uid`/`gid` do
    /// what `runuser -u postgres --` would (drop supplementary groups, setgid, setuid) without
    /// needing util-linux or a PAM session.
    fn tool(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        // The environment must not steer the tools to another cluster or port.
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGHOSTADDR", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
            cmd.env_remove(var);
        }
        // A working directory the postgres user can enter (ours may be /root).
        cmd.current_dir(self.dir.path());
        cmd.stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn run(&self, mut cmd: Command) -> Result<(), EmbeddedPgError> {
        let described = format!("{cmd:?}");
        let out = cmd.output().map_err(io_err(format!("running {described}")))?;
        if out.status.success() {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stderr).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stdout));
        Err(EmbeddedPgError::Command {
            command: described,
            status: out.status.to_string(),
            output: tail(output.trim(), LOG_TAIL_LINES),
        })
    }

    fn initdb(&self) -> Result<(), EmbeddedPgError> {
        let mut cmd = self.tool(&self.bins.initdb);
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            // The C locale always exists, whereas LANG may name one the machine lacks, which
            // makes initdb fail.
            .arg("--no-locale");
        self.run(cmd)?;

        // The settings live in the data directory (not on the command line) so a restart, or a
        // human running pg_ctl by hand while debugging, gets the same server.
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .map_err(io_err("opening postgresql.conf"))?;
        conf.write_all(b"\ninclude_if_exists = 'embedded.conf'\n").map_err(io_err("appending to postgresql.conf"))?;
        Ok(())
    }

    /// Writes the options' pg_hba.conf and files into the data directory.
    fn install(&self, options: &ClusterOptions) -> Result<(), EmbeddedPgError> {
        use std::os::unix::fs::PermissionsExt;
        let mut files = options.files.clone();
        if let Some(hba) = &options.hba {
            files.push(("pg_hba.conf".into(), hba.clone().into_bytes()));
        }
        for (name, contents) in files {
            let path = self.data.join(&name);
            fs::write(&path, contents).map_err(io_err(format!("writing {}", path.display())))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("chmod {}", path.display())))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(io_err(format!("giving {} to the postgres user", path.display())))?;
            }
        }
        Ok(())
    }

    fn write_settings(&self, port: u16) -> Result<(), EmbeddedPgError> {
        // fsync=off makes commits cheap; synchronous_commit stays on because with it off a commit
        // can still sit in shared WAL buffers when `restart_immediate` kills the server, and crash
        // tests must be able to rely on "committed means durable".
        let socket_dir = self.dir.path().display().to_string().replace('\'', "''");
        let settings = format!(
            "# Written by outbox-relay's EmbeddedPg: a throwaway cluster, tuned for speed, not safety.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{socket_dir}'\n\
             wal_level = logical\n\
             max_replication_slots = 64\n\
             max_wal_senders = 64\n\
             wal_sender_timeout = '10s'\n\
             fsync = off\n\
             synchronous_commit = on\n\
             full_page_writes = off\n\
             shared_buffers = '128MB'\n\
             max_connections = 200\n\
             {extra}\n",
            extra = self.extra_conf
        );
        fs::write(self.data.join("embedded.conf"), settings).map_err(io_err("writing embedded.conf"))
    }

    fn start_on_free_port(&mut self) -> Result<(), EmbeddedPgError> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match self.start_server(port) {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err((e, true)) => last_err = Some(e),
                Err((e, false)) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| EmbeddedPgError::StartFailed {
            reason: "no free port".into(),
            log: self.log.display().to_string(),
            log_tail: String::new(),
        }))
    }

    /// Starts the server on `port` and waits until it accepts connections; the error's flag says
    /// whether another port might work.
    fn start_server(&self, port: u16) -> Result<(), (EmbeddedPgError, bool)> {
        let fail = |e: EmbeddedPgError| (e, false);
        self.write_settings(port).map_err(fail)?;
        let log_start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| fail(io_err("opening the server log")(e)))?;
        let log2 = log.try_clone().map_err(|e| fail(io_err("opening the server log")(e)))?;

        let mut cmd = self.tool(&self.bins.postgres);
        cmd.arg("-D").arg(&self.data).stdout(log).stderr(log2);
        let mut child =
            cmd.spawn().map_err(|e| fail(io_err(format!("running {}", self.bins.postgres.display()))(e)))?;

        let deadline = Instant::now() + START_TIMEOUT;
        let reason = loop {
            match child.try_wait() {
                Ok(Some(status)) => break format!("the server exited during start-up ({status})"),
                Ok(None) => {}
                Err(e) => break format!("cannot watch the server process: {e}"),
            }
            if self.is_ready(child.id(), port) {
                if let Ok(mut guard) = self.server.lock() {
                    *guard = Some(child);
                    return Ok(());
                }
                break "internal lock poisoned".to_string();
            }
            if Instant::now() >= deadline {
                break format!("not accepting connections after {START_TIMEOUT:?}");
            }
            std::thread::sleep(START_POLL);
        };

        // Whatever went wrong, no half-started server may outlive the error.
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGQUIT);
            }
        }
        let _ = child.wait();

        let this_attempt = self.read_log_from(log_start);
        let port_in_use = this_attempt.contains("Address already in use");
        Err((
            EmbeddedPgError::StartFailed {
                reason,
                log: self.log.display().to_string(),
                log_tail: tail(&this_attempt, LOG_TAIL_LINES),
            },
            port_in_use,
        ))
    }

    /// Ready the way `pg_ctl start -w` judges it: postmaster.pid names our process and its status
    /// line says "ready" (PostgreSQL 10+ writes it). The TCP connect then proves the port is ours.
    fn is_ready(&self, pid: u32, port: u16) -> bool {
        let Ok(pidfile) = fs::read_to_string(self.data.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = pidfile.lines().collect();
        if lines.first().map(|l| l.trim()) != Some(pid.to_string().as_str()) {
            return false;
        }
        // Line 8 is the postmaster status. It is appended after the sockets are listening, so
        // its absence means "not yet" (and PostgreSQL < 10, which never writes it, is long out
        // of support); during crash recovery it says "starting" while connections are refused.
        if lines.get(7).map(|l| l.trim()) != Some("ready") {
            return false;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }

    fn read_log_from(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let mut bytes = Vec::new();
            if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_end(&mut bytes).is_ok() {
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        text
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Connects to `url` and spawns the connection task on the current tokio runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, EmbeddedPgError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // The connection ends when the client is dropped or the server goes away (e.g. a crash
        // test); neither is worth reporting here — the client's next call returns the error.
        let _ = connection.await;
    });
    Ok(client)
}

/// Creates database `name` through the maintenance database at `admin_url`. Shared with test
/// helpers that target an external server (TEST_DATABASE_URL).
pub async fn create_database_at(admin_url: &str, name: &str) -> Result<(), EmbeddedPgError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(EmbeddedPgError::InvalidDatabaseName(name.to_string()));
    }
    let client = connect(admin_url).await?;
    // CREATE DATABASE cannot take a bind parameter; the name was validated above.
    client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn debian_layout_prefers_highest_version() {
        let root = tempfile::tempdir().expect("tempdir");
        for v in ["9.6", "13", "16", "notaversion"] {
            let bin = root.path().join(v).join("bin");
            fs::create_dir_all(&bin).expect("mkdir");
            fs::write(bin.join("initdb"), "").expect("write");
            fs::write(bin.join("postgres"), "").expect("write");
        }
        // A version directory without binaries (e.g. only client packages) is skipped.
        fs::create_dir_all(root.path().join("17").join("bin")).expect("mkdir");
        let found = Binaries::highest_debian_version(root.path()).expect("found");
        assert_eq!(found.initdb, root.path().join("16/bin/initdb"));
    }
}
