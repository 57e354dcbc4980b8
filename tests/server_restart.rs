//! Outage test, server side: a private PostgreSQL server (its own data directory and port, so
//! other tests are not disturbed) is crash-restarted (`pg_ctl restart -m immediate`) twice
//! while the probe graph runs on it. The run backs off, reconnects and finishes with the state
//! of an undisturbed run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentic::probe::{self, ProbeShape};
use agentic_runtime::checkpoint::PostgresCheckpointer;
use agentic_runtime::{Input, RunConfig, Update};
use sqlx::postgres::PgPoolOptions;

const SHAPE: ProbeShape = ProbeShape { rounds: 40, width: 3, max_pause_ms: 40, remote_workers: false, hold_ms: 0 };

/// A throwaway PostgreSQL server owned by the `postgres` user, stopped on drop.
struct PrivateServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivateServer {
    fn start() -> PrivateServer {
        let version =
            std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL server binaries").next().unwrap().unwrap();
        let bin = version.path().join("bin");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("agentic-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chown = Command::new("chown").arg("postgres").arg(&dir).status().unwrap();
        assert!(chown.success(), "chown of {} failed", dir.display());
        let data = dir.join("data");
        run_as_postgres(
            &bin.join("initdb"),
            &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        let server = PrivateServer { dir, bin, port };
        server.pg_ctl(&["start", "-w"]);
        server
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.display());
        let log = self.dir.join("log");
        let mut all = vec!["-D", data.to_str().unwrap(), "-o", &opts, "-l", log.to_str().unwrap()];
        all.extend_from_slice(args);
        run_as_postgres(&self.bin.join("pg_ctl"), &all);
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap_or_default(), "stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_as_postgres(program: &Path, args: &[&str]) {
    let out = Command::new("runuser").args(["-u", "postgres", "--"]).arg(program).args(args).output().unwrap();
    assert!(out.status.success(), "{} {args:?}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_survives_a_crash_restart_of_the_server() {
    let server = PrivateServer::start();
    let store = Arc::new(PostgresCheckpointer::connect(&server.url()).await.unwrap());
    let pool = PgPoolOptions::new().max_connections(4).connect(&server.url()).await.unwrap();
    probe::prepare(&pool).await.unwrap();
    let graph = probe::graph(SHAPE, pool.clone()).unwrap().with_checkpointer(store);
    let config = RunConfig { recursion_limit: 1000, ..RunConfig::default() };

    let reference = graph.invoke("reference", Input::Start(Update::new()), &config).await.unwrap();
    let expected = probe::normalized(&reference.state().unwrap().to_json());

    let run = {
        let (graph, config) = (graph.clone(), config.clone());
        tokio::spawn(async move { graph.invoke("disturbed", Input::Start(Update::new()), &config).await })
    };
    let mut restarts = 0;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if run.is_finished() {
            break;
        }
        let server = &server;
        tokio::task::block_in_place(|| server.pg_ctl(&["restart", "-m", "immediate", "-w"]));
        restarts += 1;
    }
    let outcome = tokio::time::timeout(Duration::from_mins(2), run).await.unwrap().unwrap().unwrap();
    assert_eq!(restarts, 2, "the run ended before the server could be restarted twice");
    let state = outcome.state().unwrap().to_json();
    assert_eq!(probe::normalized(&state), expected);
    let audit = probe::audit(&pool, "disturbed", &state).await.unwrap();
    assert!(audit.problems.iter().all(|p| !p.contains("twice")), "{:?}", audit.problems);
}
