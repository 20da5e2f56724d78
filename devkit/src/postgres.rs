//! A real PostgreSQL server for the tests, the benchmark and `phm demo --postgres`:
//! the one named by `PHM_TEST_PG_DSN` (a superuser key/value connection string, as
//! `.ci/run` exports for the server it starts), or else one of our own from Debian's
//! packages — `initdb` in a temporary folder, run as the `postgres` user when we are
//! root, listening on 127.0.0.1 at a port chosen at run time, stopped when dropped.
//!
//! Under `CI=true` a missing server is an error (the run must not pass by skipping);
//! elsewhere [`Server::for_test`] says why it skips.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable naming an existing server to use.
pub const DSN_ENV: &str = "PHM_TEST_PG_DSN";

/// A running PostgreSQL server (ours or the environment's).
#[derive(Debug)]
pub struct Server {
    /// Superuser key/value connection string without a database.
    admin: String,
    /// Folder of `psql` and friends.
    bin: PathBuf,
    own: Option<Own>,
}

#[derive(Debug)]
struct Own {
    child: Child,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where Debian's server binaries are, if installed.
fn bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("postgres").exists() && dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program` run as the `postgres` user when we are root (the server refuses to run
/// as root), else as ourselves.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

impl Server {
    /// The environment's server, or one of our own; `Err` says why there is none.
    pub fn start() -> Result<Server, String> {
        let bin = bin_dir();
        if let Ok(dsn) = std::env::var(DSN_ENV) {
            let bin = bin
                .or_else(|| Some(PathBuf::from("/usr/bin")))
                .unwrap_or_default();
            let server = Server {
                admin: dsn,
                bin,
                own: None,
            };
            server
                .psql("postgres", "SELECT 1")
                .map_err(|e| format!("{DSN_ENV} names a server that does not answer: {e}"))?;
            return Ok(server);
        }
        let bin = bin.ok_or(
            "PostgreSQL's server is not installed (apt-get install postgresql), and PHM_TEST_PG_DSN is not set",
        )?;
        Server::start_own(bin)
    }

    fn start_own(bin: PathBuf) -> Result<Server, String> {
        Server::start_own_with(bin, None)
    }

    /// A server of our own (whatever `PHM_TEST_PG_DSN` says) that accepts TCP
    /// connections over TLS only, with this certificate and key (PEM): for the tests
    /// of the node's verified TLS to its warehouse.
    pub fn start_tls(cert_pem: &Path, key_pem: &Path) -> Result<Server, String> {
        let bin =
            bin_dir().ok_or("PostgreSQL's server is not installed (apt-get install postgresql)")?;
        Server::start_own_with(bin, Some((cert_pem, key_pem)))
    }

    fn start_own_with(bin: PathBuf, tls: Option<(&Path, &Path)>) -> Result<Server, String> {
        let dir = tempfile::Builder::new()
            .prefix("phm-pg-")
            .tempdir()
            .map_err(|e| format!("no temporary folder: {e}"))?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
        let mut tls_settings: Vec<String> = Vec::new();
        if let Some((cert, key)) = tls {
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, dir.path().join(to))
                    .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    dir.path().join("server.key"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .map_err(|e| format!("cannot protect the server key: {e}"))?;
            }
            let at = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
            tls_settings = vec![
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", at("server.crt")),
                "-c".into(),
                format!("ssl_key_file={}", at("server.key")),
            ];
        }
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("cannot give the temporary folder to the postgres user".into());
            }
        }
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if tls.is_some() {
            // TCP only over TLS: a connection that is not encrypted is rejected.
            let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
            std::fs::write(data.join("pg_hba.conf"), hba)
                .map_err(|e| format!("cannot write pg_hba.conf: {e}"))?;
        }
        let port = free_port()?;
        let child = as_server_user(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_preload_libraries=pg_stat_statements",
                "-c",
                "max_connections=200",
            ])
            .args(&tls_settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        let server = Server {
            admin: format!("host=127.0.0.1 port={port} user=postgres"),
            bin,
            own: Some(Own {
                child,
                data,
                _dir: dir,
            }),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match server.psql("postgres", "SELECT 1") {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the server did not start within 60 s: {e}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A server for a test, or `None` (having said why) when there is none and this is
    /// not CI. Under `CI=true` a missing server panics: the run must fail, not skip.
    pub fn for_test(test: &str) -> Option<Server> {
        match Server::start() {
            Ok(s) => Some(s),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("{test}: needs PostgreSQL under CI=true: {e}")
            }
            Err(e) => {
                eprintln!("{test}: skipped: {e}");
                None
            }
        }
    }

    /// The superuser connection string, without a database (what [`DSN_ENV`] holds).
    pub fn admin_dsn(&self) -> &str {
        &self.admin
    }

    /// The superuser connection string to database `db`.
    pub fn dsn(&self, db: &str) -> String {
        format!("{} dbname={db}", self.admin)
    }

    /// A connection string to `db` as `role` (trust or a password the caller set).
    pub fn dsn_as(&self, db: &str, role: &str) -> String {
        format!("{} dbname={db} user={role}", self.admin)
    }

    /// Creates database `db` (UTF-8, byte-order collation) and returns its name.
    pub fn create_database(&self, db: &str) -> Result<String, String> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{db}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"),
        )?;
        Ok(db.to_string())
    }

    /// A fresh database with a unique name starting `prefix`.
    pub fn fresh_database(&self, prefix: &str) -> Result<String, String> {
        use rand::Rng;
        let n: u64 = rand::thread_rng().r#gen();
        self.create_database(&format!("{prefix}_{n:016x}"))
    }

    /// Runs `sql` with psql in `db`; returns what it printed (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        self.psql_input(db, &["-c", sql], None)
    }

    /// Runs the script `file` with psql in `db`.
    pub fn psql_file(&self, db: &str, file: &Path) -> Result<String, String> {
        let f = file.to_string_lossy().into_owned();
        self.psql_input(db, &["-f", &f], None)
    }

    /// Runs `sql` (a `COPY … FROM STDIN`, say) with `input` on psql's standard input.
    pub fn psql_stdin(&self, db: &str, sql: &str, input: &[u8]) -> Result<String, String> {
        self.psql_input(db, &["-c", sql], Some(input))
    }

    fn psql_input(&self, db: &str, args: &[&str], input: Option<&[u8]>) -> Result<String, String> {
        use std::io::Write;
        let psql = if self.bin.join("psql").exists() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let mut child = Command::new(psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.dsn(db))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(data)
                .map_err(|e| format!("cannot write to psql: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("psql failed: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The PID of our own server's postmaster (for tests that stop it), if ours.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let own = self.own.as_ref()?;
        let text = std::fs::read_to_string(own.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.postmaster_pid();
        if let Some(own) = &mut self.own {
            // SIGINT is PostgreSQL's fast shutdown; the runuser wrapper then exits.
            if let Some(pid) = pid {
                let _ = Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status();
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = own.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = own.child.kill();
            let _ = own.child.wait();
        }
    }
}
