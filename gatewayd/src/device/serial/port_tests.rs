//! Tests of the port task over real pseudo-terminals: the test plays the device on the
//! master side.

use super::*;
use crate::device::serial::answer::ResponseSpec;
use crate::device::serial::frame::{FrameError, Pattern};
use crate::device::serial::rules::{Block, ReplyRules};
use crate::template::Template;
use tokio::io::AsyncBufReadExt;

type Reply = oneshot::Receiver<Result<Heard, ExchangeError>>;

/// A port task on a fresh pty; the returned master plays the device.
struct Bench {
    jobs: mpsc::Sender<Job>,
    device: tokio::io::BufReader<SerialStream>,
    presence: Arc<Presence>,
    lines: Arc<LineRules>,
    action: Arc<SerialAction>,
    _slave: SerialStream,
}

fn bench() -> Bench {
    bench_with(LineRules::default(), ReplyRules::default())
}

fn bench_with(lines: LineRules, reply: ReplyRules) -> Bench {
    let (master, slave) = SerialStream::pair().unwrap();
    let config: SerialPortConfig = serde_json::from_value(serde_json::json!({
        "path": slave.name().unwrap(),
        "max_frame_len": 16,
    }))
    .unwrap();
    let id = DeviceId::new("tc").unwrap();
    let presence = Arc::new(Presence::new([id.clone()].into_iter(), 0));
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(PortTask::new("bus".into(), config, rx, presence.clone(), vec![id]).run());
    Bench {
        jobs: tx,
        device: tokio::io::BufReader::new(master),
        presence,
        lines: Arc::new(lines),
        action: Arc::new(SerialAction {
            request: Template::parse("unused").unwrap(),
            reply,
            response: ResponseSpec::default(),
        }),
        _slave: slave,
    }
}

fn patterns(p: &[&str]) -> Vec<Pattern> {
    p.iter().map(|p| Pattern::parse(p).unwrap()).collect()
}

fn answer(text: &str) -> Result<Heard, ExchangeError> {
    Ok(Heard::Answer(text.into()))
}

impl Bench {
    fn job(&self, request: &str, within: Duration) -> (Job, Reply, Arc<Ticket>) {
        let (reply, rx) = oneshot::channel();
        let ticket = Arc::new(Ticket::default());
        let job = Job {
            request: request.as_bytes().to_vec(),
            lines: self.lines.clone(),
            action: self.action.clone(),
            response_timeout: within,
            deadline: Instant::now() + within,
            ticket: ticket.clone(),
            reply,
        };
        (job, rx, ticket)
    }

    async fn send(&self, request: &str, within: Duration) -> Reply {
        let (job, rx, _) = self.job(request, within);
        self.jobs.send(job).await.unwrap();
        rx
    }

    async fn call(&self, request: &str, within: Duration) -> Result<Heard, ExchangeError> {
        self.send(request, within).await.await.unwrap()
    }

    /// The device reads one request line.
    async fn heard(&mut self) -> String {
        let mut line = String::new();
        self.device.read_line(&mut line).await.unwrap();
        line
    }

    /// The device reads exactly `n` bytes.
    async fn heard_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.device.read_exact(&mut buf).await.unwrap();
        buf
    }

    async fn say(&mut self, bytes: &[u8]) {
        self.device.get_mut().write_all(bytes).await.unwrap();
    }
}

const SOON: Duration = Duration::from_millis(300);

/// Time for bytes written on the master to reach the port task's side of the pty.
const PTY_DELIVERY: Duration = Duration::from_millis(50);

#[tokio::test]
async fn one_answer_line_per_request_and_stale_input_is_dropped() {
    let mut b = bench();
    let call = b.send("TEMP?\r\n", Duration::from_secs(5)).await;
    assert_eq!(b.heard().await, "TEMP?\r\n");
    b.say(b"TEMP 21.5\r\nextra\r\n").await;
    assert_eq!(call.await.unwrap(), answer("TEMP 21.5"));
    // "extra" and this unterminated junk are stale by the next request.
    b.say(b"#~").await;
    tokio::time::sleep(PTY_DELIVERY).await;
    let call = b.send("SETP?\r\n", Duration::from_secs(5)).await;
    assert_eq!(b.heard().await, "SETP?\r\n");
    b.say(b"SETP 20\r\n").await;
    assert_eq!(call.await.unwrap(), answer("SETP 20"));
}

#[tokio::test]
async fn silence_partial_lines_and_long_frames_fail_only_their_request() {
    let mut b = bench();
    let started = Instant::now();
    let out = b.call("A\r\n", SOON).await;
    assert!(
        matches!(out, Err(ExchangeError::Timeout { ref partial, .. }) if partial.is_empty()),
        "{out:?}"
    );
    assert!(started.elapsed() >= SOON);
    assert_eq!(b.heard().await, "A\r\n");

    let call = b.send("B\r\n", SOON).await;
    assert_eq!(b.heard().await, "B\r\n");
    b.say(b"TEMP 2").await;
    assert!(
        matches!(call.await.unwrap(), Err(ExchangeError::Timeout { partial, .. }) if partial == b"TEMP 2"),
    );

    let call = b.send("C\r\n", SOON).await;
    assert_eq!(b.heard().await, "C\r\n");
    b.say(&[b'X'; 40]).await;
    assert_eq!(
        call.await.unwrap(),
        Err(ExchangeError::Read(ReadError::Frame(FrameError::TooLong(
            16
        ))))
    );

    let call = b.send("D\r\n", SOON).await;
    assert_eq!(b.heard().await, "D\r\n");
    b.say(b"OK\r\n").await;
    assert_eq!(call.await.unwrap(), answer("OK"));
    assert!(b.presence.is_online(&DeviceId::new("tc").unwrap()));
}

#[tokio::test]
async fn a_request_whose_deadline_passed_on_the_queue_is_never_sent() {
    let mut b = bench();
    let slow = b.send("SLOW\r\n", Duration::from_secs(5)).await;
    let late = b.send("LATE\r\n", Duration::from_millis(100)).await;
    assert_eq!(b.heard().await, "SLOW\r\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.say(b"DONE\r\n").await;
    assert_eq!(slow.await.unwrap(), answer("DONE"));
    assert_eq!(late.await.unwrap(), Err(ExchangeError::Expired));
    let next = b.send("NEXT\r\n", Duration::from_secs(5)).await;
    assert_eq!(b.heard().await, "NEXT\r\n", "LATE never reached the device");
    b.say(b"OK\r\n").await;
    assert_eq!(next.await.unwrap(), answer("OK"));
}

#[tokio::test]
async fn a_request_given_up_on_while_queued_is_never_sent() {
    let mut b = bench();
    let slow = b.send("SLOW\r\n", Duration::from_secs(5)).await;
    assert_eq!(b.heard().await, "SLOW\r\n");
    let (job, dropped, ticket) = b.job("DROPPED\r\n", Duration::from_secs(5));
    b.jobs.send(job).await.unwrap();
    assert!(ticket.abandon(), "still queued: the caller wins");
    assert!(!ticket.take(), "and the port task cannot take it any more");
    b.say(b"DONE\r\n").await;
    assert_eq!(slow.await.unwrap(), answer("DONE"));
    assert_eq!(dropped.await.unwrap(), Err(ExchangeError::Expired));
    let next = b.send("NEXT\r\n", Duration::from_secs(5)).await;
    assert_eq!(
        b.heard().await,
        "NEXT\r\n",
        "DROPPED never reached the device"
    );
    b.say(b"OK\r\n").await;
    assert_eq!(next.await.unwrap(), answer("OK"));
    // Once taken, the caller can no longer claim it was not sent.
    let t = Ticket::default();
    assert!(t.take());
    assert!(!t.abandon());
}

#[tokio::test]
async fn echo_ignored_lines_and_blocks_over_a_pty() {
    let lines = LineRules {
        echo: true,
        ignore: patterns(&["# .*"]),
        busy: patterns(&["BUSY"]),
    };
    let reply = ReplyRules {
        errors: patterns(&[r"ERR:(?P<code>\w+)"]),
        busy: Vec::new(),
        block: Block::Lines(3),
    };
    let mut b = bench_with(lines, reply);
    // An unsolicited line, and half of another, before the request.
    b.say(b"# boot\r\n# par").await;
    tokio::time::sleep(PTY_DELIVERY).await;
    let call = b.send("DUMP?\r", Duration::from_secs(5)).await;
    assert_eq!(b.heard_bytes(6).await, b"DUMP?\r");
    b.say(b"tial\r\nDUMP?\rA\r\n# mid\r\nB\r\n").await;
    b.say(b"C\r\n# after\r\n").await;
    assert_eq!(call.await.unwrap(), answer("A\nB\nC"));

    let call = b.send("SET 1\r", Duration::from_secs(5)).await;
    assert_eq!(b.heard_bytes(6).await, b"SET 1\r");
    b.say(b"SET 1\rBUSY\r\n").await;
    assert!(
        matches!(call.await.unwrap(), Ok(Heard::Busy(ref s)) if s.text == "BUSY"),
        "busy ends the block"
    );

    let call = b.send("SET 2\r", Duration::from_secs(5)).await;
    assert_eq!(b.heard_bytes(6).await, b"SET 2\r");
    b.say(b"SET 3\rOK\r\n").await;
    assert_eq!(
        call.await.unwrap(),
        Err(ExchangeError::Read(ReadError::Echo {
            sent: r"SET 2\r".into(),
            got: r"SET 3\rOK".into()
        }))
    );
}

#[tokio::test]
async fn a_port_that_vanishes_mid_request_may_have_run() {
    let (master, slave) = SerialStream::pair().unwrap();
    let config: SerialPortConfig = serde_json::from_value(serde_json::json!({
        "path": slave.name().unwrap(),
    }))
    .unwrap();
    let id = DeviceId::new("tc").unwrap();
    let presence = Arc::new(Presence::new([id.clone()].into_iter(), 0));
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(PortTask::new("bus".into(), config, rx, presence.clone(), vec![id.clone()]).run());
    let mut device = tokio::io::BufReader::new(master);
    let (reply, answer) = oneshot::channel();
    tx.send(Job {
        request: b"SETP 30\r\n".to_vec(),
        lines: Arc::new(LineRules::default()),
        action: Arc::new(SerialAction {
            request: Template::parse("SETP 30").unwrap(),
            reply: ReplyRules::default(),
            response: ResponseSpec::default(),
        }),
        response_timeout: Duration::from_secs(5),
        deadline: Instant::now() + Duration::from_secs(5),
        ticket: Arc::new(Ticket::default()),
        reply,
    })
    .await
    .unwrap();
    let mut line = String::new();
    device.read_line(&mut line).await.unwrap();
    assert_eq!(line, "SETP 30\r\n");
    // The master goes; the slave handle stays open so the pty's number is not reused by
    // a parallel test while the task tries to reopen it.
    drop(device);
    let out = answer.await.unwrap();
    assert!(
        matches!(out, Err(ExchangeError::Lost(ref why)) if why.contains("failed after the request was written")),
        "{out:?}"
    );
    assert!(!presence.is_online(&id));
    drop(slave);
}

#[tokio::test]
async fn a_port_that_cannot_open_takes_its_devices_offline() {
    let config: SerialPortConfig =
        serde_json::from_value(serde_json::json!({"path": "/nonexistent/ttyUSB9"})).unwrap();
    let id = DeviceId::new("tc").unwrap();
    let presence = Arc::new(Presence::new([id.clone()].into_iter(), 0));
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(PortTask::new("bus".into(), config, rx, presence.clone(), vec![id.clone()]).run());
    let (reply, answer) = oneshot::channel();
    let ticket = Arc::new(Ticket::default());
    tx.send(Job {
        request: b"X\r\n".to_vec(),
        lines: Arc::new(LineRules::default()),
        action: Arc::new(SerialAction {
            request: Template::parse("X").unwrap(),
            reply: ReplyRules::default(),
            response: ResponseSpec::default(),
        }),
        response_timeout: SOON,
        deadline: Instant::now() + SOON,
        ticket: ticket.clone(),
        reply,
    })
    .await
    .unwrap();
    assert_eq!(
        answer.await.unwrap(),
        Err(ExchangeError::PortDown(
            "no serial port at /nonexistent/ttyUSB9 (unplugged?)".into()
        ))
    );
    assert!(ticket.abandon(), "never taken for writing");
    assert!(!presence.is_online(&id));
    assert_eq!(
        presence.reason(&id).as_deref(),
        Some("no serial port at /nonexistent/ttyUSB9 (unplugged?)")
    );
}

fn err(kind: tokio_serial::ErrorKind, desc: &str) -> tokio_serial::Error {
    tokio_serial::Error::new(kind, desc)
}

#[test]
fn open_errors_say_what_to_do() {
    use tokio_serial::ErrorKind;
    assert_eq!(
        open_error(
            "/dev/ttyUSB0",
            &err(ErrorKind::Io(io::ErrorKind::PermissionDenied), "Permission denied")
        ),
        "permission denied opening /dev/ttyUSB0: the service user needs the port's group (usually dialout), and under the systemd unit the device must be allowed (DeviceAllow=char-<driver> rw, see the README)"
    );
    assert_eq!(
        open_error(
            "/dev/ttyUSB0",
            &err(
                ErrorKind::Io(io::ErrorKind::NotFound),
                "No such file or directory"
            )
        ),
        "no serial port at /dev/ttyUSB0 (unplugged?)"
    );
    assert_eq!(
        open_error(
            "/dev/ttyS1",
            &err(ErrorKind::NoDevice, "Device or resource busy")
        ),
        "serial port /dev/ttyS1 is busy: another process holds it"
    );
    assert_eq!(
        open_error("/dev/ttyS1", &err(ErrorKind::Unknown, "Input/output error")),
        "cannot open serial port /dev/ttyS1: Input/output error"
    );
}
