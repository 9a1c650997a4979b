//! Unit tests of the message index: order, window, resend, expiry, feedback rules.

use super::*;
use gatewayd_protocol::message::FeedbackOutcome;

fn gw(s: &str) -> GatewayId {
    GatewayId::new(s).unwrap()
}

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn mid(s: &str) -> MessageId {
    MessageId::new(s).unwrap()
}

fn body(s: &str) -> Arc<Vec<u8>> {
    Arc::new(s.as_bytes().to_vec())
}

/// Enqueues and commits `id` for `device`, expiring at `exp`.
fn add(q: &mut Queue, id: &str, device: &str, exp: u64) {
    q.enqueue(mid(id), dev(device), body(id), exp).unwrap();
    assert!(q.committed(&mid(id)));
}

fn routes(pairs: &[(&str, &str)]) -> HashMap<DeviceId, GatewayId> {
    pairs.iter().map(|(d, g)| (dev(d), gw(g))).collect()
}

fn ids(sends: &[Publish]) -> Vec<&str> {
    sends.iter().map(|p| p.id.as_str()).collect()
}

fn fb(id: &str, device: &str, outcome: FeedbackOutcome) -> Feedback {
    Feedback {
        v: 1,
        id: mid(id),
        device: dev(device),
        outcome,
        reason: None,
        device_status: None,
        at_ms: 0,
    }
}

fn status_of(w: &MessageWrite) -> MessageStatus {
    match w {
        MessageWrite::Status { status, .. } => *status,
        other => panic!("expected a status write, got {other:?}"),
    }
}

#[test]
fn messages_go_out_in_order_only_once_committed_and_routed() {
    let mut q = Queue::new(50, 200);
    let r = routes(&[("d1", "g1")]);
    q.enqueue(mid("m1"), dev("d1"), body("m1"), 1000).unwrap();
    assert!(q.take_sends(&r, 10, 100).0.is_empty(), "not committed yet");
    assert!(q.committed(&mid("m1")));
    add(&mut q, "m2", "d1", 1000);
    add(&mut q, "m3", "d1", 1000);
    assert!(
        q.take_sends(&HashMap::new(), 10, 100).0.is_empty(),
        "no route"
    );
    let (sends, writes) = q.take_sends(&r, 10, 100);
    assert_eq!(ids(&sends), vec!["m1", "m2", "m3"]);
    assert_eq!(writes.len(), 3);
    assert_eq!(q.inflight(&gw("g1")), 3);
    assert!(q.take_sends(&r, 10, 100).0.is_empty(), "sent once");
}

#[test]
fn the_window_bounds_unacknowledged_messages_per_gateway() {
    let mut q = Queue::new(50, 2);
    for i in 0..4 {
        add(&mut q, &format!("m{i}"), "d1", 1000);
    }
    let r = routes(&[("d1", "g1")]);
    assert_eq!(ids(&q.take_sends(&r, 10, 100).0), vec!["m0", "m1"]);
    assert!(q.take_sends(&r, 10, 100).0.is_empty(), "window full");
    let applied = q
        .feedback(
            &gw("g1"),
            None,
            &fb("m0", "d1", FeedbackOutcome::Received),
            11,
        )
        .unwrap();
    assert!(applied.freed_window);
    assert_eq!(applied.status, MessageStatus::Delivered);
    assert_eq!(ids(&q.take_sends(&r, 12, 100).0), vec!["m2"]);
    // A delivered message still counts against the queue limit, not the window.
    assert_eq!(q.open_count(&dev("d1")), 4);
}

#[test]
fn the_queue_limit_counts_open_messages() {
    let mut q = Queue::new(2, 200);
    add(&mut q, "m1", "d1", 1000);
    q.enqueue(mid("m2"), dev("d1"), body("m2"), 1000).unwrap();
    assert_eq!(
        q.enqueue(mid("m3"), dev("d1"), body("m3"), 1000),
        Err(QueueFull { waiting: 2 })
    );
    q.enqueue(mid("x1"), dev("d2"), body("x1"), 1000).unwrap();
    q.abandon(&mid("m2"));
    q.enqueue(mid("m3"), dev("d1"), body("m3"), 1000).unwrap();
}

#[test]
fn a_new_birth_resends_unacknowledged_messages_in_order() {
    let mut q = Queue::new(50, 200);
    add(&mut q, "m1", "d1", 1000);
    add(&mut q, "m2", "d1", 1000);
    let r = routes(&[("d1", "g1")]);
    assert_eq!(q.take_sends(&r, 10, 100).0.len(), 2);
    q.feedback(
        &gw("g1"),
        None,
        &fb("m1", "d1", FeedbackOutcome::Received),
        11,
    )
    .unwrap();
    add(&mut q, "m3", "d1", 1000);
    assert_eq!(q.gateway_online(&gw("g1")), 1);
    assert_eq!(q.inflight(&gw("g1")), 0);
    assert_eq!(ids(&q.take_sends(&r, 12, 100).0), vec!["m2", "m3"]);
}

#[test]
fn a_message_whose_ttl_passes_in_the_cloud_is_expired_and_never_sent() {
    let mut q = Queue::new(50, 200);
    add(&mut q, "m1", "d1", 100);
    add(&mut q, "m2", "d1", 5000);
    assert_eq!(q.next_deadline(), Some(100));
    // The sender re-checks: a due message is expired instead of published.
    let (sends, writes) = q.take_sends(&routes(&[("d1", "g1")]), 100, 100);
    assert_eq!(ids(&sends), vec!["m2"]);
    assert_eq!(status_of(&writes[0]), MessageStatus::Expired);
    match &writes[0] {
        MessageWrite::Status { reason, .. } => {
            assert_eq!(reason.as_deref(), Some(EXPIRED_IN_CLOUD))
        }
        _ => unreachable!(),
    }
    // The expiry task does the same for messages nobody tried to send.
    add(&mut q, "m3", "d2", 200);
    assert!(q.expire_due(199).writes.is_empty());
    let writes = q.expire_due(200).writes;
    assert_eq!(writes.len(), 1);
    assert_eq!(q.open_count(&dev("d2")), 0);
}

#[test]
fn a_published_message_gets_a_grace_period_for_the_gateways_verdict() {
    let mut q = Queue::new(50, 200);
    add(&mut q, "m1", "d1", 100);
    q.take_sends(&routes(&[("d1", "g1")]), 50, 100);
    assert_eq!(q.next_deadline(), Some(100 + UNACKED_GRACE_MS));
    assert!(q.expire_due(100).writes.is_empty());
    // Not resent after its TTL even on a new birth.
    q.gateway_online(&gw("g1"));
    assert!(q
        .take_sends(&routes(&[("d1", "g1")]), 150, 100)
        .0
        .is_empty());
    let writes = q.expire_due(100 + UNACKED_GRACE_MS).writes;
    match &writes[..] {
        [MessageWrite::Status { status, reason, .. }] => {
            assert_eq!(*status, MessageStatus::Expired);
            assert_eq!(reason.as_deref(), Some(EXPIRED_UNACKED));
        }
        other => panic!("{other:?}"),
    }
    // A delivered message is the gateway's to finish: the cloud only asks again after the
    // TTL (see below).
    add(&mut q, "m2", "d1", 100);
    q.take_sends(&routes(&[("d1", "g1")]), 50, 100);
    q.feedback(
        &gw("g1"),
        None,
        &fb("m2", "d1", FeedbackOutcome::Received),
        60,
    )
    .unwrap();
    assert_eq!(q.next_deadline(), Some(100 + VERDICT_GRACE_MS / 3));
}

/// Sends m1 to g1 and has g1 acknowledge it: delivered.
fn deliver(q: &mut Queue, id: &str, exp: u64) {
    add(q, id, "d1", exp);
    let (sends, _) = q.take_sends(&routes(&[("d1", "g1")]), 10, 100);
    assert_eq!(ids(&sends), vec![id]);
    q.feedback(
        &gw("g1"),
        None,
        &fb(id, "d1", FeedbackOutcome::Received),
        11,
    )
    .unwrap();
}

#[test]
fn a_delivered_message_without_a_verdict_is_asked_again_then_may_have_run() {
    let mut q = Queue::new(50, 200).with_verdict_grace(900);
    deliver(&mut q, "m1", 100);
    assert_eq!(q.next_deadline(), Some(100 + 300));
    let due = q.expire_due(400);
    assert_eq!(
        (due.writes.len(), due.probes),
        (0, 1),
        "sent again, still open"
    );
    assert_eq!(q.probe_gateways(), vec![gw("g1")]);
    assert!(q.take_probes(&[], 400, 10).0.is_empty(), "g1 not accepting");
    let (sends, writes) = q.take_probes(&[gw("g1")], 401, 10);
    assert_eq!(ids(&sends), vec!["m1"]);
    assert!(matches!(
        &writes[..],
        [MessageWrite::Sent { at_ms: 401, .. }]
    ));
    assert_eq!(q.inflight(&gw("g1")), 0, "outside the window");
    assert_eq!(q.next_deadline(), Some(100 + 900));
    assert!(q.expire_due(999).writes.is_empty());
    let writes = q.expire_due(1000).writes;
    match &writes[..] {
        [MessageWrite::Status {
            status,
            reason,
            finished_at_ms,
            ..
        }] => {
            assert_eq!(*status, MessageStatus::MayHaveRun);
            assert_eq!(reason.as_deref(), Some(NO_VERDICT));
            assert_eq!(*finished_at_ms, Some(1000));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(q.open_count(&dev("d1")), 0, "the slot is free");
    assert_eq!(q.next_deadline(), None);
}

#[test]
fn a_verdict_that_arrives_after_the_second_send_ends_the_message() {
    let mut q = Queue::new(50, 200).with_verdict_grace(900);
    deliver(&mut q, "m1", 100);
    q.expire_due(400);
    q.take_probes(&[gw("g1")], 401, 10);
    let done = fb("m1", "d1", FeedbackOutcome::MayHaveRun);
    let applied = q.feedback(&gw("g1"), None, &done, 402).unwrap();
    assert_eq!(applied.status, MessageStatus::MayHaveRun);
    assert_eq!(q.next_deadline(), None);
    assert!(q.probe_gateways().is_empty());
}

#[test]
fn delivered_messages_are_asked_again_per_gateway_in_order() {
    let mut q = Queue::new(50, 1);
    deliver(&mut q, "m1", 1000);
    deliver(&mut q, "m2", 1000);
    add(&mut q, "m3", "d2", 1000);
    q.take_sends(&routes(&[("d2", "g2")]), 12, 100);
    q.feedback(
        &gw("g2"),
        None,
        &fb("m3", "d2", FeedbackOutcome::Received),
        13,
    )
    .unwrap();
    add(&mut q, "m4", "d1", 1000);
    assert_eq!(q.probe_delivered(Some(&gw("g1"))), 2);
    assert_eq!(q.probe_delivered(Some(&gw("g1"))), 0, "already waiting");
    assert_eq!(q.probe_gateways(), vec![gw("g1")]);
    let (sends, _) = q.take_probes(&[gw("g1")], 20, 10);
    assert_eq!(ids(&sends), vec!["m1", "m2"]);
    assert_eq!(q.probe_delivered(None), 3);
    // A final feedback takes a message out of the probe line.
    q.feedback(
        &gw("g1"),
        None,
        &fb("m1", "d1", FeedbackOutcome::Completed),
        21,
    )
    .unwrap();
    let (sends, _) = q.take_probes(&[gw("g1"), gw("g2")], 22, 10);
    assert_eq!(ids(&sends), vec!["m2", "m3"]);
    // The queued m4 is not delivered: not probed, still sent in the window as usual.
    assert_eq!(
        ids(&q.take_sends(&routes(&[("d1", "g1")]), 23, 10).0),
        vec!["m4"]
    );
}

#[test]
fn feedback_is_checked_and_moves_forward_only() {
    let mut q = Queue::new(50, 200);
    add(&mut q, "m1", "d1", 1000);
    q.take_sends(&routes(&[("d1", "g1")]), 10, 100);
    let received = fb("m1", "d1", FeedbackOutcome::Received);
    assert_eq!(
        q.feedback(&gw("g2"), None, &received, 11),
        Err(Ignored::WrongGateway(Some(gw("g1"))))
    );
    assert_eq!(
        q.feedback(
            &gw("g1"),
            None,
            &fb("m1", "d2", FeedbackOutcome::Received),
            11
        ),
        Err(Ignored::WrongDevice(dev("d1")))
    );
    assert_eq!(
        q.feedback(
            &gw("g1"),
            None,
            &fb("zz", "d1", FeedbackOutcome::Received),
            11
        ),
        Err(Ignored::NotOpen)
    );
    q.feedback(&gw("g1"), None, &received, 11).unwrap();
    assert_eq!(
        q.feedback(&gw("g1"), None, &received, 12),
        Err(Ignored::NoChange(MessageStatus::Delivered))
    );
    let mut done = fb("m1", "d1", FeedbackOutcome::Rejected);
    done.reason = Some("no mapping".into());
    done.device_status = Some(422);
    let applied = q.feedback(&gw("g1"), None, &done, 13).unwrap();
    assert_eq!(
        applied.write,
        MessageWrite::Status {
            id: mid("m1"),
            device: Some(DeviceId::new("d1").unwrap()),
            status: MessageStatus::Rejected,
            reason: Some("no mapping".into()),
            device_status: Some(422),
            delivered_at_ms: None,
            finished_at_ms: Some(13),
        }
    );
    assert!(!applied.freed_window, "the window was freed by 'received'");
    assert_eq!(
        q.feedback(
            &gw("g1"),
            None,
            &fb("m1", "d1", FeedbackOutcome::Completed),
            14
        ),
        Err(Ignored::NotOpen),
        "final never changes"
    );
    assert_eq!(q.open_count(&dev("d1")), 0);
}

#[test]
fn the_owner_may_answer_for_a_message_not_sent_in_this_run() {
    let mut q = Queue::new(50, 200);
    add(&mut q, "m1", "d1", 1000);
    let done = fb("m1", "d1", FeedbackOutcome::Completed);
    assert!(q.feedback(&gw("g1"), None, &done, 5).is_err());
    let applied = q.feedback(&gw("g1"), Some(&gw("g1")), &done, 5).unwrap();
    assert_eq!(applied.status, MessageStatus::Completed);
    assert!(q.take_sends(&routes(&[("d1", "g1")]), 6, 100).0.is_empty());
}

#[test]
fn purge_finishes_every_open_message_of_the_device() {
    let mut q = Queue::new(50, 200);
    add(&mut q, "m1", "d1", 1000);
    add(&mut q, "m2", "d1", 1000);
    add(&mut q, "x1", "d2", 1000);
    q.take_sends(&routes(&[("d1", "g1")]), 10, 1);
    let writes = q.purge(&dev("d1"), 20);
    assert_eq!(writes.len(), 2);
    assert!(writes.iter().all(|w| status_of(w) == MessageStatus::Purged));
    assert_eq!(q.inflight(&gw("g1")), 0);
    assert_eq!(q.open_count(&dev("d1")), 0);
    assert_eq!(q.open_count(&dev("d2")), 1);
    assert_eq!(q.next_deadline(), Some(1000));
}

#[test]
fn devices_take_turns_in_the_window() {
    let mut q = Queue::new(100, 200);
    for i in 0..40 {
        add(&mut q, &format!("a{i}"), "d1", 1000);
    }
    add(&mut q, "b0", "d2", 1000);
    let r = routes(&[("d1", "g1"), ("d2", "g1")]);
    let (sends, _) = q.take_sends(&r, 10, 1000);
    // d1 gets a quantum, d2 its message, then d1 the rest on the next pass.
    assert_eq!(sends.len(), QUANTUM + 1);
    assert_eq!(sends[QUANTUM].id.as_str(), "b0");
    assert_eq!(q.take_sends(&r, 10, 1000).0.len(), 40 - QUANTUM);
}

#[test]
fn restored_messages_resume_where_they_were() {
    let record = |id: &str, status, gateway: Option<&str>| MessageRecord {
        id: mid(id),
        device: dev("d1"),
        payload: serde_json::json!(1),
        status,
        reason: None,
        device_status: None,
        gateway: gateway.map(gw),
        enqueued_at_ms: 1,
        expires_at_ms: 1000,
        sent_at_ms: None,
        delivered_at_ms: None,
        finished_at_ms: None,
    };
    let mut q = Queue::new(50, 200);
    q.restore(
        &record("m1", MessageStatus::Delivered, Some("g1")),
        body("m1"),
    );
    q.restore(&record("m2", MessageStatus::Queued, Some("g1")), body("m2"));
    q.restore(&record("m3", MessageStatus::Queued, None), body("m3"));
    q.restore(&record("m4", MessageStatus::Completed, None), body("m4"));
    assert_eq!(q.open_count(&dev("d1")), 3);
    assert_eq!(q.inflight(&gw("g1")), 1);
    let r = routes(&[("d1", "g1")]);
    assert_eq!(ids(&q.take_sends(&r, 10, 100).0), vec!["m3"]);
    // The birth resends both unacknowledged ones, in their original order.
    q.gateway_online(&gw("g1"));
    assert_eq!(ids(&q.take_sends(&r, 10, 100).0), vec!["m2", "m3"]);
}
