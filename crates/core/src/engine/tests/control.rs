//! Weight updates, pause and resume on the fake backend: drained requests finish on the old
//! weights, aborted ones end with `Aborted`, the swap happens with no KV state alive, a bad
//! checkpoint keeps the old weights, and a paused engine steps nothing.

use std::time::Duration;

use super::*;

/// The greedy continuation of `prompt` under the fake's `weights`, computed directly.
fn greedy_under(weights: u32, prompt: &[TokenId], len: usize) -> Vec<TokenId> {
    let mut hist = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..len {
        let t = crate::sampling::argmax(&fake_row(&hist, weights));
        out.push(t);
        hist.push(t);
    }
    out
}

fn greedy(prompt: &[TokenId], len: usize) -> GenerateRequest {
    GenerateRequest::new(
        prompt.to_vec(),
        SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(len)
        },
    )
}

fn gated_engine(config: EngineConfig) -> (Engine, Arc<Counters>, flume::Sender<()>) {
    let (backend, counters, gate) = FakeBackend::gated(64);
    (Engine::start(backend, config).unwrap(), counters, gate)
}

/// Waits (generously) until the backend has started `n` forward passes.
fn wait_for_steps(counters: &Counters, n: usize) {
    let start = std::time::Instant::now();
    while counters.steps.load(Ordering::Relaxed) < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the engine never stepped"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A reply that has not arrived within `wait` (polled on a helper thread).
fn arrives_within<T: Send + 'static>(pending: Pending<T>, wait: Duration) -> Option<T> {
    let (tx, rx) = flume::bounded(1);
    std::thread::spawn(move || drop(tx.send(pending.wait())));
    rx.recv_timeout(wait)
        .ok()
        .map(|r| r.expect("the request failed"))
}

/// Lets the engine take two steps, pauses it in place (the one request still running), then
/// opens the gate for good; checks the pause report.
fn pause_after_two_steps(e: &Engine, counters: &Counters, gate: flume::Sender<()>) {
    gate.send(()).unwrap();
    gate.send(()).unwrap();
    wait_for_steps(counters, 2);
    let pause = e.pause(PauseMode::InPlace);
    // The engine may be waiting inside its third forward: let that one finish.
    gate.send(()).unwrap();
    let report = pause.wait().unwrap();
    drop(gate);
    assert_eq!(
        report,
        PauseReport {
            aborted_requests: 0,
            paused_requests: 1
        }
    );
}

#[test]
fn the_weights_differ_so_the_tests_can_tell_them_apart() {
    let prompt = [1, 2, 3];
    assert_ne!(greedy_under(0, &prompt, 8), greedy_under(1, &prompt, 8));
    assert_ne!(greedy_under(1, &prompt, 8), greedy_under(2, &prompt, 8));
}

#[test]
fn drain_finishes_running_requests_on_the_old_weights_then_swaps() {
    let (e, counters, gate) = gated_engine(EngineConfig::default());
    let (a_prompt, b_prompt) = ([1, 2, 3], [4, 5, 6]);
    let a = e.generate(greedy(&a_prompt, 12));
    gate.send(()).unwrap();
    wait_for_steps(&counters, 1);
    // A has prefilled and is decoding; the update and B arrive while it runs.
    let update = e.update_weights(WeightUpdate::new("weights-1", UpdateMode::Drain));
    let b = e.generate(greedy(&b_prompt, 12));
    assert_eq!(e.weight_version(), "0");
    drop(gate);
    let report = update.wait().unwrap();
    assert_eq!(report.weight_version, "1");
    assert_eq!(report.drained_requests, 1);
    assert_eq!(report.aborted_requests, 0);
    assert_eq!(report.held_requests, 1, "B waited for the swap");
    let a = a.wait().unwrap();
    let b = b.wait().unwrap();
    assert_eq!(a.sequences[0].tokens, greedy_under(0, &a_prompt, 12));
    assert_eq!(b.sequences[0].tokens, greedy_under(1, &b_prompt, 12));
    assert_eq!(*counters.slots_at_update.lock().unwrap(), vec![0]);
    assert_eq!(e.weight_version(), "1");
    assert_eq!(e.weight_updates(), 1);

    // A named version, then the counter again.
    let mut named = WeightUpdate::new("weights-2", UpdateMode::Drain);
    named.weight_version = Some("step-7".into());
    assert_eq!(
        e.update_weights(named).wait().unwrap().weight_version,
        "step-7"
    );
    assert_eq!(e.weight_version(), "step-7");
    let again = WeightUpdate::new("weights-1", UpdateMode::Drain);
    assert_eq!(e.update_weights(again).wait().unwrap().weight_version, "3");
    let c = e.generate(greedy(&a_prompt, 6)).wait().unwrap();
    assert_eq!(c.sequences[0].tokens, greedy_under(1, &a_prompt, 6));
}

#[test]
fn abort_ends_running_and_queued_requests_then_swaps() {
    let (e, counters, gate) = gated_engine(EngineConfig {
        max_num_seqs: 2,
        ..EngineConfig::default()
    });
    let running = e.generate(greedy(&[1, 2, 3], 30));
    let mut stream = e.generate_stream(greedy(&[7, 8], 30));
    // Both slots are taken: this one waits in the queue.
    let queued = e.generate(greedy(&[9, 9], 30));
    gate.send(()).unwrap();
    gate.send(()).unwrap();
    wait_for_steps(&counters, 2);
    let update = e.update_weights(WeightUpdate::new("weights-2", UpdateMode::Abort));
    drop(gate);
    let report = update.wait().unwrap();
    assert_eq!(report.aborted_requests, 3);
    assert_eq!(report.drained_requests, 0);
    let aborted = EngineError::Aborted {
        by: "a weight update (abort_all_requests)",
    };
    assert_eq!(running.wait().unwrap_err(), aborted);
    assert_eq!(queued.wait().unwrap_err(), aborted);
    // The stream got what was produced before the abort, then the error, then nothing.
    let items: Vec<_> = stream.by_ref().collect();
    assert_eq!(items.last(), Some(&Err(aborted.clone())), "{items:?}");
    assert!(items[..items.len() - 1].iter().all(Result::is_ok));
    let after = e.generate(greedy(&[1, 2, 3], 8)).wait().unwrap();
    assert_eq!(after.sequences[0].tokens, greedy_under(2, &[1, 2, 3], 8));
    let stats = e.stats().unwrap();
    assert_eq!(stats.free_slots, 2);
    assert_eq!(stats.failed_requests_total, 3);
    assert_eq!(*counters.slots_at_update.lock().unwrap(), vec![0]);
}

#[test]
fn a_bad_checkpoint_keeps_the_old_weights_serving() {
    let (e, _) = engine(EngineConfig::default());
    let prompt = [3, 1, 4];
    let err = e
        .update_weights(WeightUpdate::new("mismatch", UpdateMode::Drain))
        .wait()
        .unwrap_err();
    assert!(matches!(err, WeightUpdateError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("hidden_size"), "{err}");
    let err = e
        .update_weights(WeightUpdate::new("panic", UpdateMode::Abort))
        .wait()
        .unwrap_err();
    assert!(matches!(err, WeightUpdateError::Panicked(ref m) if m.contains("fake loader bug")));
    assert_eq!(e.weight_version(), "0");
    assert_eq!(e.weight_updates(), 0);
    let out = e.generate(greedy(&prompt, 8)).wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(0, &prompt, 8));
}

/// A backend with a weight stager: the checkpoint is read on the `infermux-weights` thread
/// while the running request keeps stepping on the old weights; the swap waits for the read.
#[test]
fn a_staged_checkpoint_is_read_while_running_requests_step_on() {
    let (mut backend, counters, gate) = FakeBackend::gated(64);
    let (stage, stage_gate) = flume::unbounded();
    backend.stage_gate = Some(stage_gate);
    let e = Engine::start(backend, EngineConfig::default()).unwrap();
    let a_prompt = [1, 2, 3];
    let a = e.generate(greedy(&a_prompt, 12));
    gate.send(()).unwrap();
    wait_for_steps(&counters, 1);
    let update = e.update_weights(WeightUpdate::new("weights-1", UpdateMode::Drain));
    let b = e.generate(greedy(&[4, 5, 6], 12));
    drop(gate);
    // The read is held: A still finishes, on the old weights, and nothing swaps.
    let a = a.wait().unwrap();
    assert_eq!(a.sequences[0].tokens, greedy_under(0, &a_prompt, 12));
    let (tx, report) = flume::bounded(1);
    std::thread::spawn(move || drop(tx.send(update.wait())));
    assert!(
        report.recv_timeout(Duration::from_millis(200)).is_err(),
        "swapped before the read finished"
    );
    assert_eq!(e.weight_version(), "0");
    drop(stage);
    let report = report.recv().unwrap().unwrap();
    assert_eq!((report.drained_requests, report.held_requests), (1, 1));
    let b = b.wait().unwrap();
    assert_eq!(b.sequences[0].tokens, greedy_under(1, &[4, 5, 6], 12));
    assert_eq!(e.weight_version(), "1");
    assert_eq!(*counters.slots_at_update.lock().unwrap(), vec![0]);
    assert_eq!(
        *counters.stager_threads.lock().unwrap(),
        vec!["infermux-weights".to_string()]
    );
    // A bad checkpoint or a panicking read is typed, and the weights read last keep serving.
    let err = e
        .update_weights(WeightUpdate::new("mismatch", UpdateMode::Drain))
        .wait()
        .unwrap_err();
    assert!(matches!(err, WeightUpdateError::Mismatch { .. }), "{err}");
    let err = e
        .update_weights(WeightUpdate::new("panic", UpdateMode::Abort))
        .wait()
        .unwrap_err();
    assert!(matches!(err, WeightUpdateError::Panicked(ref m) if m.contains("fake loader bug")));
    let out = e.generate(greedy(&a_prompt, 8)).wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(1, &a_prompt, 8));
    assert_eq!(e.weight_updates(), 1);
}

/// An abort-mode update replacing a drain-mode one whose checkpoint is still being read: the
/// new read waits for the replaced one (never two at once), which is dropped, and the new
/// weights are the ones swapped in.
#[test]
fn an_abort_update_replaces_a_read_in_progress() {
    let (mut backend, counters, gate) = FakeBackend::gated(64);
    let (stage, stage_gate) = flume::unbounded();
    backend.stage_gate = Some(stage_gate);
    let e = Engine::start(backend, EngineConfig::default()).unwrap();
    let long = e.generate(greedy(&[1, 2], 60));
    let wait_for = |what: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !what() {
            assert!(start.elapsed() < Duration::from_secs(10), "timed out");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    gate.send(()).unwrap();
    wait_for_steps(&counters, 1);
    // Each permit lets one step finish; the engine takes commands between steps.
    let draining = e.update_weights(WeightUpdate::new("weights-1", UpdateMode::Drain));
    gate.send(()).unwrap();
    wait_for(&|| counters.reads.load(Ordering::SeqCst) == 1);
    let forced = e.update_weights(WeightUpdate::new("weights-2", UpdateMode::Abort));
    gate.send(()).unwrap();
    assert!(matches!(
        draining.wait(),
        Err(WeightUpdateError::Superseded)
    ));
    // Time for a second read to start, were it not waiting for the first.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counters.peak_reads.load(Ordering::SeqCst), 1);
    drop(stage);
    drop(gate);
    let report = forced.wait().unwrap();
    assert_eq!(
        (report.weight_version.as_str(), report.aborted_requests),
        ("1", 1)
    );
    assert!(matches!(long.wait(), Err(EngineError::Aborted { .. })));
    let out = e.generate(greedy(&[4, 4], 3)).wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(2, &[4, 4], 3));
    assert_eq!(counters.stager_threads.lock().unwrap().len(), 2);
    assert_eq!(counters.peak_reads.load(Ordering::SeqCst), 1);
    assert_eq!(*counters.slots_at_update.lock().unwrap(), vec![0]);
}

#[test]
fn a_second_update_while_one_drains_is_refused() {
    let (e, counters, gate) = gated_engine(EngineConfig::default());
    let a = e.generate(greedy(&[1, 2], 10));
    gate.send(()).unwrap();
    wait_for_steps(&counters, 1);
    let first = e.update_weights(WeightUpdate::new("weights-1", UpdateMode::Drain));
    let second = e.update_weights(WeightUpdate::new("weights-2", UpdateMode::Drain));
    drop(gate);
    assert!(matches!(second.wait(), Err(WeightUpdateError::InProgress)));
    assert_eq!(first.wait().unwrap().weight_version, "1");
    assert_eq!(
        a.wait().unwrap().sequences[0].tokens,
        greedy_under(0, &[1, 2], 10)
    );
}

#[test]
fn an_abort_update_replaces_one_that_drains() {
    let (e, counters, gate) = gated_engine(EngineConfig::default());
    let long = e.generate(greedy(&[1, 2], 60));
    gate.send(()).unwrap();
    wait_for_steps(&counters, 1);
    let draining = e.update_weights(WeightUpdate::new("weights-1", UpdateMode::Drain));
    let forced = e.update_weights(WeightUpdate::new("weights-2", UpdateMode::Abort));
    drop(gate);
    assert!(matches!(
        draining.wait(),
        Err(WeightUpdateError::Superseded)
    ));
    let report = forced.wait().unwrap();
    assert_eq!(
        (report.weight_version.as_str(), report.aborted_requests),
        ("1", 1)
    );
    assert!(matches!(long.wait(), Err(EngineError::Aborted { .. })));
    let out = e.generate(greedy(&[4, 4], 3)).wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(2, &[4, 4], 3));
}

#[test]
fn a_paused_engine_steps_nothing_until_resumed() {
    let (e, counters, gate) = gated_engine(EngineConfig::default());
    let prompt = [5, 6, 7];
    let running = e.generate(greedy(&prompt, 40));
    pause_after_two_steps(&e, &counters, gate);
    assert!(e.is_paused());
    let steps = counters.steps.load(Ordering::Relaxed);
    let queued = e.generate(greedy(&[8, 9], 4));
    let queued = arrives_within(queued, Duration::from_millis(1200));
    assert!(queued.is_none(), "a request ran while paused");
    assert_eq!(counters.steps.load(Ordering::Relaxed), steps);
    // Alive while paused: it keeps publishing, so readiness does not see a stuck engine.
    let idle = e.since_progress().unwrap();
    assert!(
        idle < Duration::from_millis(1100),
        "no publish for {idle:?}"
    );
    let stats = e.stats().unwrap();
    assert_eq!((stats.running_requests, stats.waiting_requests), (1, 1));
    e.resume().wait().unwrap();
    assert!(!e.is_paused());
    let out = running.wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(0, &prompt, 40));
    let again = e.generate(greedy(&[8, 9], 4)).wait().unwrap();
    assert_eq!(again.sequences[0].tokens, greedy_under(0, &[8, 9], 4));
}

#[test]
fn an_aborting_pause_ends_what_runs_and_holds_what_comes() {
    let (e, counters, gate) = gated_engine(EngineConfig::default());
    let running = e.generate(greedy(&[1, 2, 3], 40));
    gate.send(()).unwrap();
    wait_for_steps(&counters, 1);
    let pause = e.pause(PauseMode::Abort);
    // The engine may be waiting inside its second forward: open the gate for good so it
    // returns and takes the pause before its next step.
    drop(gate);
    let report = pause.wait().unwrap();
    assert_eq!(report.aborted_requests, 1);
    assert!(matches!(
        running.wait(),
        Err(EngineError::Aborted { by }) if by.contains("pause")
    ));
    let held = e.generate(greedy(&[4, 4], 3));
    assert!(arrives_within(held, Duration::from_millis(300)).is_none());
    e.resume().wait().unwrap();
    let out = e.generate(greedy(&[4, 4], 3)).wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(0, &[4, 4], 3));
}

#[test]
fn a_drain_update_while_paused_finishes_running_requests_and_stays_paused() {
    let (e, counters, gate) = gated_engine(EngineConfig::default());
    let prompt = [2, 7, 1];
    let running = e.generate(greedy(&prompt, 30));
    pause_after_two_steps(&e, &counters, gate);
    let report = e
        .update_weights(WeightUpdate::new("weights-1", UpdateMode::Drain))
        .wait()
        .unwrap();
    assert_eq!(report.drained_requests, 1);
    assert!(e.is_paused(), "the update keeps the pause");
    let out = running.wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(0, &prompt, 30));
    let held = e.generate(greedy(&prompt, 5));
    e.resume().wait().unwrap();
    assert_eq!(
        held.wait().unwrap().sequences[0].tokens,
        greedy_under(1, &prompt, 5)
    );

    // keep_paused: an engine that was running is left paused by the update.
    let mut update = WeightUpdate::new("weights-2", UpdateMode::Drain);
    update.keep_paused = true;
    e.update_weights(update).wait().unwrap();
    assert!(e.is_paused());
    let held = e.generate(greedy(&prompt, 5));
    assert!(arrives_within(held, Duration::from_millis(300)).is_none());
    e.resume().wait().unwrap();
    let out = e.generate(greedy(&prompt, 5)).wait().unwrap();
    assert_eq!(out.sequences[0].tokens, greedy_under(2, &prompt, 5));
}

#[test]
fn cancelled_requests_are_dropped_while_paused() {
    let (e, _) = engine(EngineConfig {
        max_num_seqs: 4,
        ..EngineConfig::default()
    });
    e.pause(PauseMode::InPlace).wait().unwrap();
    let waiting = e.generate(greedy(&[1, 2], 5));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(e.stats().unwrap().waiting_requests, 1);
    drop(waiting);
    let start = std::time::Instant::now();
    while e.stats().unwrap().waiting_requests > 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "never dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
}
