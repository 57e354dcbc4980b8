//! Map-reduce: a planner fans out one task per item with Send packets; the tasks run
//! concurrently in one super-step; their writes are applied in task order; a reducer joins.
//!
//! `cargo run --example map_reduce -- --items 8` (options: `--help`).

use std::time::Duration;

use agentic_runtime::checkpoint;
use agentic_runtime::{Channel, END, Goto, GraphBuilder, Input, RunConfig, START, Update, node_fn};
use clap::Parser;
use serde_json::Value;

#[derive(Parser)]
#[command(about = "Fan out one task per item, then reduce")]
struct Args {
    /// Checkpoint store: a SQLite path, `sqlite://path`, `postgres://...`, or `memory:`.
    #[arg(long, default_value = "agentic-example.db")]
    store: String,
    /// How many items to map.
    #[arg(long, default_value_t = 5)]
    items: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let graph = GraphBuilder::new("map-reduce")
        .channel("items", Channel::last_value())
        .channel("lengths", Channel::append())
        .channel("total", Channel::sum())
        .node(
            "plan",
            node_fn(move |_, _| async move {
                let items: Vec<String> = (1..=args.items).map(|i| "page".repeat(i as usize)).collect();
                Update::new().set_typed("items", &items)
            }),
        )
        .node(
            "measure",
            node_fn(|_, ctx| async move {
                let item = ctx.arg().and_then(Value::as_str).ok_or("measure needs an item")?.to_owned();
                // Later items finish first; the result order still follows the task order.
                tokio::time::sleep(Duration::from_millis(200 / item.len() as u64)).await;
                ctx.emit(format!("measured {} bytes", item.len()));
                Ok(Update::new().set("lengths", item.len()).set("total", item.len()))
            }),
        )
        .node("report", node_fn(|_, _| async { Ok(Update::new()) }))
        .conditional(
            "plan",
            |state| {
                Ok(state.get::<Vec<String>>("items")?.into_iter().map(|item| Goto::send("measure", item)).collect())
            },
            ["measure"],
        )
        .edge(START, "plan")
        .edge("measure", "report")
        .edge("report", END)
        .compile()?
        .with_checkpointer(checkpoint::connect(&args.store).await?);
    let thread = format!("map-{}", std::process::id());
    let outcome = graph.invoke(&thread, Input::Start(Update::new()), &RunConfig::default()).await?;
    let state = outcome.state().map(agentic_runtime::State::to_json).unwrap_or_default();
    println!("lengths (task order): {}", state["lengths"]);
    println!("total: {}", state["total"]);
    Ok(())
}
