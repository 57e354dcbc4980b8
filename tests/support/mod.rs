//! Shared fixtures of the cross-crate tests: a fresh PostgreSQL database per test, and the
//! durability probe as a real child process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test binary uses a subset

use std::process::Stdio;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};

/// The server tests run against (`DATABASE_URL`, set in .cargo/config.toml).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database made for one test, dropped when the test ends well.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new(prefix: &str) -> TestDb {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("PostgreSQL is not reachable at DATABASE_URL");
        let name = format!("{prefix}_{}_{}", std::process::id(), rand::random::<u32>());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
        let url = match admin_url().rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("DATABASE_URL has no database part"),
        };
        let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
        TestDb { name, url, pool }
    }

    /// Terminates every other session on this test's database (an outage for its clients).
    pub async fn terminate_sessions(&self) -> u64 {
        let admin = PgPoolOptions::new().max_connections(1).connect(&admin_url()).await.unwrap();
        let killed: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&admin)
        .await
        .unwrap();
        killed.len() as u64
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        let admin = PgPoolOptions::new().max_connections(1).connect(&admin_url()).await.unwrap();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&admin)
            .await;
    }
}

/// The probe binary built with this package.
pub fn probe(db: &TestDb, thread: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentic-probe"));
    cmd.arg("--database").arg(&db.url).arg("--thread").arg(thread).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd
}

/// Sends SIGKILL: no cleanup, no flush, like the OOM killer.
pub fn sigkill(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Waits for a child and returns (success, stdout, stderr).
pub async fn finish(child: Child, limit: Duration) -> (bool, String, String) {
    let out = tokio::time::timeout(limit, child.wait_with_output()).await.expect("probe hung").unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
