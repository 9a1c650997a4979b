//! The embedded broker delivers every retained publish a new subscription matches, however
//! many more there are than fit its in-flight window, and keeps acknowledging a client whose
//! window is full. Real broker, real rumqttc clients, no fixed ports.

mod common;

use cloud_stub::MqttTarget;
use common::WAIT;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS};
use std::collections::HashSet;
use tokio::sync::mpsc;

/// Retained publishes on distinct topics: fifteen times the broker's in-flight window (100).
const RETAINED: usize = 1_500;

/// A client whose events arrive on a channel (the event loop runs in its own task).
struct Client {
    mqtt: AsyncClient,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Client {
    async fn connect(broker: &MqttTarget, id: &str, manual_acks: bool) -> Client {
        let mut options = MqttOptions::new(id, broker.host.clone(), broker.port);
        options.set_manual_acks(manual_acks);
        let (mqtt, eventloop) = AsyncClient::new(options, 2 * RETAINED);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(run(eventloop, tx));
        let mut client = Client { mqtt, events };
        client
            .next_matching(|e| matches!(e, Event::Incoming(Packet::ConnAck(_))))
            .await;
        client
    }

    /// The next event, or a failure after [`WAIT`] without one.
    async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no MQTT event within the wait")
            .expect("the event loop has stopped")
    }

    async fn next_matching(&mut self, wanted: impl Fn(&Event) -> bool) -> Event {
        loop {
            let event = self.next().await;
            if wanted(&event) {
                return event;
            }
        }
    }

    async fn next_publish(&mut self) -> Publish {
        match self
            .next_matching(|e| matches!(e, Event::Incoming(Packet::Publish(_))))
            .await
        {
            Event::Incoming(Packet::Publish(p)) => p,
            _ => unreachable!(),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.mqtt.subscribe(filter, qos).await.unwrap();
        self.next_matching(|e| matches!(e, Event::Incoming(Packet::SubAck(_))))
            .await;
    }

    /// Publishes at QoS 1 and returns once the broker has acknowledged it.
    async fn publish_acked(&mut self, topic: String, retain: bool, payload: Vec<u8>) {
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
        let pkid = match self
            .next_matching(|e| matches!(e, Event::Outgoing(Outgoing::Publish(_))))
            .await
        {
            Event::Outgoing(Outgoing::Publish(pkid)) => pkid,
            _ => unreachable!(),
        };
        self.next_matching(|e| matches!(e, Event::Incoming(Packet::PubAck(a)) if a.pkid == pkid))
            .await;
    }
}

async fn run(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Event>) {
    while let Ok(event) = eventloop.poll().await {
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// Publishes [`RETAINED`] retained messages on `{prefix}/{i}` and waits for every broker
/// acknowledgement, so all of them are in the broker's retained set.
async fn publish_retained(broker: &MqttTarget, prefix: &str) {
    let mut publisher = Client::connect(broker, &format!("{prefix}-publisher"), false).await;
    for i in 0..RETAINED {
        publisher
            .mqtt
            .publish(
                format!("{prefix}/{i}"),
                QoS::AtLeastOnce,
                true,
                vec![1u8; 16],
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < RETAINED {
        if let Event::Incoming(Packet::PubAck(_)) = publisher.next().await {
            acked += 1;
        }
    }
}

/// Subscribes `subscriber` to `{prefix}/#`, then has `live` publish one ordinary message on
/// the filter, and checks that every retained publish arrives once, flagged retained, and the
/// live one after all of them.
async fn all_retained_then_live(
    subscriber: &mut Client,
    live: &mut Client,
    prefix: &str,
    qos: QoS,
) {
    subscriber.subscribe(&format!("{prefix}/#"), qos).await;
    let live_topic = format!("{prefix}/live");
    live.publish_acked(live_topic.clone(), false, b"live".to_vec())
        .await;

    let mut topics = HashSet::new();
    while topics.len() < RETAINED {
        let p = subscriber.next_publish().await;
        assert!(
            p.topic != live_topic,
            "the live publish came after only {} of {RETAINED} retained ones",
            topics.len()
        );
        assert!(p.retain, "{} arrived without the retain flag", p.topic);
        assert!(topics.insert(p.topic.clone()), "{} arrived twice", p.topic);
    }
    assert_eq!(subscriber.next_publish().await.topic, live_topic);
}

#[tokio::test]
async fn a_new_subscription_gets_every_retained_publish_at_qos_1() {
    let broker = common::broker().await;
    publish_retained(&broker, "announce").await;
    let mut live = Client::connect(&broker, "live", false).await;
    let mut subscriber = Client::connect(&broker, "cloud", false).await;
    all_retained_then_live(&mut subscriber, &mut live, "announce", QoS::AtLeastOnce).await;
}

#[tokio::test]
async fn a_new_subscription_gets_every_retained_publish_at_qos_0() {
    let broker = common::broker().await;
    publish_retained(&broker, "state").await;
    let mut live = Client::connect(&broker, "live", false).await;
    let mut subscriber = Client::connect(&broker, "cloud", false).await;
    all_retained_then_live(&mut subscriber, &mut live, "state", QoS::AtMostOnce).await;
}

#[tokio::test]
async fn a_client_with_a_full_window_still_gets_its_acknowledgements() {
    let broker = common::broker().await;
    let mut cloud = Client::connect(&broker, "cloud", true).await;
    cloud.subscribe("up/#", QoS::AtLeastOnce).await;

    // 150 publishes for the cloud, which acknowledges none: the broker sends 100 (its window)
    // and holds the rest.
    let mut gateway = Client::connect(&broker, "gateway", false).await;
    for i in 0..150u32 {
        gateway
            .publish_acked("up/state".into(), false, i.to_be_bytes().to_vec())
            .await;
    }
    let mut unacked = Vec::new();
    for _ in 0..100 {
        unacked.push(cloud.next_publish().await);
    }

    // Its own publish is acknowledged although its window is full.
    cloud
        .publish_acked("down/rpc".into(), false, b"call".to_vec())
        .await;

    // Acknowledging frees the window: the other 50 follow, in order.
    for p in &unacked {
        cloud.mqtt.ack(p).await.unwrap();
    }
    for i in 100..150u32 {
        let p = cloud.next_publish().await;
        assert_eq!(p.payload.as_ref(), i.to_be_bytes());
        cloud.mqtt.ack(&p).await.unwrap();
    }
}
