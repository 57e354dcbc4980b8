//! `agentic-probe`: runs the durability probe graph on a thread (starting it, or continuing it
//! after a crash), or one worker task of its current step. The crash, outage and worker tests
//! drive it as a real process and kill it.

use std::sync::Arc;

use agentic::probe::{self, ProbeShape};
use agentic_runtime::checkpoint::PostgresCheckpointer;
use agentic_runtime::{Error, Input, RunConfig, RunOutcome, TaskReport, Update};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Run the durability probe graph (used by the crash tests)")]
struct Cli {
    /// PostgreSQL URL of the checkpoint store (also holds the executions table).
    #[arg(long, env = "PROBE_DATABASE_URL")]
    database: String,
    /// Thread id.
    #[arg(long)]
    thread: String,
    /// Planner rounds.
    #[arg(long, default_value_t = 6)]
    rounds: u64,
    /// Workers per round.
    #[arg(long, default_value_t = 4)]
    width: u64,
    /// Longest pause inside a node, in milliseconds.
    #[arg(long, default_value_t = 30)]
    max_pause_ms: u64,
    /// Extra pause of every node after it recorded its execution, in milliseconds.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Leave the workers to `agentic-probe work` processes.
    #[arg(long)]
    remote_workers: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the thread, or continue it if it exists; print the final state as JSON.
    Run {
        /// Start a new run even if the thread exists (its last run must have finished).
        #[arg(long)]
        again: bool,
        /// Start a thread the runtime mints (`invoke_new`; `--thread` is not used): its id is
        /// the one its nodes record.
        #[arg(long, conflicts_with = "again")]
        new: bool,
    },
    /// Run one task of the thread's current step.
    Work {
        /// The task id.
        #[arg(long)]
        task: String,
    },
    /// Print the current step's tasks as JSON lines.
    Tasks,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let store = PostgresCheckpointer::connect(&cli.database).await.context("connecting to the checkpoint store")?;
    let pool = store.pool().clone();
    probe::prepare(&pool).await.context("creating the executions table")?;
    let shape = ProbeShape {
        rounds: cli.rounds,
        width: cli.width,
        max_pause_ms: cli.max_pause_ms,
        remote_workers: cli.remote_workers,
        hold_ms: cli.hold_ms,
    };
    let graph = probe::graph(shape, pool)?.with_checkpointer(Arc::new(store));
    match cli.command {
        Command::Run { again, new } => {
            let config = RunConfig { recursion_limit: 10_000, ..RunConfig::default() };
            let outcome = if new {
                graph.invoke_new(graph.new_thread(), Update::new(), &config).await?
            } else {
                let input = if !again && graph.get_state(&cli.thread).await?.is_some() {
                    Input::Continue
                } else {
                    Input::Start(Update::new())
                };
                graph.invoke(&cli.thread, input, &config).await?
            };
            match outcome {
                RunOutcome::Done(state) => println!("{}", state.to_json()),
                RunOutcome::Interrupted(i) => anyhow::bail!("unexpected interrupt: {i:?}"),
            }
        }
        Command::Work { task } => match graph.run_task(&cli.thread, &task).await {
            Ok(TaskReport::Accepted) => println!("accepted"),
            Ok(TaskReport::AlreadyReported) => println!("already-reported"),
            Ok(TaskReport::Interrupted(i)) => println!("interrupted {}", i.id),
            Err(Error::StaleTask { .. }) => {
                println!("stale");
                std::process::exit(3);
            }
            Err(e) => return Err(e.into()),
        },
        Command::Tasks => {
            for task in graph.current_tasks(&cli.thread).await? {
                println!("{}", serde_json::to_string(&task)?);
            }
        }
    }
    Ok(())
}
