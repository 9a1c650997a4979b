//! Modbus requests and replies as bytes, no I/O: the protocol data unit (function code and
//! data) of the eight function codes gatewayd uses, the RTU frame around it (unit id and
//! CRC-16), and the reading of a reply against the request it answers.
//!
//! RTU is framed here rather than by `tokio-modbus` for two reasons. The bus is owned by one
//! port task shared with line-protocol devices (`device::serial::port`), which keeps its
//! stream across exchanges, while `tokio-modbus` takes the transport for the life of a
//! client. And the length of a reply follows from the request, so a reply with a bad CRC or
//! from the wrong unit is reported as soon as its last byte arrives instead of waiting out
//! the timeout for a frame that never parses.

/// Largest register count of one read (FC 3, 4) and one write (FC 16).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Largest register count of one FC 16 write.
pub const MAX_WRITE_REGISTERS: u16 = 123;
/// Largest bit count of one read (FC 1, 2).
pub const MAX_READ_BITS: u16 = 2000;
/// Largest bit count of one FC 15 write.
pub const MAX_WRITE_BITS: u16 = 1968;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// FC 1.
    ReadCoils(u16, u16),
    /// FC 2.
    ReadDiscreteInputs(u16, u16),
    /// FC 3.
    ReadHoldingRegisters(u16, u16),
    /// FC 4.
    ReadInputRegisters(u16, u16),
    /// FC 5.
    WriteSingleCoil(u16, bool),
    /// FC 6.
    WriteSingleRegister(u16, u16),
    /// FC 15.
    WriteMultipleCoils(u16, Vec<bool>),
    /// FC 16.
    WriteMultipleRegisters(u16, Vec<u16>),
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Bits(Vec<bool>),
    Words(Vec<u16>),
    /// A write was acknowledged.
    Written,
}

/// A Modbus exception answered by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception(pub u8);

impl Exception {
    /// The exception's name in the specification's words.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "illegal function",
            2 => "illegal data address",
            3 => "illegal data value",
            4 => "server device failure",
            5 => "acknowledge",
            6 => "server device busy",
            8 => "memory parity error",
            10 => "gateway path unavailable",
            11 => "gateway target device failed to respond",
            _ => "unknown exception",
        }
    }
}

impl Request {
    /// The function code.
    pub fn function(&self) -> u8 {
        match self {
            Request::ReadCoils(..) => 1,
            Request::ReadDiscreteInputs(..) => 2,
            Request::ReadHoldingRegisters(..) => 3,
            Request::ReadInputRegisters(..) => 4,
            Request::WriteSingleCoil(..) => 5,
            Request::WriteSingleRegister(..) => 6,
            Request::WriteMultipleCoils(..) => 15,
            Request::WriteMultipleRegisters(..) => 16,
        }
    }

    /// The PDU: function code and data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.function()];
        let word = |b: &mut Vec<u8>, w: u16| b.extend_from_slice(&w.to_be_bytes());
        match self {
            Request::ReadCoils(a, n)
            | Request::ReadDiscreteInputs(a, n)
            | Request::ReadHoldingRegisters(a, n)
            | Request::ReadInputRegisters(a, n) => {
                word(&mut b, *a);
                word(&mut b, *n);
            }
            Request::WriteSingleCoil(a, v) => {
                word(&mut b, *a);
                word(&mut b, if *v { 0xFF00 } else { 0 });
            }
            Request::WriteSingleRegister(a, v) => {
                word(&mut b, *a);
                word(&mut b, *v);
            }
            Request::WriteMultipleCoils(a, bits) => {
                word(&mut b, *a);
                word(&mut b, bits.len() as u16);
                let packed = pack_bits(bits);
                b.push(packed.len() as u8);
                b.extend_from_slice(&packed);
            }
            Request::WriteMultipleRegisters(a, words) => {
                word(&mut b, *a);
                word(&mut b, words.len() as u16);
                b.push((words.len() * 2) as u8);
                for w in words {
                    word(&mut b, *w);
                }
            }
        }
        b
    }

    /// Length of the successful reply's PDU.
    pub fn reply_len(&self) -> usize {
        match self {
            Request::ReadCoils(_, n) | Request::ReadDiscreteInputs(_, n) => {
                2 + (*n as usize).div_ceil(8)
            }
            Request::ReadHoldingRegisters(_, n) | Request::ReadInputRegisters(_, n) => {
                2 + 2 * *n as usize
            }
            _ => 5,
        }
    }

    /// Reads the reply PDU `pdu` to this request: a reply, an exception, or why it does not
    /// answer this request.
    pub fn parse_reply(&self, pdu: &[u8]) -> Result<Result<Reply, Exception>, String> {
        let fc = self.function();
        match pdu {
            [] => Err("empty reply".into()),
            [f, code] if *f == fc | 0x80 => Ok(Err(Exception(*code))),
            [f, ..] if *f == fc | 0x80 => Err("exception reply of the wrong length".into()),
            [f, ..] if *f != fc => {
                Err(format!("reply has function code {f}, the request had {fc}"))
            }
            _ if pdu.len() != self.reply_len() => Err(format!(
                "reply of {} bytes, expected {}",
                pdu.len(),
                self.reply_len()
            )),
            _ => self.parse_ok(pdu).map(Ok),
        }
    }

    fn parse_ok(&self, pdu: &[u8]) -> Result<Reply, String> {
        let count_ok = |pdu: &[u8]| {
            if pdu[1] as usize == pdu.len() - 2 {
                Ok(())
            } else {
                Err(format!(
                    "reply byte count {} does not match its length",
                    pdu[1]
                ))
            }
        };
        let echo = |a: u16, v: u16| {
            let got = (
                u16::from_be_bytes([pdu[1], pdu[2]]),
                u16::from_be_bytes([pdu[3], pdu[4]]),
            );
            if got == (a, v) {
                Ok(Reply::Written)
            } else {
                Err(format!(
                    "write acknowledged for address {} value {}, sent address {a} value {v}",
                    got.0, got.1
                ))
            }
        };
        match self {
            Request::ReadCoils(_, n) | Request::ReadDiscreteInputs(_, n) => {
                count_ok(pdu)?;
                Ok(Reply::Bits(unpack_bits(&pdu[2..], *n as usize)))
            }
            Request::ReadHoldingRegisters(..) | Request::ReadInputRegisters(..) => {
                count_ok(pdu)?;
                Ok(Reply::Words(
                    pdu[2..]
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect(),
                ))
            }
            Request::WriteSingleCoil(a, v) => echo(*a, if *v { 0xFF00 } else { 0 }),
            Request::WriteSingleRegister(a, v) => echo(*a, *v),
            Request::WriteMultipleCoils(a, bits) => echo(*a, bits.len() as u16),
            Request::WriteMultipleRegisters(a, words) => echo(*a, words.len() as u16),
        }
    }
}

/// Bits packed LSB first, eight to a byte.
pub fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// The first `n` bits of `bytes`, LSB first.
pub fn unpack_bits(bytes: &[u8], n: usize) -> Vec<bool> {
    (0..n).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect()
}

/// CRC-16/MODBUS of `bytes`.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for b in bytes {
        crc ^= *b as u16;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The RTU frame of `request` to `unit`: unit id, PDU, CRC (low byte first).
pub fn rtu_frame(unit: u8, request: &Request) -> Vec<u8> {
    let mut f = vec![unit];
    f.extend_from_slice(&request.encode());
    let crc = crc16(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// How many bytes a complete RTU reply to `request` has, judged from what arrived so far:
/// `None` while that cannot be told yet (fewer than two bytes).
pub fn rtu_reply_len(request: &Request, so_far: &[u8]) -> Option<usize> {
    let fc = *so_far.get(1)?;
    Some(if fc == request.function() | 0x80 {
        5
    } else if fc == request.function() {
        1 + request.reply_len() + 2
    } else {
        // Not an answer to this request: take what arrives until the line is quiet.
        usize::MAX
    })
}

/// Reads a complete RTU reply `frame` to `request` sent to `unit`.
pub fn parse_rtu_reply(
    unit: u8,
    request: &Request,
    frame: &[u8],
) -> Result<Result<Reply, Exception>, String> {
    if frame.len() < 4 {
        return Err(format!("reply of {} bytes is too short", frame.len()));
    }
    let (body, crc) = frame.split_at(frame.len() - 2);
    if crc16(body).to_le_bytes() != crc {
        return Err("reply has a bad CRC".into());
    }
    if body[0] != unit {
        return Err(format!(
            "reply from unit {}, the request was to unit {unit}",
            body[0]
        ));
    }
    request.parse_reply(&body[1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_specification_example() {
        // Read holding registers 0x006B, 3 registers, unit 0x11: CRC 0x7687 (87 76 on the wire).
        let f = rtu_frame(0x11, &Request::ReadHoldingRegisters(0x6B, 3));
        assert_eq!(f, [0x11, 0x03, 0x00, 0x6B, 0x00, 0x03, 0x76, 0x87]);
    }

    #[test]
    fn replies_are_read_against_their_request() {
        let req = Request::ReadHoldingRegisters(0x6B, 2);
        let mut ok = vec![0x11, 0x03, 0x04, 0x02, 0x2B, 0x00, 0x64];
        let crc = crc16(&ok);
        ok.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(rtu_reply_len(&req, &ok[..2]), Some(ok.len()));
        assert_eq!(
            parse_rtu_reply(0x11, &req, &ok),
            Ok(Ok(Reply::Words(vec![0x022B, 0x0064])))
        );
        assert_eq!(
            parse_rtu_reply(0x12, &req, &ok),
            Err("reply from unit 17, the request was to unit 18".into())
        );
        let mut bad = ok.clone();
        bad[3] ^= 1;
        assert_eq!(
            parse_rtu_reply(0x11, &req, &bad),
            Err("reply has a bad CRC".into())
        );
        let mut exc = vec![0x11, 0x83, 0x02];
        let crc = crc16(&exc);
        exc.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(rtu_reply_len(&req, &exc[..2]), Some(5));
        assert_eq!(parse_rtu_reply(0x11, &req, &exc), Ok(Err(Exception(2))));
    }

    #[test]
    fn writes_encode_and_acknowledge() {
        let req = Request::WriteMultipleCoils(
            19,
            vec![
                true, false, true, true, false, false, true, true, true, false,
            ],
        );
        assert_eq!(req.encode(), [15, 0, 19, 0, 10, 2, 0xCD, 0x01]);
        assert_eq!(req.parse_reply(&[15, 0, 19, 0, 10]), Ok(Ok(Reply::Written)));
        let req = Request::WriteSingleCoil(172, true);
        assert_eq!(req.encode(), [5, 0, 172, 0xFF, 0]);
        assert!(req.parse_reply(&[5, 0, 172, 0, 0]).is_err());
        let req = Request::WriteMultipleRegisters(1, vec![10, 258]);
        assert_eq!(req.encode(), [16, 0, 1, 0, 2, 4, 0, 10, 1, 2]);
        let bits = Request::ReadCoils(0, 10);
        assert_eq!(
            bits.parse_reply(&[1, 2, 0xCD, 0x01]),
            Ok(Ok(Reply::Bits(vec![
                true, false, true, true, false, false, true, true, true, false
            ])))
        );
    }
}
