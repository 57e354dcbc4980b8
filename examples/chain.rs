//! A three-node chain with reducers, checkpointed to SQLite (or any store URL).
//!
//! `cargo run --example chain -- --store sqlite://chain.db` (options: `--help`).

use agentic_runtime::checkpoint::{self, ListFilter};
use agentic_runtime::{Channel, END, GraphBuilder, Input, RunConfig, START, Update, node_fn};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Run a three-node chain and print its history")]
struct Args {
    /// Checkpoint store: a SQLite path, `sqlite://path`, `postgres://...`, or `memory:`.
    #[arg(long, default_value = "agentic-example.db")]
    store: String,
    /// Thread id.
    #[arg(long, default_value = "chain-demo")]
    thread: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let step =
        |name: &'static str| node_fn(move |_, _| async move { Ok(Update::new().set("steps", 1).set("trail", name)) });
    let graph = GraphBuilder::new("chain")
        .channel("steps", Channel::sum())
        .channel("trail", Channel::append())
        .node("fetch", step("fetch"))
        .node("think", step("think"))
        .node("answer", step("answer"))
        .edge(START, "fetch")
        .edge("fetch", "think")
        .edge("think", "answer")
        .edge("answer", END)
        .compile()?
        .with_checkpointer(checkpoint::connect(&args.store).await?);
    // A finished thread takes new input on top of its state, like a conversation.
    let outcome = graph.invoke(&args.thread, Input::Start(Update::new()), &RunConfig::default()).await?;
    println!("state: {}", outcome.state().map(agentic_runtime::State::to_json).unwrap_or_default());
    for c in graph.history(&args.thread, &ListFilter { limit: Some(5), ..Default::default() }).await? {
        println!("checkpoint {:>4}  step {:>3}  {:?}", c.id, c.step, c.source);
    }
    Ok(())
}
