//! RTU frames over a TCP connection, for converters that forward raw RTU frames instead of
//! Modbus TCP's MBAP header (`framing = "rtu"`). `tokio-modbus` would frame RTU over TCP too,
//! but without telling a request that was never written from one whose reply was lost; here a
//! write that took no byte is "not sent", and the reply, whose length follows from the
//! request, is judged the moment its last byte arrives.

use super::pdu::{self, Exception, Reply, Request};
use super::Failure;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

/// Longest RTU frame.
const MAX_FRAME: usize = 256;
/// A reply of unknown length ends when nothing more arrives for this long.
const QUIET: Duration = Duration::from_millis(20);

/// What one exchange came to; `drop` says the connection must not be used again.
pub struct Outcome {
    pub result: Result<Result<Reply, Exception>, Failure>,
    pub drop: bool,
}

/// Writes `request` to `unit` and reads its reply before `deadline`.
pub async fn exchange(
    stream: &mut TcpStream,
    unit: u8,
    request: &Request,
    deadline: Instant,
) -> Outcome {
    let fail = |f: Failure| Outcome {
        result: Err(f),
        drop: true,
    };
    let frame = pdu::rtu_frame(unit, request);
    let mut written = 0;
    let wrote = timeout_at(deadline, async {
        while written < frame.len() {
            match stream.write(&frame[written..]).await? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                n => written += n,
            }
        }
        Ok(())
    })
    .await;
    match wrote {
        Err(_) if written == 0 => return fail(Failure::NotSent("connection took no byte".into())),
        Err(_) => return fail(Failure::Timeout),
        Ok(Err(e)) if written == 0 => {
            return fail(Failure::NotSent(format!("connection failed: {e}")))
        }
        Ok(Err(e)) => return fail(Failure::BadReply(format!("connection failed: {e}"))),
        Ok(Ok(())) => {}
    }
    let mut got: Vec<u8> = Vec::with_capacity(64);
    let mut buf = [0u8; MAX_FRAME];
    loop {
        let need = pdu::rtu_reply_len(request, &got);
        if let Some(n) = need.filter(|n| got.len() >= *n) {
            let result = pdu::parse_rtu_reply(unit, request, &got[..n]).map_err(Failure::BadReply);
            let drop = result.is_err() || got.len() > n;
            return Outcome { result, drop };
        }
        let unknown = need == Some(usize::MAX);
        let until = if unknown {
            (Instant::now() + QUIET).min(deadline)
        } else {
            deadline
        };
        match timeout_at(until, stream.read(&mut buf)).await {
            Err(_) if unknown => {
                let why = pdu::parse_rtu_reply(unit, request, &got)
                    .err()
                    .unwrap_or_else(|| "reply does not answer the request".into());
                return fail(Failure::BadReply(why));
            }
            Err(_) => return fail(Failure::Timeout),
            Ok(Ok(0)) => {
                return fail(Failure::BadReply(
                    "connection closed before the reply".into(),
                ))
            }
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > MAX_FRAME {
                    return fail(Failure::BadReply(format!(
                        "reply longer than {MAX_FRAME} bytes"
                    )));
                }
            }
            Ok(Err(e)) => return fail(Failure::BadReply(format!("connection failed: {e}"))),
        }
    }
}
