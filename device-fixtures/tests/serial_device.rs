//! The serial temperature controller on a real pty: commands, block answers, error wording,
//! terminators, busy answers, execution counts and power cycles.

mod common;

use common::serial::Sim;
use device_fixtures::serial::faults::Faults;
use device_fixtures::SerialSimSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn commands_and_block_answers() {
    let mut sim = Sim::start(SerialSimSpec::default()).await;
    assert_eq!(sim.ask("*IDN?").await, "ACME TC-100,SN1234,1.0");
    assert_eq!(sim.ask("TEMP?").await, "TEMP 21.5");
    assert_eq!(sim.ask("SETP 22.5").await, "OK");
    sim.send(b"DUMP?\r\n").await;
    assert_eq!(
        sim.read_through(b"END\r\n").await,
        b"T=21.5\r\nSETP=22.5\r\nMODE=AUTO\r\nEND\r\n"
    );
    sim.send(b"STAT?\r\n").await;
    let stat = [sim.line().await, sim.line().await, sim.line().await];
    assert_eq!(stat, ["T=21.5", "SETP=22.5", "ALARM=NONE"]);
    // Exactly three: the next bytes belong to the next answer.
    assert_eq!(sim.ask("SETP?").await, "SETP 22.5");

    let state = sim.state().await;
    assert_eq!(state["requests"], 6);
    assert_eq!(
        state["executed"],
        json!({"*IDN?": 1, "TEMP?": 1, "SETP": 1, "DUMP?": 1, "STAT?": 1, "SETP?": 1})
    );
    assert_eq!(state["executed_total"], 6);
    assert_eq!(state["executed_by_unit"][""]["SETP"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn numeric_errors_by_default_text_errors_on_demand() {
    let mut sim = Sim::start(SerialSimSpec::default()).await;
    assert_eq!(sim.ask("SETP 999").await, "ERR 3 OUT OF RANGE");
    assert_eq!(sim.ask("SETP warm").await, "ERR 2 BAD VALUE");
    assert_eq!(sim.ask("FLY").await, "ERR 1 UNKNOWN COMMAND");
    sim.faults(json!({"text_errors": true})).await;
    assert_eq!(sim.ask("SETP 999").await, "ERR:RANGE setpoint out of range");
    assert_eq!(sim.ask("SETP warm").await, "ERR:VALUE bad value");
    assert_eq!(sim.ask("FLY").await, "ERR:SYNTAX unknown command");

    // A fixed error answer for everything, without acting.
    sim.faults(json!({"error_reply": "ERR:RANGE"})).await;
    assert_eq!(sim.ask("SETP 30").await, "ERR:RANGE");
    sim.faults(json!({"error_reply": null})).await;
    assert_eq!(sim.ask("SETP?").await, "SETP 20");

    let state = sim.state().await;
    assert_eq!(
        state["executed"],
        json!({"SETP?": 1}),
        "refusals are not executions"
    );
    assert_eq!(state["requests"], 8);
    sim.stop().await;
}

#[tokio::test]
async fn request_and_answer_terminators() {
    let mut sim = Sim::start(SerialSimSpec::default()).await;
    // A lone CR ends a request at once; no LF has to follow.
    sim.send(b"TEMP?\r").await;
    assert_eq!(sim.line().await, "TEMP 21.5");
    // The LF of a CR LF split across writes is not a second request, nor is a bare LF end.
    sim.send(b"\nSETP?\r").await;
    assert_eq!(sim.line().await, "SETP 20");
    sim.send(b"\n").await;
    sim.send(b"TEMP?\n").await;
    assert_eq!(sim.line().await, "TEMP 21.5");
    assert_eq!(sim.state().await["requests"], 3);

    sim.faults(json!({"answer_terminator": "\r"})).await;
    sim.send(b"DUMP?\r").await;
    assert_eq!(
        sim.read_through(b"END\r").await,
        b"T=21.5\rSETP=20.0\rMODE=AUTO\rEND\r"
    );

    // Strict terminators: the other end byte is just a character of the request.
    sim.faults(json!({"answer_terminator": "\r\n", "request_terminator": "\r"}))
        .await;
    sim.send(b"TEMP?\nSETP?\r").await;
    assert_eq!(sim.line().await, "ERR 1 UNKNOWN COMMAND");
    sim.faults(json!({"request_terminator": "\n"})).await;
    sim.send(b"TEMP?\rSETP?\n").await;
    assert_eq!(sim.line().await, "ERR 1 UNKNOWN COMMAND");
    assert_eq!(sim.ask("TEMP?").await, "TEMP 21.5");

    let (status, body) = sim
        .control_post("faults", &json!({"answer_terminator": "\n\r"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        r#"fault 'answer_terminator' must be "\r\n", "\r" or "\n""#
    );
    sim.stop().await;
}

#[tokio::test]
async fn echo_sends_requests_back_as_received() {
    let spec = SerialSimSpec {
        faults: Faults {
            echo: true,
            ..Faults::default()
        },
        ..SerialSimSpec::default()
    };
    let mut sim = Sim::start(spec).await;
    sim.send(b"TEMP?\r\n").await;
    assert_eq!(sim.read_bytes(18).await, b"TEMP?\r\nTEMP 21.5\r\n");
    sim.send(b"SETP 30\r").await;
    assert_eq!(sim.read_bytes(12).await, b"SETP 30\rOK\r\n");
    // Noise is echoed as it came.
    sim.send(b"\x01?\r").await;
    assert_eq!(sim.read_bytes(3).await, b"\x01?\r");
    assert_eq!(sim.line().await, "ERR 1 UNKNOWN COMMAND");
    assert_eq!(sim.ask("SETP?").await, "SETP?");
    assert_eq!(sim.line().await, "SETP 30");

    // Resetting the faults returns to those the simulator started with: echo stays.
    let (status, state) = sim.control_post("reset", &Value::Null).await;
    assert_eq!(
        (status, &state["faults"]["echo"]),
        (StatusCode::OK, &json!(true))
    );
    sim.faults(json!({"echo": false})).await;
    assert_eq!(sim.ask("TEMP?").await, "TEMP 21.5");
    sim.stop().await;
}

#[tokio::test]
async fn busy_answers_do_not_act() {
    let mut sim = Sim::start(SerialSimSpec::default()).await;
    sim.faults(json!({"busy_every": 2})).await;
    let answers = [
        sim.ask("SETP 30").await,
        sim.ask("SETP 40").await,
        sim.ask("SETP 50").await,
        sim.ask("SETP 60").await,
    ];
    assert_eq!(answers, ["OK", "BUSY", "OK", "BUSY"]);
    assert_eq!(sim.state().await["setpoints"][""], 50.0);

    sim.faults(json!({"busy_every": 0, "busy": true, "busy_text": "WAIT"}))
        .await;
    assert_eq!(sim.ask("SETP 70").await, "WAIT");
    assert_eq!(sim.ask("TEMP?").await, "WAIT");
    sim.faults(json!({"busy": false})).await;
    assert_eq!(sim.ask("SETP?").await, "SETP 50");

    let state = sim.state().await;
    assert_eq!(state["executed"], json!({"SETP": 2, "SETP?": 1}));
    assert_eq!(state["requests"], 7);
    sim.stop().await;
}

#[tokio::test]
async fn silent_execution_is_still_counted() {
    let mut sim = Sim::start(SerialSimSpec::default()).await;
    sim.faults(json!({"no_reply": true})).await;
    sim.send(b"SETP 70\r\n").await;
    sim.await_requests(1).await;
    let state = sim.state().await;
    assert_eq!(state["executed"], json!({"SETP": 1}));
    assert_eq!(state["setpoints"][""], 70.0);
    sim.faults(json!({"no_reply": false})).await;
    // Nothing of the silent request is pending: the first answer is this one's.
    assert_eq!(sim.ask("SETP?").await, "SETP 70");
    sim.stop().await;
}

#[tokio::test]
async fn reset_restores_power_up_setpoints() {
    let spec = SerialSimSpec {
        addresses: vec!["01".into(), "02".into()],
        ..SerialSimSpec::default()
    };
    let mut sim = Sim::start(spec).await;
    assert_eq!(sim.ask("01SETP 55").await, "OK");
    assert_eq!(sim.ask("02SETP 65").await, "OK");
    let state = sim.faults(json!({"reset": true})).await;
    assert_eq!(state["setpoints"], json!({"01": 20.0, "02": 20.0}));
    assert!(state["faults"].get("reset").is_none());
    assert_eq!(sim.ask("02SETP?").await, "SETP 20");

    assert_eq!(sim.ask("01SETP 45").await, "OK");
    let (status, state) = sim.control_post("power-cycle", &Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(state["setpoints"]["01"], 20.0);
    assert_eq!(state["executed_by_unit"]["01"]["SETP"], 2, "{state}");
    assert_eq!(
        state["executed_by_unit"]["02"],
        json!({"SETP": 1, "SETP?": 1})
    );
    sim.stop().await;
}
