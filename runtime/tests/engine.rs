//! Engine semantics on the in-memory store: reducers, edges, fan-out and joins, Command,
//! interrupts, retries, timeouts, the journal, streaming, time travel, durability modes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentic_runtime::checkpoint::{ListFilter, Source};
use agentic_runtime::{
    Channel, Durability, END, Error, Event, Goto, Graph, GraphBuilder, Input, InterruptKind, MemoryCheckpointer,
    NodeError, Resume, RetryPolicy, RunConfig, RunOutcome, START, Update, node_fn,
};
use futures::StreamExt;
use serde_json::{Value, json};

fn start(values: Value) -> Input {
    let mut update = Update::new();
    let Value::Object(values) = values else { panic!("start takes an object") };
    for (k, v) in values {
        update = update.set(k, v);
    }
    Input::Start(update)
}

fn cfg() -> RunConfig {
    RunConfig::default()
}

async fn done(graph: &Graph, thread: &str, input: Input) -> Value {
    match graph.invoke(thread, input, &cfg()).await.unwrap() {
        RunOutcome::Done(state) => state.to_json(),
        RunOutcome::Interrupted(i) => panic!("interrupted: {i:?}"),
    }
}

/// A chain a -> b -> c where each node adds to a sum and appends its name.
fn chain() -> Graph {
    let step = |name: &'static str| {
        node_fn(move |_, _| async move { Ok(Update::new().set("count", 1).set("log", name).set("last", name)) })
    };
    GraphBuilder::new("chain")
        .channel("count", Channel::sum())
        .channel("log", Channel::append())
        .channel("last", Channel::last_value())
        .node("a", step("a"))
        .node("b", step("b"))
        .node("c", step("c"))
        .edge(START, "a")
        .edge("a", "b")
        .edge("b", "c")
        .edge("c", END)
        .compile()
        .unwrap()
}

#[tokio::test]
async fn chain_applies_each_reducer_once_per_write() {
    let state = done(&chain(), "t", start(json!({"count": 10}))).await;
    assert_eq!(state["count"], json!(13));
    assert_eq!(state["log"], json!(["a", "b", "c"]));
    assert_eq!(state["last"], json!("c"));
}

#[tokio::test]
async fn history_lists_every_step_newest_first_and_get_state_reads_the_head() {
    let graph = chain();
    done(&graph, "t", start(json!({}))).await;
    let history = graph.history("t", &ListFilter::default()).await.unwrap();
    let steps: Vec<u64> = history.iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![3, 2, 1, 0]);
    assert_eq!(history.last().unwrap().source, Source::Input);
    let snapshot = graph.get_state("t").await.unwrap().unwrap();
    assert_eq!(snapshot.checkpoint, history[0].id);
    assert!(snapshot.next.is_empty());
    let limited = graph.history("t", &ListFilter { limit: Some(2), ..Default::default() }).await.unwrap();
    assert_eq!(limited.len(), 2);
}

#[tokio::test]
async fn fan_out_runs_each_send_as_its_own_task_and_join_runs_once() {
    let graph = GraphBuilder::new("map")
        .channel("items", Channel::last_value())
        .channel("results", Channel::append())
        .channel("joined", Channel::sum())
        .node("plan", node_fn(|_, _| async { Ok(Update::new().set("items", json!([1, 2, 3, 4]))) }))
        .node(
            "square",
            node_fn(|_, ctx| async move {
                let n = ctx.arg().and_then(Value::as_i64).ok_or("no arg")?;
                // Finish in reverse order: results must still follow task order.
                tokio::time::sleep(Duration::from_millis(40 - 10 * n as u64)).await;
                Ok(Update::new().set("results", n * n))
            }),
        )
        .node("reduce", node_fn(|_, _| async { Ok(Update::new().set("joined", 1)) }))
        .edge(START, "plan")
        .conditional(
            "plan",
            |state| {
                let items: Vec<i64> = state.get("items")?;
                Ok(items.into_iter().map(|n| Goto::send("square", n)).collect())
            },
            ["square"],
        )
        .edge("square", "reduce")
        .edge("reduce", END)
        .compile()
        .unwrap();
    let state = done(&graph, "t", start(json!({}))).await;
    assert_eq!(state["results"], json!([1, 4, 9, 16]));
    assert_eq!(state["joined"], json!(1));
}

#[tokio::test]
async fn join_waits_for_all_branches_across_steps() {
    let graph = GraphBuilder::new("join")
        .channel("log", Channel::append())
        .node("fast", node_fn(|_, _| async { Ok(Update::new().set("log", "fast")) }))
        .node("slow1", node_fn(|_, _| async { Ok(Update::new().set("log", "slow1")) }))
        .node("slow2", node_fn(|_, _| async { Ok(Update::new().set("log", "slow2")) }))
        .node("join", node_fn(|_, _| async { Ok(Update::new().set("log", "join")) }))
        .edge(START, "fast")
        .edge(START, "slow1")
        .edge("slow1", "slow2")
        .join(["fast", "slow2"], "join")
        .edge("join", END)
        .compile()
        .unwrap();
    let state = done(&graph, "t", start(json!({}))).await;
    assert_eq!(state["log"], json!(["fast", "slow1", "slow2", "join"]));
}

#[tokio::test]
async fn conditional_edges_route_on_the_state_with_the_nodes_own_writes() {
    let graph = GraphBuilder::new("loop")
        .channel("n", Channel::sum())
        .node("inc", node_fn(|_, _| async { Ok(Update::new().set("n", 1)) }))
        .conditional(
            "inc",
            |state| Ok(vec![Goto::node(if state.get::<i64>("n")? < 5 { "inc" } else { END })]),
            ["inc", END],
        )
        .edge(START, "inc")
        .compile()
        .unwrap();
    assert_eq!(done(&graph, "t", start(json!({}))).await["n"], json!(5));
}

#[tokio::test]
async fn command_goto_routes_from_inside_a_node() {
    let graph = GraphBuilder::new("cmd")
        .channel("path", Channel::append())
        .node("a", node_fn(|_, _| async { Ok(Update::new().set("path", "a").goto("c")) }))
        .node("b", node_fn(|_, _| async { Ok(Update::new().set("path", "b")) }))
        .node("c", node_fn(|_, _| async { Ok(Update::new().set("path", "c")) }))
        .routes("a", ["b", "c"])
        .edge(START, "a")
        .edge("b", END)
        .edge("c", END)
        .compile()
        .unwrap();
    assert_eq!(done(&graph, "t", start(json!({}))).await["path"], json!(["a", "c"]));
}

#[tokio::test]
async fn a_router_from_start_reads_the_threads_state_not_an_empty_one() {
    // The second input leaves out `mode`: the router reads it from the thread's state. (A new
    // run's admission is first tried on an empty state, where the router fails.)
    let graph = GraphBuilder::new("router")
        .channel("mode", Channel::last_value())
        .channel("path", Channel::append())
        .node("fast", node_fn(|_, _| async { Ok(Update::new().set("path", "fast")) }))
        .node("slow", node_fn(|_, _| async { Ok(Update::new().set("path", "slow")) }))
        .conditional(
            START,
            |state| Ok(vec![Goto::node(if state.get::<String>("mode")? == "fast" { "fast" } else { "slow" })]),
            ["fast", "slow"],
        )
        .edge("fast", END)
        .edge("slow", END)
        .compile()
        .unwrap();
    assert_eq!(done(&graph, "t", start(json!({"mode": "fast"}))).await["path"], json!(["fast"]));
    assert_eq!(done(&graph, "t", start(json!({"path": "again"}))).await["path"], json!(["fast", "again", "fast"]));
    let err = graph.invoke("new", start(json!({"path": "x"})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("mode"), "a new thread without `mode` is refused, naming it: {err}");
}

#[tokio::test]
async fn recursion_limit_stops_a_runaway_loop_with_a_clear_error() {
    let graph = GraphBuilder::new("forever")
        .channel("n", Channel::sum())
        .node("spin", node_fn(|_, _| async { Ok(Update::new().set("n", 1)) }))
        .conditional("spin", |_| Ok(vec![Goto::node("spin")]), ["spin", END])
        .edge(START, "spin")
        .compile()
        .unwrap();
    let config = RunConfig { recursion_limit: 7, ..cfg() };
    let err = graph.invoke("t", start(json!({})), &config).await.unwrap_err();
    assert!(matches!(err, Error::RecursionLimit { limit: 7 }), "{err}");
    assert_eq!(graph.get_state("t").await.unwrap().unwrap().values.get::<i64>("n").unwrap(), 7);
}

#[tokio::test]
async fn two_writes_to_a_last_value_channel_in_one_step_are_refused() {
    let graph = GraphBuilder::new("conflict")
        .channel("x", Channel::last_value())
        .node("a", node_fn(|_, _| async { Ok(Update::new().set("x", 1)) }))
        .node("b", node_fn(|_, _| async { Ok(Update::new().set("x", 2)) }))
        .edge(START, "a")
        .edge(START, "b")
        .edge("a", END)
        .edge("b", END)
        .compile()
        .unwrap();
    let err = graph.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("`x`") && err.to_string().contains("2 writes"), "{err}");
}

#[tokio::test]
async fn an_invalid_update_fails_its_task_and_keeps_the_stored_state() {
    let graph = GraphBuilder::new("bad")
        .channel("ok", Channel::append())
        .max_update_bytes(64)
        .node("a", node_fn(|_, _| async { Ok(Update::new().set("ok", "a")) }))
        .node("b", node_fn(|_, _| async { Ok(Update::new().set("ok", "x".repeat(100))) }))
        .node("c", node_fn(|_, _| async { Ok(Update::new().set("nope", 1)) }))
        .edge(START, "a")
        .edge("a", "b")
        .edge("b", END)
        .edge(START, "c")
        .edge("c", END)
        .compile()
        .unwrap();
    let err = graph.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("node `c`") && err.to_string().contains("unknown channel `nope`"), "{err}");
    // The input checkpoint is intact and the failure is recorded: the run stays failed.
    let again = graph.invoke("t", Input::Continue, &cfg()).await.unwrap_err();
    assert!(matches!(again, Error::RunFailed { .. }), "{again}");
    assert_eq!(graph.get_state("t").await.unwrap().unwrap().step, 0);

    let graph2 = GraphBuilder::new("big")
        .channel("ok", Channel::append())
        .max_update_bytes(64)
        .node("b", node_fn(|_, _| async { Ok(Update::new().set("ok", "x".repeat(100))) }))
        .edge(START, "b")
        .edge("b", END)
        .compile()
        .unwrap();
    let err = graph2.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("over the limit of 64 bytes"), "{err}");
}

#[tokio::test]
async fn dynamic_interrupt_persists_and_resume_hands_the_value_to_the_node() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let graph = GraphBuilder::new("review")
        .channel("draft", Channel::last_value())
        .channel("verdict", Channel::last_value())
        .node("write", node_fn(|_, _| async { Ok(Update::new().set("draft", "hello")) }))
        .node(
            "review",
            node_fn(move |state, ctx| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let draft: String = state.get("draft")?;
                    let verdict = ctx.interrupt(json!({"approve?": draft}))?;
                    Ok(Update::new().set("verdict", verdict))
                }
            }),
        )
        .edge(START, "write")
        .edge("write", "review")
        .edge("review", END)
        .compile()
        .unwrap();
    let outcome = graph.invoke("t", start(json!({})), &cfg()).await.unwrap();
    let interrupts = outcome.interrupts().to_vec();
    assert_eq!(interrupts.len(), 1);
    assert_eq!(interrupts[0].value, json!({"approve?": "hello"}));
    assert_eq!(interrupts[0].kind, InterruptKind::Node);
    // Visible from outside, and a plain Continue does not run the node again.
    assert_eq!(graph.get_state("t").await.unwrap().unwrap().interrupts, interrupts);
    let again = graph.invoke("t", Input::Continue, &cfg()).await.unwrap();
    assert_eq!(again.interrupts(), interrupts.as_slice());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let state = done(&graph, "t", Input::Resume(Resume::Value(json!("approved")))).await;
    assert_eq!(state["verdict"], json!("approved"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let err = graph.invoke("t", Input::Resume(Resume::Value(json!(1))), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("not interrupted"), "{err}");
}

#[tokio::test]
async fn several_interrupts_in_one_step_are_resumed_by_id_and_finished_siblings_do_not_rerun() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let ask = |name: &'static str| {
        node_fn(move |_, ctx| async move {
            let answer = ctx.interrupt(json!(name))?;
            Ok(Update::new().set("answers", json!({name: answer})))
        })
    };
    let graph = GraphBuilder::new("multi")
        .channel("answers", Channel::merge())
        .channel("quiet", Channel::sum())
        .node("q1", ask("q1"))
        .node("q2", ask("q2"))
        .node(
            "quiet",
            node_fn(move |_, _| {
                let counted = Arc::clone(&counted);
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok(Update::new().set("quiet", 1))
                }
            }),
        )
        .edge(START, "q1")
        .edge(START, "q2")
        .edge(START, "quiet")
        .edge("q1", END)
        .edge("q2", END)
        .edge("quiet", END)
        .compile()
        .unwrap();
    let outcome = graph.invoke("t", start(json!({})), &cfg()).await.unwrap();
    let interrupts = outcome.interrupts();
    assert_eq!(interrupts.len(), 2);
    let err = graph.invoke("t", Input::Resume(Resume::Value(json!("x"))), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("resume them by id"), "{err}");
    let by_id: BTreeMap<String, Value> =
        interrupts.iter().map(|i| (i.id.clone(), json!(format!("answer to {}", i.value.as_str().unwrap())))).collect();
    let state = done(&graph, "t", Input::Resume(Resume::ById(by_id))).await;
    assert_eq!(state["answers"], json!({"q1": "answer to q1", "q2": "answer to q2"}));
    assert_eq!(state["quiet"], json!(1));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a finished sibling ran again");
}

#[tokio::test]
async fn static_interrupts_stop_before_and_after_nodes() {
    let graph = GraphBuilder::new("static")
        .channel("log", Channel::append())
        .node("a", node_fn(|_, _| async { Ok(Update::new().set("log", "a")) }))
        .node("b", node_fn(|_, _| async { Ok(Update::new().set("log", "b")) }))
        .node("c", node_fn(|_, _| async { Ok(Update::new().set("log", "c")) }))
        .edge(START, "a")
        .edge("a", "b")
        .edge("b", "c")
        .edge("c", END)
        .interrupt_before(["b"])
        .interrupt_after(["b"])
        .compile()
        .unwrap();
    let first = graph.invoke("t", start(json!({})), &cfg()).await.unwrap();
    assert_eq!(first.interrupts()[0].kind, InterruptKind::Before);
    assert_eq!(graph.get_state("t").await.unwrap().unwrap().values.get::<Vec<String>>("log").unwrap(), ["a"]);
    let second = graph.invoke("t", Input::Resume(Resume::Value(Value::Null)), &cfg()).await.unwrap();
    assert_eq!(second.interrupts()[0].kind, InterruptKind::After);
    assert_eq!(second.interrupts()[0].node, "c");
    let state = done(&graph, "t", Input::Resume(Resume::Value(Value::Null))).await;
    assert_eq!(state["log"], json!(["a", "b", "c"]));
}

#[tokio::test]
async fn retries_back_off_and_stop_on_fatal_errors() {
    tokio::time::pause();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let graph = GraphBuilder::new("flaky")
        .channel("ok", Channel::last_value())
        .node(
            "flaky",
            node_fn(move |_, ctx| {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    if ctx.attempt() < 3 {
                        Err(NodeError::from("transient"))
                    } else {
                        Ok(Update::new().set("ok", true))
                    }
                }
            }),
        )
        .retry("flaky", RetryPolicy::attempts(3).initial_interval(Duration::from_millis(10)))
        .edge(START, "flaky")
        .edge("flaky", END)
        .compile()
        .unwrap();
    assert_eq!(done(&graph, "t", start(json!({}))).await["ok"], json!(true));
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    let fatal = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fatal);
    let graph = GraphBuilder::new("fatal")
        .channel("ok", Channel::last_value())
        .node(
            "f",
            node_fn(move |_, _| {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Err(NodeError::fatal("bad request"))
                }
            }),
        )
        .retry("f", RetryPolicy::attempts(5))
        .edge(START, "f")
        .edge("f", END)
        .compile()
        .unwrap();
    let err = graph.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("node `f` failed after 1 attempt(s): bad request"), "{err}");
    assert_eq!(fatal.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_node_that_overruns_its_timeout_fails_and_a_panic_is_an_error() {
    tokio::time::pause();
    let graph = GraphBuilder::new("slow")
        .channel("x", Channel::last_value())
        .node(
            "slow",
            node_fn(|_, _| async {
                tokio::time::sleep(Duration::from_mins(1)).await;
                Ok(Update::new())
            }),
        )
        .timeout("slow", Duration::from_secs(1))
        .edge(START, "slow")
        .edge("slow", END)
        .compile()
        .unwrap();
    let err = graph.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("timed out after 1s"), "{err}");

    let graph = GraphBuilder::new("panics")
        .channel("x", Channel::last_value())
        .node(
            "p",
            node_fn(|state, _| async move {
                assert!(state.value("x").is_some(), "boom");
                Ok(Update::new())
            }),
        )
        .edge(START, "p")
        .edge("p", END)
        .compile()
        .unwrap();
    let err = graph.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("node panicked: boom"), "{err}");
}

#[tokio::test]
async fn journaled_calls_are_not_repeated_when_the_task_runs_again() {
    let paid = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&paid);
    let graph = GraphBuilder::new("journal")
        .channel("answer", Channel::last_value())
        .channel("approved", Channel::last_value())
        .node(
            "llm",
            node_fn(move |_, ctx| {
                let counter = Arc::clone(&counter);
                async move {
                    let answer: String = ctx
                        .journal("completion", async {
                            counter.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, NodeError>("42".to_owned())
                        })
                        .await?;
                    // The interrupt makes the node run again on resume; the call must not.
                    let approved = ctx.interrupt(json!({"answer": answer}))?;
                    Ok(Update::new().set("answer", answer).set("approved", approved))
                }
            }),
        )
        .edge(START, "llm")
        .edge("llm", END)
        .compile()
        .unwrap();
    graph.invoke("t", start(json!({})), &cfg()).await.unwrap();
    let state = done(&graph, "t", Input::Resume(Resume::Value(json!(true)))).await;
    assert_eq!(state["answer"], json!("42"));
    assert_eq!(state["approved"], json!(true));
    assert_eq!(paid.load(Ordering::SeqCst), 1, "the journaled call ran twice");
}

#[tokio::test]
async fn stream_yields_values_updates_custom_events_and_checkpoints() {
    let graph = GraphBuilder::new("streamed")
        .channel("n", Channel::sum())
        .node(
            "a",
            node_fn(|_, ctx| async move {
                ctx.emit(json!({"progress": 0.5}));
                Ok(Update::new().set("n", 2))
            }),
        )
        .edge(START, "a")
        .edge("a", END)
        .compile()
        .unwrap();
    let events: Vec<Event> = graph.stream("t", start(json!({"n": 1})), &cfg()).map(|e| e.unwrap()).collect().await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            Event::Values { .. } => "values",
            Event::Updates { .. } => "updates",
            Event::Custom { .. } => "custom",
            Event::Checkpoint { .. } => "checkpoint",
            Event::Interrupted { .. } => "interrupted",
        })
        .collect();
    assert_eq!(kinds, ["checkpoint", "values", "custom", "updates", "checkpoint", "values"]);
    assert!(matches!(&events[5], Event::Values { step: 1, state } if state["n"] == json!(3)));
    assert!(matches!(&events[2], Event::Custom { node, value } if node == "a" && value["progress"] == json!(0.5)));
}

#[tokio::test]
async fn running_from_an_older_checkpoint_forks_and_keeps_the_old_branch() {
    let graph = chain();
    done(&graph, "t", start(json!({}))).await;
    let history = graph.history("t", &ListFilter::default()).await.unwrap();
    let after_a = history.iter().find(|c| c.step == 1).unwrap().id;
    let old_head = history[0].id;
    let config = RunConfig { checkpoint: Some(after_a), ..cfg() };
    let state = match graph.invoke("t", Input::Continue, &config).await.unwrap() {
        RunOutcome::Done(s) => s.to_json(),
        RunOutcome::Interrupted(_) => panic!(),
    };
    assert_eq!(state["log"], json!(["a", "b", "c"]));
    let history = graph.history("t", &ListFilter::default()).await.unwrap();
    assert!(history.iter().any(|c| c.source == Source::Fork));
    let old = graph.state_at("t", Some(old_head)).await.unwrap().unwrap();
    assert_eq!(old.values.get::<Vec<String>>("log").unwrap(), ["a", "b", "c"]);
    assert_eq!(history.len(), 4 + 1 + 2);
}

#[tokio::test]
async fn update_state_writes_as_a_node_and_its_edges_pick_what_runs_next() {
    let graph = chain();
    let config = cfg();
    done(&graph, "t", start(json!({}))).await;
    let id = graph.update_state("t", Update::new().set("log", "human"), Some("a"), &config).await.unwrap();
    let snapshot = graph.get_state("t").await.unwrap().unwrap();
    assert_eq!(snapshot.checkpoint, id);
    assert_eq!(snapshot.next, ["b"]);
    let state = done(&graph, "t", Input::Continue).await;
    assert_eq!(state["log"], json!(["a", "b", "c", "human", "b", "c"]));
}

#[tokio::test]
async fn starting_a_thread_with_a_run_in_progress_is_refused() {
    let graph = GraphBuilder::new("wait")
        .channel("x", Channel::last_value())
        .node("ask", node_fn(|_, ctx| async move { Ok(Update::new().set("x", ctx.interrupt("?")?)) }))
        .edge(START, "ask")
        .edge("ask", END)
        .compile()
        .unwrap();
    graph.invoke("t", start(json!({})), &cfg()).await.unwrap();
    let err = graph.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("has a run in progress"), "{err}");
}

#[tokio::test]
async fn a_thread_is_not_resumed_by_another_graph_unless_allowed() {
    let store = Arc::new(MemoryCheckpointer::new());
    let graph = chain().with_checkpointer(store.clone());
    done(&graph, "t", start(json!({}))).await;
    let other = GraphBuilder::new("chain")
        .version("2")
        .channel("count", Channel::sum())
        .channel("log", Channel::append())
        .channel("last", Channel::last_value())
        .node("a", node_fn(|_, _| async { Ok(Update::new().set("log", "v2")) }))
        .edge(START, "a")
        .edge("a", END)
        .compile()
        .unwrap()
        .with_checkpointer(store);
    let err = other.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(matches!(err, Error::GraphMismatch { .. }), "{err}");
    let allowed = RunConfig { allow_graph_change: true, ..cfg() };
    let state = other.invoke("t", start(json!({})), &allowed).await.unwrap();
    assert_eq!(state.state().unwrap().get::<Vec<String>>("log").unwrap(), ["a", "b", "c", "v2"]);
}

#[tokio::test]
async fn every_durability_mode_reaches_the_same_state() {
    for durability in [Durability::Sync, Durability::Async, Durability::Exit] {
        let graph = chain();
        let config = RunConfig { durability, ..cfg() };
        let state = graph.invoke("t", start(json!({})), &config).await.unwrap();
        assert_eq!(state.state().unwrap().get::<i64>("count").unwrap(), 3, "{durability:?}");
        let stored = graph.get_state("t").await.unwrap().unwrap();
        assert_eq!(stored.values.to_json(), state.state().unwrap().to_json(), "{durability:?}");
        let history = graph.history("t", &ListFilter::default()).await.unwrap();
        let expected = if durability == Durability::Exit { 2 } else { 4 };
        assert_eq!(history.len(), expected, "{durability:?}");
    }
}

#[tokio::test]
async fn prune_keeps_the_newest_checkpoints_and_their_values() {
    let graph = chain();
    done(&graph, "t", start(json!({}))).await;
    assert_eq!(graph.prune("t", 1).await.unwrap(), 3);
    let snapshot = graph.get_state("t").await.unwrap().unwrap();
    assert_eq!(snapshot.values.get::<Vec<String>>("log").unwrap(), ["a", "b", "c"]);
    graph.delete_thread("t").await.unwrap();
    assert!(graph.get_state("t").await.unwrap().is_none());
}

fn child_graph(first_runs: Arc<AtomicUsize>, ask: bool) -> Graph {
    GraphBuilder::new("child")
        .channel("log", Channel::append())
        .channel("total", Channel::sum())
        .channel("answer", Channel::last_value())
        .node(
            "c1",
            node_fn(move |_, _| {
                let first_runs = Arc::clone(&first_runs);
                async move {
                    first_runs.fetch_add(1, Ordering::SeqCst);
                    Ok(Update::new().set("log", "c1").set("total", 5))
                }
            }),
        )
        .node(
            "c2",
            node_fn(move |_, ctx| async move {
                let answer = if ask { ctx.interrupt(json!("child asks"))? } else { json!("none") };
                Ok(Update::new().set("log", "c2").set("answer", answer))
            }),
        )
        .edge(START, "c1")
        .edge("c1", "c2")
        .edge("c2", END)
        .compile()
        .unwrap()
}

fn parent_graph(child: Graph) -> Graph {
    GraphBuilder::new("parent")
        .channel("log", Channel::append())
        .channel("total", Channel::sum())
        .channel("answer", Channel::last_value())
        .node("before", node_fn(|_, _| async { Ok(Update::new().set("log", "before").set("total", 1)) }))
        .subgraph("child", child)
        .node("after", node_fn(|_, _| async { Ok(Update::new().set("log", "after")) }))
        .edge(START, "before")
        .edge("before", "child")
        .edge("child", "after")
        .edge("after", END)
        .compile()
        .unwrap()
}

#[tokio::test]
async fn a_subgraph_runs_as_a_node_and_writes_back_only_what_it_changed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let graph = parent_graph(child_graph(Arc::clone(&runs), false));
    let state = done(&graph, "t", start(json!({}))).await;
    assert_eq!(state["log"], json!(["before", "c1", "c2", "after"]));
    assert_eq!(state["total"], json!(6));
    assert_eq!(state["answer"], json!("none"));
}

#[tokio::test]
async fn an_interrupt_inside_a_subgraph_surfaces_and_resumes_where_it_stopped() {
    let runs = Arc::new(AtomicUsize::new(0));
    let graph = parent_graph(child_graph(Arc::clone(&runs), true));
    let outcome = graph.invoke("t", start(json!({})), &cfg()).await.unwrap();
    let interrupts = outcome.interrupts().to_vec();
    assert_eq!(interrupts.len(), 1);
    assert_eq!(interrupts[0].node, "c2");
    assert_eq!(interrupts[0].value, json!("child asks"));
    assert_eq!(graph.get_state("t").await.unwrap().unwrap().interrupts[0].id, interrupts[0].id);
    let state = done(&graph, "t", Input::Resume(Resume::Value(json!("yes")))).await;
    assert_eq!(state["answer"], json!("yes"));
    assert_eq!(state["log"], json!(["before", "c1", "c2", "after"]));
    assert_eq!(state["total"], json!(6));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the subgraph restarted instead of resuming");
}

#[tokio::test]
async fn every_durability_mode_reaches_the_same_state_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("agentic-durability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(agentic_runtime::SqliteCheckpointer::open(dir.join("modes.db")).await.unwrap());
    for (i, durability) in [Durability::Sync, Durability::Async, Durability::Exit].into_iter().enumerate() {
        let graph = chain().with_checkpointer(store.clone());
        let thread = format!("t{i}");
        let config = RunConfig { durability, ..cfg() };
        let outcome = graph.invoke(&thread, start(json!({})), &config).await.unwrap();
        let stored = graph.get_state(&thread).await.unwrap().unwrap();
        assert_eq!(stored.values.to_json(), outcome.state().unwrap().to_json(), "{durability:?}");
        assert_eq!(stored.values.get::<Vec<String>>("log").unwrap(), ["a", "b", "c"], "{durability:?}");
        let history = graph.history(&thread, &ListFilter::default()).await.unwrap();
        assert_eq!(history.len(), if durability == Durability::Exit { 2 } else { 4 }, "{durability:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn idempotency_keys_and_typed_state_survive_a_re_execution() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Out {
        keys: Vec<String>,
    }
    let graph = GraphBuilder::new("typed")
        .channel("keys", Channel::append())
        .node(
            "pay",
            node_fn(|_, ctx| async move {
                let key = ctx.idempotency_key("charge");
                let _approved = ctx.interrupt(json!("approve the charge?"))?;
                // Runs again on resume: the key must be the one the first run saw.
                Update::from_struct(&Out { keys: vec![key, ctx.idempotency_key("charge")] })
            }),
        )
        .edge(START, "pay")
        .edge("pay", END)
        .compile()
        .unwrap();
    graph.invoke("t", start(json!({})), &cfg()).await.unwrap();
    let outcome = graph.invoke("t", Input::Resume(Resume::Value(json!(true))), &cfg()).await.unwrap();
    let out: Out = outcome.state().unwrap().parse().unwrap();
    assert_eq!(out.keys.len(), 2);
    assert_eq!(out.keys[0], out.keys[1]);
    assert!(out.keys[0].starts_with("t:") && out.keys[0].ends_with(":charge"), "{}", out.keys[0]);
}

#[tokio::test]
async fn retry_on_decides_which_errors_retry() {
    tokio::time::pause();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let graph = GraphBuilder::new("picky")
        .channel("x", Channel::last_value())
        .node(
            "n",
            node_fn(move |_, _| {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Err(NodeError::from("HTTP 400"))
                }
            }),
        )
        .retry("n", RetryPolicy::attempts(5).retry_on(|e| !e.to_string().contains("400")))
        .edge(START, "n")
        .edge("n", END)
        .compile()
        .unwrap();
    let err = graph.invoke("t", start(json!({})), &cfg()).await.unwrap_err();
    assert!(err.to_string().contains("after 1 attempt(s)"), "{err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}
