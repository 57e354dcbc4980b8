//! A human-review interrupt on the embedded SQLite store: a draft is written, the run stops
//! for review and is persisted; a second "process" (a fresh store handle) resumes it with the
//! reviewer's answer and it finishes.
//!
//! `cargo run --example human_review` (options: `--help`).

use std::sync::Arc;

use agentic_runtime::checkpoint::SqliteCheckpointer;
use agentic_runtime::{
    Channel, END, Graph, GraphBuilder, Input, Resume, RunConfig, RunOutcome, START, Update, node_fn,
};
use anyhow::Context as _;
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Stop a run for human review, resume it, finish it (SQLite store)")]
struct Args {
    /// SQLite file holding the checkpoints.
    #[arg(long, default_value = "agentic-example.db")]
    store: String,
    /// Thread id (default: a new one).
    #[arg(long)]
    thread: Option<String>,
    /// The reviewer's answer.
    #[arg(long, default_value = "approved")]
    answer: String,
}

fn graph() -> anyhow::Result<Graph> {
    Ok(GraphBuilder::new("human-review")
        .channel("topic", Channel::last_value())
        .channel("draft", Channel::last_value())
        .channel("review", Channel::last_value())
        .channel("log", Channel::append())
        .node(
            "draft",
            node_fn(|state, _| async move {
                let topic: String = state.get("topic")?;
                Ok(Update::new().set("draft", format!("Why {topic} matters")).set("log", "drafted"))
            }),
        )
        .node(
            "review",
            node_fn(|state, ctx| async move {
                let draft: String = state.get("draft")?;
                // Stops the run here the first time; returns the reviewer's answer on resume.
                let answer = ctx.interrupt(json!({"question": "Publish this draft?", "draft": draft}))?;
                Ok(Update::new().set("review", answer).set("log", "reviewed"))
            }),
        )
        .node("publish", node_fn(|_, _| async { Ok(Update::new().set("log", "published")) }))
        .edge(START, "draft")
        .edge("draft", "review")
        .edge("review", "publish")
        .edge("publish", END)
        .compile()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let thread = args.thread.unwrap_or_else(|| format!("review-{}", uuid_like()));
    let config = RunConfig::default();

    println!("store: {} (SQLite), thread: {thread}", args.store);
    let store = Arc::new(SqliteCheckpointer::open(&args.store).await.context("opening the store")?);
    let first = graph()?.with_checkpointer(store);
    let outcome = first.invoke(&thread, Input::Start(Update::new().set("topic", "durable agents")), &config).await?;
    let RunOutcome::Interrupted(interrupts) = outcome else { anyhow::bail!("the run did not stop for review") };
    println!("1. run stopped for review at node `{}`: {}", interrupts[0].node, interrupts[0].value);
    let stored = first.get_state(&thread).await?.context("thread not stored")?;
    println!("   persisted: checkpoint {} after step {}, next: {:?}", stored.checkpoint, stored.step, stored.next);
    drop(first);

    // A new handle on the same file, as a restarted process would have.
    let store = Arc::new(SqliteCheckpointer::open(&args.store).await?);
    let second = graph()?.with_checkpointer(store);
    println!("2. resuming with answer {:?}", args.answer);
    let outcome = second.invoke(&thread, Input::Resume(Resume::Value(json!(args.answer))), &config).await?;
    let RunOutcome::Done(state) = outcome else { anyhow::bail!("the run stopped again") };
    println!("3. run finished: {}", state.to_json());
    let history = second.history(&thread, &agentic_runtime::checkpoint::ListFilter::default()).await?;
    println!("   {} checkpoints on the thread", history.len());
    Ok(())
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}", nanos ^ u128::from(std::process::id()))
}
