//! The checkpointer conformance suite: every check is written once against the `Checkpointer`
//! trait and run on each backend (memory, SQLite in a temporary file, PostgreSQL in a fresh
//! database per test), followed by the checks only one backend can make (session-bound leases,
//! batch commits, process-held leases).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly on unexpected errors")]

mod support;

use std::time::{Duration, Instant};

use agentic_runtime::checkpoint::{
    Checkpointer, Lease, LeaseRequest, ListFilter, PendingTask, PutOutcome, Source, StepCommit, StepRef, WriteKind,
};
use agentic_runtime::{Error, MemoryCheckpointer, PostgresCheckpointer, SqliteCheckpointer};
use serde_json::{Value, json};

use support::{Chain, Commit, TempDir, graph, lease, other_graph, refused, step, try_lease, values, write};

/// Generates one test per check per backend: `memory::<check>`, `sqlite::<check>`,
/// `postgres::<check>`.
macro_rules! conformance {
    ($($check:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(&agentic_runtime::MemoryCheckpointer::new()).await;
                }
            )+
        }

        mod sqlite {
            $(
                #[tokio::test]
                async fn $check() {
                    let dir = super::support::TempDir::new("conformance");
                    let store = agentic_runtime::SqliteCheckpointer::open(dir.join("store.db")).await.unwrap();
                    super::$check(&store).await;
                }
            )+
        }

        mod postgres {
            $(
                #[sqlx::test(migrations = false)]
                async fn $check(pool: sqlx::PgPool) {
                    let store = agentic_runtime::PostgresCheckpointer::from_pool(pool).await.unwrap();
                    super::$check(&store).await;
                }
            )+
        }
    };
}

conformance!(
    commits_a_checkpoint_and_loads_it_as_head_and_by_id,
    unknown_threads_read_as_empty,
    lists_checkpoints_newest_first_filtered_by_before_limit_and_source,
    records_pending_writes_and_keeps_the_first_write_of_a_key,
    refuses_pending_writes_as_stale_once_the_head_moved,
    pending_writes_of_a_deposed_runner_are_refused,
    next_commit_folds_the_parent_writes_but_interrupt_writes_stay_while_the_step_is_pending,
    a_fork_moves_the_head_and_the_old_branch_still_loads_with_its_values,
    prune_keeps_the_newest_checkpoints_per_namespace_and_every_value_they_need,
    delete_thread_removes_the_thread_and_everything_stored_for_it,
    a_second_acquire_is_refused_naming_the_owner,
    a_dropped_lease_is_taken_again_with_a_higher_epoch_and_ids_continue,
    a_commit_with_a_superseded_lease_is_refused_and_stores_nothing,
    a_commit_is_refused_when_the_head_moved,
    a_retried_commit_that_went_through_succeeds,
    a_thread_is_refused_to_another_graph_unless_allowed,
    an_append_channel_of_200_deltas_materialises_the_full_list,
    namespaces_have_their_own_heads_and_checkpoints,
    inline_values_load_beside_stored_rows_and_survive_a_prune,
    a_run_begins_with_the_admission_on_a_new_thread_and_the_head_on_an_old_one,
    a_lazy_commit_is_stored_folded_and_refused_like_any_commit,
);

async fn commits_a_checkpoint_and_loads_it_as_head_and_by_id(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let first = Commit::new("t", lease.next_checkpoint_id())
        .set("question", &json!("why?"))
        .set("count", &json!(1))
        .meta(json!({"writer": "input"}))
        .then("answer")
        .build();
    store.commit(&lease, &first).await.unwrap();
    let second = Commit::new("t", lease.next_checkpoint_id())
        .after(1)
        .step(1)
        .source(Source::Loop)
        .versions(&first.checkpoint.body.versions)
        .set("count", &json!(2))
        .meta(json!({"tasks": ["answer"], "tags": {"user": "u1"}}))
        .build();
    store.commit(&lease, &second).await.unwrap();

    assert_eq!(store.head("t", "").await.unwrap(), Some(2));
    let head = store.load("t", "", None).await.unwrap().expect("the head loads");
    assert_eq!(head.id, 2);
    assert_eq!(head.ns, "");
    assert_eq!(head.parent, Some(1));
    assert_eq!(head.step, 1);
    assert_eq!(head.source, Source::Loop);
    assert_eq!(head.values, values(&[("question", json!("why?")), ("count", json!(2))]));
    assert_eq!(head.metadata, json!({"tasks": ["answer"], "tags": {"user": "u1"}}));
    assert_eq!(head.body, *second.checkpoint.body);
    let age = head.created_at.elapsed().unwrap_or_default();
    assert!(age < Duration::from_mins(1), "created_at is the commit time, got {age:?} ago");

    let first_loaded = store.load("t", "", Some(1)).await.unwrap().expect("checkpoint 1 loads");
    assert_eq!(first_loaded.id, 1);
    assert_eq!(first_loaded.parent, None);
    assert_eq!(first_loaded.source, Source::Input);
    assert_eq!(first_loaded.values, values(&[("question", json!("why?")), ("count", json!(1))]));
    assert_eq!(first_loaded.body.next, vec![PendingTask::Pull { node: "answer".to_owned() }]);
    assert_eq!(first_loaded.metadata, json!({"writer": "input"}));

    assert!(store.load("t", "", Some(3)).await.unwrap().is_none());
    let info = store.thread("t").await.unwrap().expect("the thread exists");
    assert_eq!(info.thread, "t");
    assert_eq!(info.graph, graph());
    assert_eq!(info.epoch, lease.epoch);
    assert_eq!(info.owner.as_deref(), Some("runner-a"));
}

async fn unknown_threads_read_as_empty(store: &dyn Checkpointer) {
    assert!(store.thread("nobody").await.unwrap().is_none());
    assert_eq!(store.head("nobody", "").await.unwrap(), None);
    assert!(store.load("nobody", "", None).await.unwrap().is_none());
    assert!(store.load("nobody", "", Some(1)).await.unwrap().is_none());
    assert!(store.list("nobody", "", &ListFilter::default()).await.unwrap().is_empty());
    assert!(store.pending_writes(step("nobody", 1)).await.unwrap().is_empty());
    assert_eq!(store.prune("nobody", 0).await.unwrap(), 0);
    store.delete_thread("nobody").await.unwrap();

    // A thread with no checkpoint yet has no head either.
    let _lease = lease(store, "fresh", "runner-a").await;
    assert_eq!(store.head("fresh", "").await.unwrap(), None);
    assert!(store.load("fresh", "", None).await.unwrap().is_none());
    let stale = store.put_writes(step("fresh", 1), &[write("a", WriteKind::Output, "", &json!(1))]).await;
    refused(stale, "StaleTask", |e| matches!(e, Error::StaleTask { .. }));
}

async fn lists_checkpoints_newest_first_filtered_by_before_limit_and_source(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    chain.set(store, &lease, "x", &json!(0)).await;
    for i in 1..=5 {
        let commit = chain.next(&lease).set("x", &json!(i)).meta(json!({"i": i}));
        chain.commit(store, &lease, commit).await.unwrap();
    }
    let update = chain.next(&lease).source(Source::Update).set("x", &json!(99));
    chain.commit(store, &lease, update).await.unwrap();

    let ids = |metas: Vec<agentic_runtime::checkpoint::CheckpointMeta>| metas.iter().map(|m| m.id).collect::<Vec<_>>();
    let all = store.list("t", "", &ListFilter::default()).await.unwrap();
    assert_eq!(ids(all.clone()), vec![7, 6, 5, 4, 3, 2, 1]);
    let six = &all[1];
    assert_eq!((six.ns.as_str(), six.parent, six.step, six.source), ("", Some(5), 5, Source::Loop));
    assert_eq!(six.metadata, json!({"i": 5}));
    assert_eq!(all[0].source, Source::Update);
    assert_eq!(all[6].source, Source::Input);

    let before = ListFilter { before: Some(5), ..ListFilter::default() };
    assert_eq!(ids(store.list("t", "", &before).await.unwrap()), vec![4, 3, 2, 1]);
    let limit = ListFilter { limit: Some(2), ..ListFilter::default() };
    assert_eq!(ids(store.list("t", "", &limit).await.unwrap()), vec![7, 6]);
    let loops = ListFilter { source: Some(Source::Loop), ..ListFilter::default() };
    assert_eq!(ids(store.list("t", "", &loops).await.unwrap()), vec![6, 5, 4, 3, 2]);
    let inputs = ListFilter { source: Some(Source::Input), ..ListFilter::default() };
    assert_eq!(ids(store.list("t", "", &inputs).await.unwrap()), vec![1]);
    let all_three = ListFilter { before: Some(5), limit: Some(2), source: Some(Source::Loop) };
    assert_eq!(ids(store.list("t", "", &all_three).await.unwrap()), vec![4, 3]);
    let none = ListFilter { limit: Some(0), ..ListFilter::default() };
    assert!(store.list("t", "", &none).await.unwrap().is_empty());
    assert!(store.list("t", "sub", &ListFilter::default()).await.unwrap().is_empty());
}

async fn records_pending_writes_and_keeps_the_first_write_of_a_key(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    let head = chain.set(store, &lease, "x", &json!(0)).await;

    let first = [
        write("task-a", WriteKind::Journal, "call-1", &json!({"reply": "hi"})),
        write("task-a", WriteKind::Output, "", &json!({"x": 1})),
    ];
    assert_eq!(store.put_writes(step("t", head), &first).await.unwrap(), PutOutcome::Accepted);
    let second = [
        write("task-a", WriteKind::Output, "", &json!({"x": "late duplicate"})),
        write("task-b", WriteKind::Output, "", &json!({"x": 2})),
    ];
    assert_eq!(store.put_writes(step("t", head), &second).await.unwrap(), PutOutcome::Duplicate);
    let same_call = [
        write("task-c", WriteKind::Output, "", &json!("first")),
        write("task-c", WriteKind::Output, "", &json!("second")),
    ];
    assert_eq!(store.put_writes(step("t", head), &same_call).await.unwrap(), PutOutcome::Duplicate);
    assert_eq!(store.put_writes(step("t", head), &[]).await.unwrap(), PutOutcome::Accepted);

    let stored = store.pending_writes(step("t", head)).await.unwrap();
    assert_eq!(
        stored,
        vec![
            write("task-a", WriteKind::Journal, "call-1", &json!({"reply": "hi"})),
            write("task-a", WriteKind::Output, "", &json!({"x": 1})),
            write("task-b", WriteKind::Output, "", &json!({"x": 2})),
            write("task-c", WriteKind::Output, "", &json!("first")),
        ]
    );
    assert!(
        store
            .pending_writes(StepRef { thread: "t", ns: "sub", checkpoint: head, epoch: None })
            .await
            .unwrap()
            .is_empty()
    );
}

async fn refuses_pending_writes_as_stale_once_the_head_moved(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    let old = chain.set(store, &lease, "x", &json!(0)).await;
    chain.set(store, &lease, "x", &json!(1)).await;

    let late = [
        write("task-z", WriteKind::Journal, "call-1", &json!(1)),
        write("task-a", WriteKind::Output, "", &json!({"x": 5})),
    ];
    let err = refused(store.put_writes(step("t", old), &late).await, "StaleTask", |e| {
        matches!(e, Error::StaleTask { thread, task, checkpoint }
            if thread == "t" && task == "task-a" && *checkpoint == old)
    });
    assert!(err.to_string().contains("task-a"), "{err}");
    assert!(store.pending_writes(step("t", old)).await.unwrap().is_empty());
    let other_ns = StepRef { thread: "t", ns: "sub", checkpoint: 2, epoch: None };
    refused(store.put_writes(other_ns, &late).await, "StaleTask", |e| matches!(e, Error::StaleTask { .. }));
    refused(store.put_writes(step("ghost", 1), &late).await, "StaleTask", |e| matches!(e, Error::StaleTask { .. }));
}

async fn pending_writes_of_a_deposed_runner_are_refused(store: &dyn Checkpointer) {
    let first = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    let head = chain.set(store, &first, "x", &json!(0)).await;
    let old_epoch = first.epoch;
    let mine = StepRef { thread: "t", ns: "", checkpoint: head, epoch: Some(old_epoch) };
    let early = [write("task-a", WriteKind::Output, "", &json!({"x": 1}))];
    assert_eq!(store.put_writes(mine, &early).await.unwrap(), PutOutcome::Accepted);
    drop(first);
    let second = lease(store, "t", "runner-b").await;

    // The first runner's write after the thread was taken: refused, stores nothing.
    let late = [write("task-b", WriteKind::Output, "", &json!({"x": 2}))];
    refused(
        store.put_writes(mine, &late).await,
        "LeaseLost",
        |e| matches!(e, Error::LeaseLost { thread, epoch } if thread == "t" && *epoch == old_epoch),
    );
    // The new holder's writes, and a worker's (no lease), go through.
    let theirs = StepRef { epoch: Some(second.epoch), ..mine };
    let own = [write("task-c", WriteKind::Output, "", &json!({"x": 3}))];
    assert_eq!(store.put_writes(theirs, &own).await.unwrap(), PutOutcome::Accepted);
    let worker = [write("task-d", WriteKind::Output, "", &json!({"x": 4}))];
    assert_eq!(store.put_writes(step("t", head), &worker).await.unwrap(), PutOutcome::Accepted);
    let stored: Vec<String> =
        store.pending_writes(step("t", head)).await.unwrap().into_iter().map(|w| w.task).collect();
    assert_eq!(stored, ["task-a", "task-c", "task-d"]);
}

async fn next_commit_folds_the_parent_writes_but_interrupt_writes_stay_while_the_step_is_pending(
    store: &dyn Checkpointer,
) {
    let first_lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    let one = chain.set(store, &first_lease, "x", &json!(0)).await;
    store
        .put_writes(
            step("t", one),
            &[write("a", WriteKind::Output, "", &json!(1)), write("b", WriteKind::Output, "", &json!(2))],
        )
        .await
        .unwrap();
    let two = chain.set(store, &first_lease, "x", &json!(3)).await;
    assert!(store.pending_writes(step("t", one)).await.unwrap().is_empty(), "folded into checkpoint 2");

    // The step of checkpoint 2 is interrupted: its writes outlive the runner.
    let interrupt = write("ask", WriteKind::Interrupt, "i-1", &json!({"question": "approve?"}));
    store.put_writes(step("t", two), std::slice::from_ref(&interrupt)).await.unwrap();
    drop(first_lease);
    let resumer = lease(store, "t", "runner-b").await;
    let resume = write("ask", WriteKind::Resume, "i-1", &json!("yes"));
    store.put_writes(step("t", two), std::slice::from_ref(&resume)).await.unwrap();
    assert_eq!(store.pending_writes(step("t", two)).await.unwrap(), vec![interrupt, resume]);
    assert_eq!(store.head("t", "").await.unwrap(), Some(two));

    chain.set(store, &resumer, "x", &json!(4)).await;
    assert!(store.pending_writes(step("t", two)).await.unwrap().is_empty(), "folded into checkpoint 3");
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(4))]));
}

async fn a_fork_moves_the_head_and_the_old_branch_still_loads_with_its_values(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    chain.set(store, &lease, "x", &json!(1)).await;
    chain.set(store, &lease, "y", &json!("b")).await;
    let three = chain.append(store, &lease, "log", &json!(["three"])).await;
    let first = store.load("t", "", Some(1)).await.unwrap().unwrap();

    let fork = Commit::new("t", lease.next_checkpoint_id())
        .parent(Some(1))
        .expecting(Some(three))
        .step(1)
        .source(Source::Fork)
        .versions(&first.body.versions)
        .set("x", &json!(10))
        .build();
    store.commit(&lease, &fork).await.unwrap();

    assert_eq!(store.head("t", "").await.unwrap(), Some(4));
    let forked = store.load("t", "", None).await.unwrap().unwrap();
    assert_eq!((forked.id, forked.parent, forked.source), (4, Some(1), Source::Fork));
    assert_eq!(forked.values, values(&[("x", json!(10))]));
    let old = store.load("t", "", Some(three)).await.unwrap().unwrap();
    assert_eq!(old.values, values(&[("x", json!(1)), ("y", json!("b")), ("log", json!(["three"]))]));
    assert_eq!(store.load("t", "", Some(1)).await.unwrap().unwrap().values, values(&[("x", json!(1))]));
    let ids: Vec<u64> = store.list("t", "", &ListFilter::default()).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![4, 3, 2, 1]);
}

async fn prune_keeps_the_newest_checkpoints_per_namespace_and_every_value_they_need(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut root = Chain::new("t", "");
    root.set(store, &lease, "title", &json!("set once, at checkpoint 1")).await;
    for i in 1..=30 {
        // `log` is a delta chain from checkpoint 2 on; `n` is rewritten every step.
        let base = (i > 1).then(|| root.head.unwrap());
        let commit = root.next(&lease).append("log", base, &json!([i])).set("n", &json!(i));
        root.commit(store, &lease, commit).await.unwrap();
    }
    let mut sub = Chain::new("t", "sub");
    for i in 1..=5 {
        sub.set(store, &lease, "m", &json!(i)).await;
    }
    let head = root.head.unwrap();
    store.put_writes(step("t", head), &[write("a", WriteKind::Output, "", &json!(1))]).await.unwrap();

    assert_eq!(store.prune("t", 3).await.unwrap(), 28 + 2);

    let kept: Vec<u64> = store.list("t", "", &ListFilter::default()).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(kept, vec![31, 30, 29]);
    let all_items: Vec<Value> = (1..=30).map(|i| json!(i)).collect();
    let newest = store.load("t", "", None).await.unwrap().unwrap();
    assert_eq!(
        newest.values,
        values(&[
            ("title", json!("set once, at checkpoint 1")),
            ("log", Value::Array(all_items.clone())),
            ("n", json!(30))
        ])
    );
    let oldest_kept = store.load("t", "", Some(29)).await.unwrap().unwrap();
    assert_eq!(oldest_kept.values["log"], Value::Array(all_items[..28].to_vec()));
    assert_eq!(oldest_kept.values["n"], json!(28));
    assert!(store.load("t", "", Some(28)).await.unwrap().is_none());
    assert_eq!(store.pending_writes(step("t", head)).await.unwrap().len(), 1, "the head's writes stay");

    let sub_kept: Vec<u64> =
        store.list("t", "sub", &ListFilter::default()).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(sub_kept, vec![36, 35, 34]);
    assert_eq!(store.load("t", "sub", Some(34)).await.unwrap().unwrap().values, values(&[("m", json!(3))]));

    // Pruning again deletes nothing more and leaves every value loadable.
    assert_eq!(store.prune("t", 3).await.unwrap(), 0);
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, newest.values);
    assert_eq!(store.prune("t", 1).await.unwrap(), 4);
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, newest.values);
    assert_eq!(store.load("t", "sub", None).await.unwrap().unwrap().values, values(&[("m", json!(5))]));
}

async fn inline_values_load_beside_stored_rows_and_survive_a_prune(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    for i in 1..=4 {
        let commit = chain.next(&lease).inline("n", &json!(i)).set("doc", &json!(format!("version {i}")));
        chain.commit(store, &lease, commit).await.unwrap();
    }
    // Only `n` changes: `doc` keeps naming the row of checkpoint 4.
    let commit = chain.next(&lease).inline("n", &json!(5));
    chain.commit(store, &lease, commit).await.unwrap();

    let head = store.load("t", "", None).await.unwrap().unwrap();
    assert_eq!(head.values, values(&[("n", json!(5)), ("doc", json!("version 4"))]));
    assert_eq!(head.body.versions["n"].i, Some(json!(5)));
    let second = store.load("t", "", Some(2)).await.unwrap().unwrap();
    assert_eq!(second.values, values(&[("n", json!(2)), ("doc", json!("version 2"))]));

    assert_eq!(store.prune("t", 1).await.unwrap(), 4);
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, head.values);
}

async fn delete_thread_removes_the_thread_and_everything_stored_for_it(store: &dyn Checkpointer) {
    let doomed = lease(store, "doomed", "runner-a").await;
    let kept = lease(store, "kept", "runner-a").await;
    let mut chain = Chain::new("doomed", "");
    let one = chain.set(store, &doomed, "x", &json!(1)).await;
    let mut sub = Chain::new("doomed", "sub");
    sub.set(store, &doomed, "y", &json!(2)).await;
    store.put_writes(step("doomed", one), &[write("a", WriteKind::Output, "", &json!(1))]).await.unwrap();
    let mut other = Chain::new("kept", "");
    other.set(store, &kept, "x", &json!("mine")).await;
    drop(doomed);

    store.delete_thread("doomed").await.unwrap();

    assert!(store.thread("doomed").await.unwrap().is_none());
    assert_eq!(store.head("doomed", "").await.unwrap(), None);
    assert!(store.load("doomed", "", Some(one)).await.unwrap().is_none());
    assert!(store.load("doomed", "sub", None).await.unwrap().is_none());
    assert!(store.list("doomed", "", &ListFilter::default()).await.unwrap().is_empty());
    assert!(store.pending_writes(step("doomed", one)).await.unwrap().is_empty());
    assert_eq!(store.load("kept", "", None).await.unwrap().unwrap().values, values(&[("x", json!("mine"))]));

    let again = lease(store, "doomed", "runner-b").await;
    assert_eq!(again.epoch, 1, "a new thread");
    assert_eq!(again.next_checkpoint_id(), 1);
}

async fn a_second_acquire_is_refused_naming_the_owner(store: &dyn Checkpointer) {
    let _held = lease(store, "t", "runner-a").await;
    let err = refused(
        try_lease(store, "t", "runner-b").await,
        "LeaseHeld",
        |e| matches!(e, Error::LeaseHeld { thread, owner, .. } if thread == "t" && owner == "runner-a"),
    );
    assert!(err.to_string().contains("runner-a"), "{err}");
    assert_eq!(store.thread("t").await.unwrap().unwrap().owner.as_deref(), Some("runner-a"));
    // Other threads are not affected.
    let _other = lease(store, "u", "runner-b").await;
}

async fn a_dropped_lease_is_taken_again_with_a_higher_epoch_and_ids_continue(store: &dyn Checkpointer) {
    let first = lease(store, "t", "runner-a").await;
    let mut root = Chain::new("t", "");
    root.set(store, &first, "x", &json!(1)).await;
    root.set(store, &first, "x", &json!(2)).await;
    let mut sub = Chain::new("t", "sub");
    let sub_head = sub.set(store, &first, "y", &json!(3)).await;
    let first_epoch = first.epoch;
    drop(first);

    let second = lease(store, "t", "runner-b").await;
    assert!(second.epoch > first_epoch, "epoch {} after {first_epoch}", second.epoch);
    assert_eq!(second.next_checkpoint_id(), sub_head + 1, "ids continue after every namespace's checkpoints");
    let info = store.thread("t").await.unwrap().unwrap();
    assert_eq!((info.epoch, info.owner.as_deref()), (second.epoch, Some("runner-b")));
    root.set(store, &second, "x", &json!(4)).await;
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(4))]));
}

async fn a_commit_with_a_superseded_lease_is_refused_and_stores_nothing(store: &dyn Checkpointer) {
    let first = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    chain.set(store, &first, "x", &json!(1)).await;
    let old_epoch = first.epoch;
    drop(first);
    let second = lease(store, "t", "runner-b").await;
    // What the first runner still holds after it lost the thread.
    let stale = Lease::new("t", "runner-a", old_epoch, 1, None);

    let late = chain.next(&stale).set("x", &json!("late")).build();
    refused(
        store.commit(&stale, &late).await,
        "LeaseLost",
        |e| matches!(e, Error::LeaseLost { thread, epoch } if thread == "t" && *epoch == old_epoch),
    );
    assert_eq!(store.head("t", "").await.unwrap(), Some(1));
    assert!(store.load("t", "", Some(late.checkpoint.id)).await.unwrap().is_none());
    assert_eq!(store.list("t", "", &ListFilter::default()).await.unwrap().len(), 1);
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(1))]));

    // The new holder commits on the untouched head, with the id the stale runner had taken.
    let mine = chain.next(&second).set("x", &json!("mine")).build();
    assert_eq!(mine.checkpoint.id, late.checkpoint.id);
    store.commit(&second, &mine).await.unwrap();
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!("mine"))]));
}

/// `commit_lazy` differs from `commit` only in when the commit becomes durable: it stores the
/// same checkpoint, folds the parent's pending writes, and is refused for the same reasons;
/// `flush` after it, after a durable commit, or twice in a row succeeds.
async fn a_lazy_commit_is_stored_folded_and_refused_like_any_commit(store: &dyn Checkpointer) {
    let first = lease(store, "t", "runner-a").await;
    let one = Chain::new("t", "").next(&first).set("x", &json!(1)).build();
    store.commit_lazy(&first, &one).await.unwrap();
    store.flush(&first).await.unwrap();
    store.flush(&first).await.unwrap();
    let parent = one.checkpoint.id;
    store.put_writes(step("t", parent), &[write("a", WriteKind::Output, "", &json!(2))]).await.unwrap();
    let two = Commit::new("t", first.next_checkpoint_id())
        .after(parent)
        .step(1)
        .source(Source::Loop)
        .versions(&one.checkpoint.body.versions)
        .set("x", &json!(2))
        .build();
    store.commit_lazy(&first, &two).await.unwrap();
    assert!(store.pending_writes(step("t", parent)).await.unwrap().is_empty(), "folded by the lazy commit");
    let head = store.load("t", "", None).await.unwrap().expect("the head loads");
    assert_eq!((head.id, head.values), (two.checkpoint.id, values(&[("x", json!(2))])));

    let behind = Commit::new("t", first.next_checkpoint_id()).after(parent).set("x", &json!("behind")).build();
    refused(
        store.commit_lazy(&first, &behind).await,
        "HeadMoved",
        |e| matches!(e, Error::HeadMoved { expected: Some(p), found: Some(f), .. } if *p == parent && *f == two.checkpoint.id),
    );
    let old_epoch = first.epoch;
    drop(first);
    let second = lease(store, "t", "runner-b").await;
    let stale = Lease::new("t", "runner-a", old_epoch, 3, None);
    let late = Commit::new("t", 4).after(two.checkpoint.id).set("x", &json!("late")).build();
    refused(store.commit_lazy(&stale, &late).await, "LeaseLost", |e| matches!(e, Error::LeaseLost { .. }));
    store.flush(&second).await.unwrap();
    assert_eq!(store.head("t", "").await.unwrap(), Some(two.checkpoint.id));
    assert!(store.load("t", "", Some(behind.checkpoint.id)).await.unwrap().is_none());
}

async fn a_commit_is_refused_when_the_head_moved(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    chain.set(store, &lease, "x", &json!(1)).await;
    chain.set(store, &lease, "x", &json!(2)).await;

    let behind = Commit::new("t", lease.next_checkpoint_id()).after(1).set("x", &json!("behind")).build();
    refused(
        store.commit(&lease, &behind).await,
        "HeadMoved",
        |e| matches!(e, Error::HeadMoved { thread, ns, expected: Some(1), found: Some(2) } if thread == "t" && ns.is_empty()),
    );
    let blind = Commit::new("t", lease.next_checkpoint_id()).set("x", &json!("blind")).build();
    refused(store.commit(&lease, &blind).await, "HeadMoved", |e| {
        matches!(e, Error::HeadMoved { expected: None, found: Some(2), .. })
    });
    let nowhere = Commit::new("t", lease.next_checkpoint_id()).ns("sub").after(2).set("y", &json!(0)).build();
    refused(
        store.commit(&lease, &nowhere).await,
        "HeadMoved",
        |e| matches!(e, Error::HeadMoved { ns, expected: Some(2), found: None, .. } if ns == "sub"),
    );

    assert_eq!(store.head("t", "").await.unwrap(), Some(2));
    assert_eq!(store.head("t", "sub").await.unwrap(), None);
    for id in [behind.checkpoint.id, blind.checkpoint.id] {
        assert!(store.load("t", "", Some(id)).await.unwrap().is_none(), "checkpoint {id} not stored");
    }
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(2))]));
}

async fn a_retried_commit_that_went_through_succeeds(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let first = Commit::new("t", lease.next_checkpoint_id()).set("x", &json!(1)).build();
    store.commit(&lease, &first).await.unwrap();
    let second =
        Commit::new("t", lease.next_checkpoint_id()).after(1).step(1).source(Source::Loop).set("x", &json!(2)).build();
    store.commit(&lease, &second).await.unwrap();

    store.commit(&lease, &second).await.unwrap();

    assert_eq!(store.head("t", "").await.unwrap(), Some(2));
    assert_eq!(store.list("t", "", &ListFilter::default()).await.unwrap().len(), 2);
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(2))]));
    // A retry of an older commit is no retry: the head moved past it.
    refused(store.commit(&lease, &first).await, "HeadMoved", |e| {
        matches!(e, Error::HeadMoved { expected: None, found: Some(2), .. })
    });
}

async fn a_thread_is_refused_to_another_graph_unless_allowed(store: &dyn Checkpointer) {
    let first = lease(store, "t", "runner-a").await;
    Chain::new("t", "").set(store, &first, "x", &json!(1)).await;
    let first_epoch = first.epoch;
    drop(first);

    let other = other_graph();
    let request = LeaseRequest { thread: "t", owner: "runner-b", graph: &other, allow_graph_change: false };
    let err = refused(store.acquire(request.clone()).await, "GraphMismatch", |e| {
        matches!(e, Error::GraphMismatch { thread, stored, requested }
            if thread == "t" && stored == "support-bot@h1" && requested == "billing-bot@h2")
    });
    assert!(err.to_string().contains("allow_graph_change"), "{err}");
    assert_eq!(store.thread("t").await.unwrap().unwrap().graph, graph());

    // The refusal did not keep the thread: the graph change goes through when allowed.
    let changed = store.acquire(LeaseRequest { allow_graph_change: true, ..request }).await.unwrap();
    assert!(changed.epoch > first_epoch);
    let info = store.thread("t").await.unwrap().unwrap();
    assert_eq!((info.graph, info.owner.as_deref()), (other_graph(), Some("runner-b")));
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(1))]));
}

async fn an_append_channel_of_200_deltas_materialises_the_full_list(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut chain = Chain::new("t", "");
    for i in 1..=200 {
        chain.append(store, &lease, "messages", &json!([{"n": i}])).await;
    }
    let head = store.load("t", "", None).await.unwrap().unwrap();
    assert_eq!(head.id, 200);
    assert!(head.body.versions["messages"].d, "the head's version is a delta");
    let expected: Vec<Value> = (1..=200).map(|i| json!({"n": i})).collect();
    assert_eq!(head.values["messages"], Value::Array(expected.clone()));
    let middle = store.load("t", "", Some(120)).await.unwrap().unwrap();
    assert_eq!(middle.values["messages"], Value::Array(expected[..120].to_vec()));
}

/// The first checkpoint of a new thread: `x` = 1 written whole.
fn first_commit(thread: &str) -> StepCommit {
    Commit::new(thread, 1).set("x", &json!("a value of more than thirty-two bytes, kept in a row")).build()
}

async fn a_run_begins_with_the_admission_on_a_new_thread_and_the_head_on_an_old_one(store: &dyn Checkpointer) {
    let identity = graph();
    let ask = || LeaseRequest { thread: "t", owner: "runner-a", graph: &identity, allow_graph_change: false };
    let begun = store.begin(ask(), Some(&first_commit("t"))).await.unwrap();
    assert!(begun.admitted, "a new thread stores the admission with its lease");
    assert!(begun.head.is_none());
    assert_eq!(begun.lease.next_checkpoint_id(), 2, "the admission's id is allocated");
    let head = store.load("t", "", None).await.unwrap().unwrap();
    assert_eq!((head.id, head.parent), (1, None));
    assert_eq!(head.values["x"], json!("a value of more than thirty-two bytes, kept in a row"));
    drop(begun);
    tokio::time::sleep(Duration::from_millis(50)).await; // PostgreSQL unlocks on a task

    let begun = store.begin(ask(), Some(&first_commit("t"))).await.unwrap();
    assert!(!begun.admitted, "an existing thread stores nothing");
    let loaded = begun.head.as_ref().expect("an existing thread's head comes with its lease");
    assert_eq!((loaded.id, &loaded.values), (head.id, &head.values));
    assert_eq!(store.list("t", "", &ListFilter::default()).await.unwrap().len(), 1);
    assert_eq!(begun.lease.next_checkpoint_id(), 2, "ids go on after the stored ones");
    assert!(begun.lease.epoch > 1);
    drop(begun);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Without an admission a new thread is only leased.
    let begun = store.begin(LeaseRequest { thread: "new", ..ask() }, None).await.unwrap();
    assert!(!begun.admitted && begun.head.is_none() && begun.lease.is_fresh());
    assert!(store.load("new", "", None).await.unwrap().is_none());
}

async fn namespaces_have_their_own_heads_and_checkpoints(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner-a").await;
    let mut root = Chain::new("t", "");
    let mut sub = Chain::new("t", "planner:1");
    root.set(store, &lease, "x", &json!("root")).await;
    sub.set(store, &lease, "x", &json!("sub")).await;
    root.set(store, &lease, "x", &json!("root again")).await;

    assert_eq!(store.head("t", "").await.unwrap(), Some(3));
    assert_eq!(store.head("t", "planner:1").await.unwrap(), Some(2));
    let in_sub = store.load("t", "planner:1", None).await.unwrap().unwrap();
    assert_eq!((in_sub.id, in_sub.ns.as_str()), (2, "planner:1"));
    assert_eq!(in_sub.values, values(&[("x", json!("sub"))]));
    assert!(store.load("t", "", Some(2)).await.unwrap().is_none(), "checkpoint 2 is in the subgraph");
    let listed: Vec<u64> =
        store.list("t", "planner:1", &ListFilter::default()).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(listed, vec![2]);
    assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!("root again"))]));
}

/// Checks only PostgreSQL can make: session-bound leases, batch commits, connection URLs.
mod postgres_only {
    use super::*;
    use agentic_runtime::checkpoint::{ChannelVersion, CheckpointBody};
    use sqlx::PgPool;
    use support::bytes;

    async fn store(pool: PgPool) -> PostgresCheckpointer {
        PostgresCheckpointer::from_pool(pool).await.unwrap()
    }

    /// The URL of the test's database (`DATABASE_URL` with the database the pool is on).
    fn url_of(pool: &PgPool) -> String {
        let database = pool.connect_options().get_database().unwrap().to_owned();
        let base = std::env::var("DATABASE_URL").unwrap();
        format!("{}/{database}", base.rsplit_once('/').unwrap().0)
    }

    /// A transaction holding thread `t`'s row FOR SHARE, as a commit or a pending write in
    /// flight does.
    async fn hold_thread_row(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM agentic.threads WHERE thread_id = 't' FOR SHARE").execute(&mut *tx).await.unwrap();
        tx
    }

    /// The backend pid of the session holding this database's advisory locks.
    async fn lock_holder(pool: &PgPool) -> i32 {
        sqlx::query_scalar(
            "SELECT pid FROM pg_locks
             WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// Ends the session holding this database's advisory locks (the leases with it); returns
    /// its pid.
    async fn end_lease_session(pool: &PgPool) -> i32 {
        let holder = lock_holder(pool).await;
        let ended: bool =
            sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)").bind(holder).fetch_one(pool).await.unwrap();
        assert!(ended, "the lease's session ended");
        holder
    }

    /// A killed runner's last pending write can still be in flight (waiting for its WAL flush)
    /// while the next runner takes the thread and reads the step's writes. The write holds the
    /// thread row FOR SHARE and the take updates the row, so one waits for the other: a take
    /// that came first makes the write wait, then find the new epoch and be refused; a write
    /// that came first is read by the taker. A transaction left open stands for each side.
    #[sqlx::test(migrations = false)]
    async fn a_pending_write_and_a_take_in_flight_wait_for_each_other(pool: PgPool) {
        let store = store(pool.clone()).await;
        let first = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        let head = chain.set(&store, &first, "x", &json!(0)).await;
        let mine = StepRef { thread: "t", ns: "", checkpoint: head, epoch: Some(first.epoch) };

        // A take in flight: the write waits for it, then is refused.
        let mut take = pool.begin().await.unwrap();
        sqlx::query("UPDATE agentic.threads SET epoch = epoch + 1 WHERE thread_id = 't'")
            .execute(&mut *take)
            .await
            .unwrap();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let late = [write("task-a", WriteKind::Output, "", &json!(1))];
                store.put_writes(StepRef { thread: "t", ns: "", checkpoint: head, ..mine }, &late).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!writer.is_finished(), "the write went ahead of a take in flight");
        take.commit().await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), writer).await.unwrap().unwrap();
        refused(outcome, "LeaseLost", |e| matches!(e, Error::LeaseLost { epoch, .. } if *epoch == first.epoch));
        assert!(store.pending_writes(step("t", head)).await.unwrap().is_empty());
        drop(first);

        // A write in flight: the take waits for it, and the taker reads it.
        let mut write_tx = hold_thread_row(&pool).await;
        sqlx::query(
            "INSERT INTO agentic.writes (tid, ns, checkpoint, task, kind, key, data)
             SELECT tid, '', $1, 'task-b', 'output', '', '\\x00'::bytea FROM agentic.threads WHERE thread_id = 't'",
        )
        .bind(head as i64)
        .execute(&mut *write_tx)
        .await
        .unwrap();
        let taker = {
            let store = store.clone();
            tokio::spawn(async move {
                let second = lease(&store, "t", "runner-b").await;
                (second.owner.clone(), store.pending_writes(step("t", head)).await.unwrap())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!taker.is_finished(), "the take went ahead of a write in flight");
        write_tx.commit().await.unwrap();
        let (owner, writes) = tokio::time::timeout(Duration::from_secs(10), taker).await.unwrap().unwrap();
        assert_eq!(owner, "runner-b");
        let tasks: Vec<&str> = writes.iter().map(|w| w.task.as_str()).collect();
        assert_eq!(tasks, ["task-b"], "the taker reads the write that was in flight");
    }

    #[sqlx::test(migrations = false)]
    async fn a_lease_dies_with_its_database_session(pool: PgPool) {
        let store = store(pool.clone()).await;
        let first = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        chain.set(&store, &first, "x", &json!(1)).await;

        let holder = end_lease_session(&pool).await;

        let started = Instant::now();
        let second = lease(&store, "t", "runner-b").await;
        assert!(started.elapsed() < Duration::from_secs(1), "taken over at once");
        assert!(second.epoch > first.epoch);
        assert_ne!(lock_holder(&pool).await, holder);

        let late = chain.next(&first).set("x", &json!("late")).build();
        refused(store.commit(&first, &late).await, "LeaseLost", |e| matches!(e, Error::LeaseLost { .. }));
        assert_eq!(store.head("t", "").await.unwrap(), Some(1));
        chain.set(&store, &second, "x", &json!(2)).await;
        assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(2))]));
    }

    #[sqlx::test(migrations = false)]
    async fn a_runner_whose_lease_session_died_unnoticed_commits_fenced_by_its_epoch(pool: PgPool) {
        let store = store(pool.clone()).await;
        let lease = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        chain.set(&store, &lease, "x", &json!(1)).await;
        end_lease_session(&pool).await;

        // The statement on the dead session fails; nobody took the thread, so the epoch still
        // admits the commit on a commit connection.
        chain.set(&store, &lease, "x", &json!(2)).await;
        chain.set(&store, &lease, "x", &json!(3)).await;
        assert_eq!(store.head("t", "").await.unwrap(), Some(3));
        assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(3))]));
    }

    #[sqlx::test(migrations = false)]
    async fn commits_on_the_lease_session_wait_for_the_wal_flush(pool: PgPool) {
        // The lease session takes leases without waiting for the flush (synchronous_commit off
        // for those transactions only); the commits it runs must each wait for theirs.
        const COMMITS: i64 = 40;
        let syncs = || async {
            let n: i64 = sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal").fetch_one(&pool).await.unwrap();
            n
        };
        let store = store(pool.clone()).await;
        let lease = lease(&store, "t", "runner").await;
        let mut chain = Chain::new("t", "");
        chain.set(&store, &lease, "x", &json!(0)).await;
        let before = syncs().await;
        for i in 1..=COMMITS {
            chain.set(&store, &lease, "x", &json!(i)).await;
        }
        // Every commit went on the lease session, in its checkpoint's row.
        let fenced: i64 =
            sqlx::query_scalar("SELECT count(*) FROM agentic.channel_values").fetch_one(&pool).await.unwrap();
        assert_eq!(fenced, 0);
        // A session reports its WAL statistics when it ends.
        drop((lease, chain, store));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut flushed = syncs().await - before;
        while flushed < COMMITS && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            flushed = syncs().await - before;
        }
        assert!(flushed >= COMMITS, "{flushed} WAL flushes for {COMMITS} commits");
    }

    #[sqlx::test(migrations = false)]
    async fn versions_stored_before_values_moved_into_checkpoint_rows_still_load(pool: PgPool) {
        // The database as the migrations before this one left it: a thread with a head row and
        // two checkpoints, whose versions are rows of `channel_values` (a whole value, a delta).
        let all = sqlx::migrate!("../migrations/postgres");
        let before = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(
                all.migrations.iter().filter(|m| m.version < 20_261_126_200_000).cloned().collect(),
            ),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        before.run(&pool).await.unwrap();
        let body = |version: ChannelVersion| {
            let mut body = CheckpointBody::default();
            body.versions.insert("log".to_owned(), version);
            agentic_runtime::checkpoint::codec::encode(&body).unwrap()
        };
        sqlx::query(
            "WITH t AS (INSERT INTO agentic.threads (thread_id, graph_name, graph_hash, epoch)
                        VALUES ('t', 'support-bot', 'h1', 1) RETURNING tid),
                  c AS (INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata)
                        SELECT tid, '', 1, NULL, 0, 'input', $1, '{}'::jsonb FROM t
                        UNION ALL
                        SELECT tid, '', 2, 1, 1, 'loop', $2, '{}'::jsonb FROM t),
                  v AS (INSERT INTO agentic.channel_values (tid, ns, channel, version, base, data)
                        SELECT tid, '', 'log', 1, NULL, $3 FROM t
                        UNION ALL
                        SELECT tid, '', 'log', 2, 1, $4 FROM t)
             INSERT INTO agentic.heads (tid, ns, head) SELECT tid, '', 2 FROM t",
        )
        .bind(body(ChannelVersion::whole(1)))
        .bind(body(ChannelVersion::delta(2, 1, 1, 1)))
        .bind(bytes(&json!(["a"])))
        .bind(bytes(&json!(["b"])))
        .execute(&pool)
        .await
        .unwrap();

        let store = store(pool.clone()).await;
        assert_eq!(store.head("t", "").await.unwrap(), Some(2));
        assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("log", json!(["a", "b"]))]));
        // A new step appends on the old chain; its version goes in its own row.
        let lease = lease(&store, "t", "runner").await;
        let mut chain = Chain::new("t", "");
        chain.head = Some(2);
        let commit = chain.next(&lease).append("log", Some(2), &json!(["c"]));
        chain.commit(&store, &lease, commit).await.unwrap();
        assert_eq!(
            store.load("t", "", None).await.unwrap().unwrap().values,
            values(&[("log", json!(["a", "b", "c"]))])
        );
    }

    #[sqlx::test(migrations = false)]
    async fn a_dropped_lease_is_unlocked_by_the_next_take_without_freeing_a_new_lease(pool: PgPool) {
        // Another runner: a checkpointer of its own, so a lease session of its own.
        let other = store(pool.clone()).await;
        let store = store(pool.clone()).await;
        let first = lease(&store, "t", "runner-a").await;
        drop(first);
        // Taken again at once: this take carries the dropped lease's unlock, and the lock it
        // takes again must outlive it (session locks count).
        let again = lease(&store, "t", "runner-a").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = try_lease(&other, "t", "runner-b").await;
        assert!(matches!(&refused, Err(Error::LeaseHeld { .. })), "{refused:?}");

        // Dropped with no take after it: unlocked on its own, soon.
        drop(again);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match try_lease(&other, "t", "runner-b").await {
                Ok(_) => break,
                Err(Error::LeaseHeld { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => panic!("the dropped lease was never unlocked: {err}"),
            }
        }
    }

    #[sqlx::test(migrations = false)]
    async fn deleting_a_thread_waits_for_its_runner_and_is_refused_while_it_holds_on(pool: PgPool) {
        let store = store(pool.clone()).await;
        let running = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        chain.set(&store, &running, "x", &json!(1)).await;

        // Its commits do not look at the thread row: deleting under them would orphan them.
        let refused = store.delete_thread("t").await;
        assert!(matches!(&refused, Err(Error::LeaseHeld { owner, .. }) if owner == "runner-a"), "{refused:?}");
        chain.set(&store, &running, "x", &json!(2)).await;
        assert_eq!(store.head("t", "").await.unwrap(), Some(2));

        // A deletion in wait goes through once the runner lets go.
        let deleting = {
            let store = store.clone();
            tokio::spawn(async move { store.delete_thread("t").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!deleting.is_finished(), "the deletion waits for the lease");
        drop(running);
        deleting.await.unwrap().unwrap();
        assert!(store.thread("t").await.unwrap().is_none());
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM agentic.checkpoints").fetch_one(&pool).await.unwrap();
        assert_eq!(left, 0);
    }

    #[sqlx::test(migrations = false)]
    async fn a_commit_waiting_on_a_takeover_is_refused_once_the_takeover_lands(pool: PgPool) {
        let store = store(pool.clone()).await;
        let first = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        chain.set(&store, &first, "x", &json!(1)).await;
        // The first runner's lease session ends (its lock with it), unnoticed; a takeover is in
        // flight: the epoch bumped, not yet committed.
        end_lease_session(&pool).await;
        let mut takeover = pool.begin().await.unwrap();
        sqlx::query("UPDATE agentic.threads SET epoch = epoch + 1 WHERE thread_id = 't'")
            .execute(&mut *takeover)
            .await
            .unwrap();

        let late = chain.next(&first).set("x", &json!("late")).build();
        let committing = {
            let store = store.clone();
            tokio::spawn(async move { store.commit(&first, &late).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!committing.is_finished(), "the commit waits for the takeover");
        takeover.commit().await.unwrap();

        let outcome = committing.await.unwrap();
        assert!(matches!(outcome, Err(Error::LeaseLost { .. })), "{outcome:?}");
        assert_eq!(store.head("t", "").await.unwrap(), Some(1));
        assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(1))]));
    }

    #[sqlx::test(migrations = false)]
    async fn a_store_made_before_the_agentic_schema_moves_into_it_with_its_threads(pool: PgPool) {
        // The database as the first migration left it: the tables in `public`, one thread.
        let first = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(vec![sqlx::migrate!("../migrations/postgres").migrations[0].clone()]),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        first.run(&pool).await.unwrap();
        sqlx::query(
            "WITH t AS (INSERT INTO public.threads (thread_id, graph_name, graph_hash, epoch)
                        VALUES ('t', 'support-bot', 'h1', 1) RETURNING tid),
                  c AS (INSERT INTO public.checkpoints (tid, ns, id, parent, step, source, body, metadata)
                        SELECT tid, '', 1, NULL, 0, 'input', convert_to('{\"versions\":{},\"next\":[]}', 'UTF8'), '{}'
                        FROM t)
             INSERT INTO public.heads (tid, ns, head) SELECT tid, '', 1 FROM t",
        )
        .execute(&pool)
        .await
        .unwrap();

        let store = store(pool.clone()).await;

        let left: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(left.is_empty(), "runtime tables left in public: {left:?}");
        assert_eq!(store.head("t", "").await.unwrap(), Some(1));
        assert_eq!(store.thread("t").await.unwrap().unwrap().graph, graph());
        let listed = store.list("t", "", &ListFilter::default()).await.unwrap();
        assert_eq!(listed.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1]);
        let second = lease(&store, "t", "runner").await;
        assert_eq!((second.epoch, second.next_checkpoint_id()), (2, 2));
        // The identity sequence moved with its table: a new thread gets a new tid.
        lease(&store, "u", "runner").await;
        let tids: Vec<i64> =
            sqlx::query_scalar("SELECT tid FROM agentic.threads ORDER BY tid").fetch_all(&pool).await.unwrap();
        assert_eq!(tids.len(), 2);
        assert_ne!(tids[0], tids[1]);
    }

    #[sqlx::test(migrations = false)]
    async fn a_takeover_waits_for_a_commit_in_flight_and_continues_its_ids(pool: PgPool) {
        let store = store(pool.clone()).await;
        let first = lease(&store, "t", "runner-a").await;
        Chain::new("t", "").set(&store, &first, "x", &json!(1)).await;
        drop(first);
        // The old holder's commit of checkpoint 2, in flight: it holds the thread row FOR SHARE.
        let mut in_flight = hold_thread_row(&pool).await;

        let taking = {
            let store = store.clone();
            tokio::spawn(async move { lease(&store, "t", "runner-b").await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!taking.is_finished(), "the epoch bump waits for the commit");
        sqlx::query(
            "INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata)
             SELECT tid, '', 2, 1, 1, 'loop', convert_to('{\"versions\":{},\"next\":[]}', 'UTF8'), '{}'
             FROM agentic.threads WHERE thread_id = 't'",
        )
        .execute(&mut *in_flight)
        .await
        .unwrap();
        in_flight.commit().await.unwrap();

        let second = taking.await.unwrap();
        assert_eq!(second.next_checkpoint_id(), 3, "checkpoint 2 landed before the takeover");
        assert_eq!(store.head("t", "").await.unwrap(), Some(2));
    }

    /// A pending write stored by a session other than this checkpointer's (a worker's put in
    /// flight across a commit, here a transaction left open).
    async fn foreign_write(pool: &PgPool, checkpoint: u64, task: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO agentic.writes (tid, ns, checkpoint, task, kind, key, data)
             SELECT tid, '', $1, $2, 'output', '', '\\x01'::bytea FROM agentic.threads WHERE thread_id = 't'",
        )
        .bind(checkpoint as i64)
        .bind(task)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx
    }

    async fn stored_writes(pool: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM agentic.writes").fetch_one(pool).await.unwrap()
    }

    /// A write that checked the head before a commit moved it, and landed after, belongs to an
    /// older checkpoint: never read as the head's. Once read (here by `pending_writes`), the next
    /// commit folds it away.
    #[sqlx::test(migrations = false)]
    async fn writes_that_raced_a_commit_are_folded_away_once_seen(pool: PgPool) {
        let store = store(pool.clone()).await;
        let lease = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        let one = chain.set(&store, &lease, "x", &json!(1)).await;
        let racing = foreign_write(&pool, one, "slow").await;
        // The commit of checkpoint 2 does not see the write; it lands after it.
        let two = chain.set(&store, &lease, "x", &json!(2)).await;
        racing.commit().await.unwrap();
        assert!(store.pending_writes(step("t", two)).await.unwrap().is_empty(), "not the head's");
        assert_eq!(store.pending_writes(step("t", one)).await.unwrap().len(), 1);

        chain.set(&store, &lease, "x", &json!(3)).await;
        assert!(store.pending_writes(step("t", one)).await.unwrap().is_empty());
        assert_eq!(stored_writes(&pool).await, 0);
    }

    /// A lone runner's commit leaves the fold out while no pending write was stored or read
    /// through its checkpointer since the last fold (here a write of another session, which
    /// this runner never reads, stays), and folds again once one was: its own write, or one it
    /// read.
    #[sqlx::test(migrations = false)]
    async fn a_commit_folds_only_when_pending_writes_were_stored_or_read_since_the_last_fold(pool: PgPool) {
        let store = store(pool.clone()).await;
        let lease = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        let one = chain.set(&store, &lease, "x", &json!(1)).await;
        foreign_write(&pool, one, "unseen").await.commit().await.unwrap();
        let two = chain.set(&store, &lease, "x", &json!(2)).await;
        assert_eq!(stored_writes(&pool).await, 1, "nothing was counted: the commit left the fold out");

        // Its own write for the head: the next commit folds it, and the unseen one below it.
        let mine = StepRef { thread: "t", ns: "", checkpoint: two, epoch: Some(lease.epoch) };
        store.put_writes(mine, &[write("a", WriteKind::Output, "", &json!(1))]).await.unwrap();
        let three = chain.set(&store, &lease, "x", &json!(3)).await;
        assert_eq!(stored_writes(&pool).await, 0);

        // A write read through the checkpointer (a worker's result the runner applies).
        foreign_write(&pool, three, "worker").await.commit().await.unwrap();
        assert_eq!(store.pending_writes(step("t", three)).await.unwrap().len(), 1);
        chain.set(&store, &lease, "x", &json!(4)).await;
        assert_eq!(stored_writes(&pool).await, 0);
    }

    /// A runner taking an existing thread does not know what its predecessor left (a killed
    /// runner's writes of the head): its first commit folds, whether or not it read them.
    #[sqlx::test(migrations = false)]
    async fn the_first_commit_on_a_taken_over_thread_folds_what_the_last_runner_left(pool: PgPool) {
        let store = store(pool.clone()).await;
        let first = lease(&store, "t", "runner-a").await;
        let mut chain = Chain::new("t", "");
        let one = chain.set(&store, &first, "x", &json!(1)).await;
        foreign_write(&pool, one, "left").await.commit().await.unwrap();
        drop(first);
        let second = lease(&store, "t", "runner-b").await;
        chain.set(&store, &second, "x", &json!(2)).await;
        assert_eq!(stored_writes(&pool).await, 0);
    }

    #[sqlx::test(migrations = false)]
    async fn a_batch_commits_many_threads_in_one_go_and_reports_each_refusal(pool: PgPool) {
        let store = store(pool.clone()).await;
        let a = lease(&store, "a", "runner").await;
        let b = lease(&store, "b", "runner").await;
        let c_old = lease(&store, "c", "runner").await;
        let c_epoch = c_old.epoch;
        drop(c_old);
        let _c = lease(&store, "c", "other-runner").await;
        let c_stale = Lease::new("c", "runner", c_epoch, 0, None);

        let a1 = Commit::new("a", a.next_checkpoint_id()).set("x", &json!("a1")).build();
        let b1 = Commit::new("b", b.next_checkpoint_id()).set("x", &json!("b1")).build();
        let c1 = Commit::new("c", c_stale.next_checkpoint_id()).set("x", &json!("c1")).build();
        let a2 = Commit::new("a", a.next_checkpoint_id()).after(1).append("log", None, &json!(["a2"])).build();
        let b_behind = Commit::new("b", b.next_checkpoint_id()).after(7).set("x", &json!("b?")).build();
        let a_sub =
            Commit::new("a", a.next_checkpoint_id()).ns("sub").set("y", &json!("a-sub")).set("z", &json!(7)).build();

        let results = store
            .commit_batch(&[(&a, &a1), (&b, &b1), (&c_stale, &c1), (&a, &a2), (&b, &b_behind), (&a, &a_sub)])
            .await;

        assert_eq!(results.len(), 6);
        assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok() && results[5].is_ok(), "{results:?}");
        assert!(matches!(results[2], Err(Error::LeaseLost { epoch, .. }) if epoch == c_epoch), "{results:?}");
        assert!(matches!(results[4], Err(Error::HeadMoved { expected: Some(7), found: Some(1), .. })), "{results:?}");
        let a_head = store.load("a", "", None).await.unwrap().unwrap();
        assert_eq!((a_head.id, a_head.parent), (2, Some(1)));
        assert_eq!(a_head.values, values(&[("log", json!(["a2"]))]));
        assert_eq!(
            store.load("a", "sub", None).await.unwrap().unwrap().values,
            values(&[("y", json!("a-sub")), ("z", json!(7))])
        );
        assert_eq!(store.load("b", "", None).await.unwrap().unwrap().values, values(&[("x", json!("b1"))]));
        assert_eq!(store.head("c", "").await.unwrap(), None);
        // Each commit's values went into its own row, sliced out of the batch's flat arrays.
        let rows: Vec<(String, i64, Vec<String>)> = sqlx::query_as(
            "SELECT t.thread_id, c.id, c.channels FROM agentic.checkpoints c JOIN agentic.threads t USING (tid)
             ORDER BY 1, 2",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let rows: Vec<(&str, i64, Vec<&str>)> =
            rows.iter().map(|(t, id, c)| (t.as_str(), *id, c.iter().map(String::as_str).collect())).collect();
        assert_eq!(rows, [("a", 1, vec!["x"]), ("a", 2, vec!["log"]), ("a", 3, vec!["y", "z"]), ("b", 1, vec!["x"])]);
        let values_rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM agentic.channel_values").fetch_one(&pool).await.unwrap();
        assert_eq!(values_rows, 0);
    }

    #[sqlx::test(migrations = false)]
    async fn a_batch_with_an_unstorable_commit_fails_only_that_commit(pool: PgPool) {
        let store = store(pool).await;
        let a = lease(&store, "a", "runner").await;
        let b = lease(&store, "b", "runner").await;
        let good = Commit::new("a", a.next_checkpoint_id()).set("x", &json!(1)).build();
        // jsonb cannot hold a NUL character: the whole statement fails on this commit.
        let bad = Commit::new("b", b.next_checkpoint_id()).meta(json!({"note": "nul \u{0} here"})).build();

        let results = store.commit_batch(&[(&a, &good), (&b, &bad)]).await;

        assert!(results[0].is_ok(), "{results:?}");
        assert!(matches!(&results[1], Err(Error::Checkpoint { backend: "postgres", transient: false, .. })));
        assert_eq!(store.load("a", "", None).await.unwrap().unwrap().values, values(&[("x", json!(1))]));
        assert_eq!(store.head("b", "").await.unwrap(), None);
    }

    #[sqlx::test(migrations = false)]
    async fn prune_deletes_the_channel_values_no_kept_checkpoint_needs(pool: PgPool) {
        let store = store(pool.clone()).await;
        // Stored versions: rows of `channel_values`, and versions in checkpoint rows.
        let rows = || async {
            let n: (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM agentic.channel_values),
                        (SELECT coalesce(sum(cardinality(channels)), 0)::int8 FROM agentic.checkpoints)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            n
        };
        fill_for_prune(&store).await;
        // Every step committed alone: its versions are in its checkpoint's row.
        assert_eq!(rows().await, (0, 1 + 2 * 20));
        assert_eq!(store.prune("t", 2).await.unwrap(), 19);
        // `once` from checkpoint 1, the two newest `n`, and the whole `log` chain (20 rows); the
        // versions of deleted checkpoints still in use moved out of their rows: `once` and 18
        // `log` rows.
        assert_eq!(rows().await, (1 + 18, 2 + 2));
        assert_eq!(
            store.load("t", "", None).await.unwrap().unwrap().values,
            values(&[
                ("once", json!("only at checkpoint 1")),
                ("n", json!(19)),
                ("log", json!((0..20).collect::<Vec<_>>()))
            ])
        );
    }

    #[sqlx::test(migrations = false)]
    async fn resuming_a_1000_step_thread_loads_its_whole_delta_chain(pool: PgPool) {
        // The time this takes is measured by the benchmark harness (`agentic-bench resume`), not here.
        let store = store(pool).await;
        let writer = lease(&store, "long", "runner").await;
        let mut chain = Chain::new("long", "");
        for i in 0..1000 {
            let commit = chain.next(&writer).set("n", &json!(i)).append(
                "messages",
                chain.head,
                &json!([{"role": "ai", "content": format!("step {i}")}]),
            );
            chain.commit(&store, &writer, commit).await.unwrap();
        }
        drop(writer);
        for _ in 0..3 {
            let resumed = lease(&store, "long", "runner").await;
            let head = store.load("long", "", None).await.unwrap().unwrap();
            let writes = store
                .pending_writes(StepRef { thread: "long", ns: "", checkpoint: head.id, epoch: None })
                .await
                .unwrap();
            let messages = head.values["messages"].as_array().cloned().unwrap_or_default();
            assert_eq!(messages.len(), 1000);
            assert_eq!(messages[999]["content"], json!("step 999"));
            assert_eq!(head.values["n"], json!(999));
            assert!(writes.is_empty());
            drop(resumed);
            // The released lease's connection goes back to its pool in the background.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn connection_errors_never_show_the_url_or_password() {
        for url in ["postgres://agentic:s3cr3t-pw@127.0.0.1:1/agentic", "postgres://agentic:s3cr3t-pw@[::1/agentic"] {
            let Err(err) = PostgresCheckpointer::connect(url).await else { panic!("{url} connected") };
            let message = err.to_string();
            assert!(!message.contains("s3cr3t-pw") && !message.contains("agentic:"), "{message}");
            assert!(matches!(err, Error::Checkpoint { backend: "postgres", .. }), "{err:?}");
            let Err(err) = agentic_runtime::checkpoint::connect(url).await else { panic!("{url} connected") };
            assert!(!err.to_string().contains("s3cr3t-pw"), "{err}");
        }
        let Err(refused) = PostgresCheckpointer::connect("postgres://agentic:s3cr3t-pw@127.0.0.1:1/agentic").await
        else {
            panic!("connected")
        };
        assert!(refused.is_transient(), "a refused connection may be retried: {refused}");
    }

    #[sqlx::test(migrations = false)]
    async fn connect_sets_generic_plans_and_no_sequential_scans_on_its_connections(pool: PgPool) {
        let url = url_of(&pool);
        let store = PostgresCheckpointer::connect(&url).await.unwrap();
        let (plans, seqscan): (String, String) =
            sqlx::query_as("SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan')")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!((plans.as_str(), seqscan.as_str()), ("force_generic_plan", "off"));
        // The pool's own connections keep the server defaults.
        let default: String =
            sqlx::query_scalar("SELECT current_setting('enable_seqscan')").fetch_one(&pool).await.unwrap();
        assert_eq!(default, "on");
    }

    #[sqlx::test(migrations = false)]
    async fn sixty_four_concurrent_threads_use_at_most_the_connections_the_readme_states(pool: PgPool) {
        // The store's sessions carry their own name, to be told from the test's.
        let url = format!("{}?application_name=store-under-test", url_of(&pool));
        let store = PostgresCheckpointer::connect(&url).await.unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (pool, done) = (pool.clone(), std::sync::Arc::clone(&done));
            tokio::spawn(async move {
                let mut most = 0i64;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND application_name = 'store-under-test'",
                    )
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    most = most.max(n);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                most
            })
        };
        let runners: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let thread = format!("t{i}");
                    let lease = lease(&store, &thread, "runner").await;
                    let mut chain = Chain::new(&thread, "");
                    for step in 0..10 {
                        chain.set(&store, &lease, "x", &json!(step)).await;
                    }
                    drop(lease);
                    store.head(&thread, "").await.unwrap()
                })
            })
            .collect();
        for runner in runners {
            assert_eq!(runner.await.unwrap(), Some(10));
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        let most = sampler.await.unwrap();
        // A pool of up to 16, the lease session, up to four commit connections.
        assert!(most >= 2, "the sampler saw the store's sessions: {most}");
        assert!(most <= 16 + 1 + 4, "{most} sessions at once");
    }

    #[sqlx::test(migrations = false)]
    async fn connect_picks_the_backend_from_the_url(pool: PgPool) {
        let url = url_of(&pool);
        let dir = TempDir::new("connect");
        let sqlite_file = dir.join("by-url.db");
        let cases = [
            (url, "postgres"),
            ("memory:".to_owned(), "memory"),
            (format!("sqlite://{}", sqlite_file.display()), "sqlite"),
            (format!("sqlite:{}", dir.join("short.db").display()), "sqlite"),
            (dir.join("bare.db").display().to_string(), "sqlite"),
            ("sqlite::memory:".to_owned(), "sqlite"),
        ];
        for (url, backend) in cases {
            let store = agentic_runtime::checkpoint::connect(&url).await.unwrap();
            assert_eq!(store.backend(), backend, "{url}");
            let lease = lease(store.as_ref(), "t", "runner").await;
            Chain::new("t", "").set(store.as_ref(), &lease, "x", &json!(backend)).await;
            assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values, values(&[("x", json!(backend))]));
        }
        assert!(sqlite_file.exists());
        let unsupported = agentic_runtime::checkpoint::connect("mysql://root:pw@localhost/db").await.map(|_| ());
        let err = refused(unsupported, "an unsupported scheme", |e| matches!(e, Error::Checkpoint { .. }));
        assert!(err.to_string().contains("mysql") && !err.to_string().contains("pw"), "{err}");
    }
}

/// Checks only SQLite can make: leases held by live processes, files that outlive the store.
mod sqlite_only {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    const LEASE_FILE_VAR: &str = "AGENTIC_TEST_SQLITE_LEASE_FILE";

    fn hostname() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned()
    }

    async fn set_holder(store: &SqliteCheckpointer, thread: &str, holder: &str) {
        sqlx::query("UPDATE threads SET holder = ?1 WHERE thread_id = ?2")
            .bind(holder)
            .bind(thread)
            .execute(store.pool())
            .await
            .unwrap();
    }

    async fn holder(store: &SqliteCheckpointer, thread: &str) -> Option<String> {
        sqlx::query_scalar("SELECT holder FROM threads WHERE thread_id = ?1")
            .bind(thread)
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    /// A thread taken by a lease that was then released, its holder row ready to be forged.
    async fn released_thread(store: &SqliteCheckpointer) -> u64 {
        let first = lease(store, "t", "runner-a").await;
        Chain::new("t", "").set(store, &first, "x", &json!(1)).await;
        first.epoch
    }

    /// Run by `a_lease_held_by_a_killed_process_is_taken_over_at_once` in a child process.
    #[tokio::test]
    #[ignore = "a helper: run in a child process that holds a lease until it is killed"]
    async fn holds_a_sqlite_lease_until_killed() {
        let Ok(file) = std::env::var(LEASE_FILE_VAR) else { return };
        let store = SqliteCheckpointer::open(&file).await.unwrap();
        let lease = lease(&store, "t", "child-runner").await;
        Chain::new("t", "").set(&store, &lease, "x", &json!("from the child")).await;
        println!("leased");
        tokio::time::sleep(Duration::from_mins(1)).await;
    }

    #[tokio::test]
    async fn a_lease_held_by_a_killed_process_is_taken_over_at_once() {
        let dir = TempDir::new("kill");
        let file = dir.join("store.db");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["sqlite_only::holds_a_sqlite_lease_until_killed", "--exact", "--ignored", "--nocapture"])
            .env(LEASE_FILE_VAR, &file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let leased = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.trim() == "leased")
        });
        let leased = tokio::time::timeout(Duration::from_mins(1), leased).await;
        assert!(matches!(leased, Ok(Ok(true))), "the child took the lease");

        let store = SqliteCheckpointer::open(&file).await.unwrap();
        let pid = child.id();
        let err = refused(try_lease(&store, "t", "runner-b").await, "LeaseHeld", |e| {
            matches!(e, Error::LeaseHeld { owner, until, .. }
                if owner == "child-runner" && *until == format!("held while process {pid} lives"))
        });
        assert!(err.to_string().contains("child-runner"), "{err}");

        child.kill().unwrap();
        child.wait().unwrap();
        let taken = lease(&store, "t", "runner-b").await;
        assert_eq!(taken.epoch, 2);
        assert_eq!(taken.next_checkpoint_id(), 2);
        let head = store.load("t", "", None).await.unwrap().unwrap();
        assert_eq!(head.values, values(&[("x", json!("from the child"))]));
    }

    #[tokio::test]
    async fn a_holder_on_another_host_keeps_the_thread() {
        let dir = TempDir::new("host");
        let store = SqliteCheckpointer::open(dir.join("store.db")).await.unwrap();
        released_thread(&store).await;
        set_holder(&store, "t", "build-box-7:4242:123@abcdef12:n0nce").await;

        let err = refused(
            try_lease(&store, "t", "runner-b").await,
            "LeaseHeld",
            |e| matches!(e, Error::LeaseHeld { owner, .. } if owner == "runner-a"),
        );
        assert!(err.to_string().contains("held while process 4242 on host `build-box-7` lives"), "{err}");
    }

    #[tokio::test]
    async fn a_holder_whose_process_is_gone_or_whose_pid_was_reused_does_not_block() {
        let dir = TempDir::new("gone");
        let store = SqliteCheckpointer::open(dir.join("store.db")).await.unwrap();
        let first_epoch = released_thread(&store).await;

        let mut exited = Command::new("true").spawn().unwrap();
        exited.wait().unwrap();
        set_holder(&store, "t", &format!("{}:{}:1@00000000:gone", hostname(), exited.id())).await;
        let after_exit = lease(&store, "t", "runner-b").await;
        assert_eq!(after_exit.epoch, first_epoch + 1);
        drop(after_exit);

        // A live process that holds the recorded pid but started at another time.
        let mut reused = Command::new("sleep").arg("30").spawn().unwrap();
        set_holder(&store, "t", &format!("{}:{}:1@00000000:reused", hostname(), reused.id())).await;
        let after_reuse = try_lease(&store, "t", "runner-c").await;
        reused.kill().unwrap();
        reused.wait().unwrap();
        assert_eq!(after_reuse.unwrap().epoch, first_epoch + 2);
    }

    #[tokio::test]
    async fn a_dropped_lease_clears_its_holder_and_the_file_keeps_the_thread() {
        let dir = TempDir::new("reopen");
        let file = dir.join("store.db");
        let store = SqliteCheckpointer::open(&file).await.unwrap();
        let first = lease(&store, "t", "runner-a").await;
        assert!(holder(&store, "t").await.is_some());
        Chain::new("t", "").append(&store, &first, "log", &json!(["kept"])).await;
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        while holder(&store, "t").await.is_some() {
            assert!(Instant::now() < deadline, "the holder is cleared");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(store);

        let reopened = SqliteCheckpointer::open(&file).await.unwrap();
        let second = lease(&reopened, "t", "runner-b").await;
        assert_eq!(second.epoch, 2);
        let head = reopened.load("t", "", None).await.unwrap().unwrap();
        assert_eq!(head.values, values(&[("log", json!(["kept"]))]));
    }

    #[tokio::test]
    async fn prune_deletes_the_channel_values_no_kept_checkpoint_needs() {
        let dir = TempDir::new("prune");
        let store = SqliteCheckpointer::open(dir.join("store.db")).await.unwrap();
        let rows = || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM channel_values").fetch_one(store.pool()).await.unwrap();
            n
        };
        fill_for_prune(&store).await;
        assert_eq!(rows().await, 1 + 2 * 20);
        assert_eq!(store.prune("t", 2).await.unwrap(), 19);
        assert_eq!(rows().await, 1 + 2 + 20);
    }
}

/// Twenty-one checkpoints: `once` written by the first only, then `n` and an append chain `log`
/// written by each of the next twenty.
async fn fill_for_prune(store: &dyn Checkpointer) {
    let lease = lease(store, "t", "runner").await;
    let mut chain = Chain::new("t", "");
    chain.set(store, &lease, "once", &json!("only at checkpoint 1")).await;
    for i in 0..20 {
        let base = (i > 0).then(|| chain.head.unwrap());
        let commit = chain.next(&lease).set("n", &json!(i)).append("log", base, &json!([i]));
        chain.commit(store, &lease, commit).await.unwrap();
    }
}

#[tokio::test]
async fn memory_and_sqlite_stores_name_their_backend() {
    let dir = TempDir::new("names");
    assert_eq!(MemoryCheckpointer::new().backend(), "memory");
    assert_eq!(SqliteCheckpointer::open(dir.join("s.db")).await.unwrap().backend(), "sqlite");
    assert_eq!(SqliteCheckpointer::open_in_memory().await.unwrap().backend(), "sqlite");
}
