//! Unsolicited status lines from the serial controller, before, during and after exchanges.

mod common;

use std::time::Duration;

use common::serial::Sim;
use device_fixtures::SerialSimSpec;
use serde_json::json;

const STATUS: &str = "#STAT T=21.5 OK";

#[tokio::test]
async fn unsolicited_lines_come_between_request_and_answer() {
    let mut sim = Sim::start(SerialSimSpec::default()).await;
    let faults = sim.faults(json!({"unsolicited_ms": 20})).await;
    assert_eq!(faults["faults"]["unsolicited_text"], STATUS);
    // On their own, with no request.
    assert_eq!(sim.line().await, STATUS);
    assert_eq!(sim.line().await, STATUS);

    // The answer takes 15 periods: unsolicited lines go out while it is prepared, and go on
    // right after it. Every line stays whole.
    sim.faults(json!({"slow_ms": 300})).await;
    assert_eq!(sim.line().await, STATUS);
    sim.send(b"SETP 30\r\n").await;
    let sent = tokio::time::Instant::now();
    let mut before_answer = 0;
    loop {
        let line = sim.line().await;
        if line == "OK" {
            break;
        }
        assert_eq!(line, STATUS);
        before_answer += 1;
    }
    assert!(sent.elapsed() >= Duration::from_millis(300));
    assert!(before_answer >= 2, "{before_answer} unsolicited lines");
    assert_eq!(sim.line().await, STATUS, "and right after the answer");
    assert_eq!(sim.state().await["setpoints"][""], 30.0);

    // Block answers stay whole too.
    sim.faults(json!({"slow_ms": 0, "unsolicited_ms": 5, "unsolicited_text": "!ALIVE"}))
        .await;
    for _ in 0..5 {
        sim.send(b"DUMP?\r\n").await;
        let mut block = Vec::new();
        while block.last().map(String::as_str) != Some("END") {
            let line = sim.line().await;
            if line != "!ALIVE" && line != STATUS {
                block.push(line);
            }
        }
        assert_eq!(block, ["T=21.5", "SETP=30.0", "MODE=AUTO", "END"]);
    }

    // Off again: the next bytes are an answer's.
    sim.faults(json!({"unsolicited_ms": 0})).await;
    sim.send(b"TEMP?\r\n").await;
    loop {
        let line = sim.line().await;
        if line != "!ALIVE" {
            assert_eq!(line, "TEMP 21.5");
            break;
        }
    }
    sim.stop().await;
}
