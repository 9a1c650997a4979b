//! The simulated Modbus units, no I/O: registers and coils from a map file, the eight
//! function codes gatewayd uses (plus an illegal-function answer for the rest), clamping of
//! holding registers on write, and counters of what each unit acted on.
//!
//! The map file is JSON:
//! ```json
//! {"units": {"1": {
//!     "coils": {"0": false},
//!     "discrete_inputs": {"0": true},
//!     "input_registers": {"0-9": 0, "10": 215},
//!     "holding_registers": {"100": 0},
//!     "clamp": {"100": [0, 1500]}
//! }}}
//! ```
//! Keys are addresses or inclusive ranges `a-b`; an address not in the map answers exception
//! 2 (illegal data address).

use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The map file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFile {
    pub units: BTreeMap<u8, UnitFile>,
}

/// One unit in the map file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitFile {
    #[serde(default)]
    pub coils: BTreeMap<String, bool>,
    #[serde(default)]
    pub discrete_inputs: BTreeMap<String, bool>,
    #[serde(default)]
    pub input_registers: BTreeMap<String, u16>,
    #[serde(default)]
    pub holding_registers: BTreeMap<String, u16>,
    /// Holding registers that keep a written value within `[min, max]` (a device that clamps
    /// what it cannot do), compared as unsigned.
    #[serde(default)]
    pub clamp: BTreeMap<String, (u16, u16)>,
}

fn expand<T: Copy>(m: &BTreeMap<String, T>) -> Result<BTreeMap<u16, T>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in m {
        let (a, b) = match k.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (k.trim(), k.trim()),
        };
        let a: u16 = a
            .parse()
            .map_err(|_| format!("'{k}' is not an address or a-b range"))?;
        let b: u16 = b
            .parse()
            .map_err(|_| format!("'{k}' is not an address or a-b range"))?;
        if b < a {
            return Err(format!("range '{k}' ends before it starts"));
        }
        for addr in a..=b {
            out.insert(addr, *v);
        }
    }
    Ok(out)
}

/// One unit's state.
#[derive(Debug, Clone, Default)]
pub struct Unit {
    pub coils: BTreeMap<u16, bool>,
    pub discrete_inputs: BTreeMap<u16, bool>,
    pub input_registers: BTreeMap<u16, u16>,
    pub holding_registers: BTreeMap<u16, u16>,
    pub clamp: BTreeMap<u16, (u16, u16)>,
    /// Writes acted on, by `fc<N>@<address>`.
    pub executed: BTreeMap<String, u64>,
    /// Requests answered (exceptions included).
    pub requests: u64,
    /// The last writes acted on, oldest first: function code, address, values (coils as 0/1).
    pub writes: std::collections::VecDeque<(u8, u16, Vec<u16>)>,
}

/// Writes kept in a unit's log.
const WRITE_LOG: usize = 10_000;

impl Unit {
    /// A unit as the map file describes it.
    pub fn from_file(f: &UnitFile) -> Result<Unit, String> {
        Ok(Unit {
            coils: expand(&f.coils)?,
            discrete_inputs: expand(&f.discrete_inputs)?,
            input_registers: expand(&f.input_registers)?,
            holding_registers: expand(&f.holding_registers)?,
            clamp: expand(&f.clamp)?,
            ..Unit::default()
        })
    }

    /// The unit's tables and counters as JSON.
    pub fn view(&self) -> Value {
        json!({
            "coils": self.coils,
            "discrete_inputs": self.discrete_inputs,
            "input_registers": self.input_registers,
            "holding_registers": self.holding_registers,
            "executed": self.executed,
            "executed_total": self.executed.values().sum::<u64>(),
            "requests": self.requests,
            "writes": self.writes,
        })
    }

    /// Serves one request PDU: the reply PDU (an exception when the request is wrong).
    pub fn handle(&mut self, pdu: &[u8]) -> Vec<u8> {
        self.requests += 1;
        let fc = pdu.first().copied().unwrap_or(0);
        match self.serve(fc, pdu) {
            Ok(reply) => reply,
            Err(code) => vec![fc | 0x80, code],
        }
    }

    fn serve(&mut self, fc: u8, pdu: &[u8]) -> Result<Vec<u8>, u8> {
        let word = |i: usize| -> Result<u16, u8> {
            Ok(u16::from_be_bytes([
                *pdu.get(i).ok_or(3u8)?,
                *pdu.get(i + 1).ok_or(3u8)?,
            ]))
        };
        match fc {
            1 | 2 => {
                let (a, n) = (word(1)?, word(3)?);
                if n == 0 || n > 2000 {
                    return Err(3);
                }
                let table = if fc == 1 {
                    &self.coils
                } else {
                    &self.discrete_inputs
                };
                let bits = range(a, n)?
                    .map(|x| table.get(&x).copied().ok_or(2))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut out = vec![fc, bits.len().div_ceil(8) as u8];
                out.extend(pack(&bits));
                Ok(out)
            }
            3 | 4 => {
                let (a, n) = (word(1)?, word(3)?);
                if n == 0 || n > 125 {
                    return Err(3);
                }
                let table = if fc == 3 {
                    &self.holding_registers
                } else {
                    &self.input_registers
                };
                let words = range(a, n)?
                    .map(|x| table.get(&x).copied().ok_or(2))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut out = vec![fc, (words.len() * 2) as u8];
                for w in words {
                    out.extend_from_slice(&w.to_be_bytes());
                }
                Ok(out)
            }
            5 => {
                let (a, v) = (word(1)?, word(3)?);
                let on = match v {
                    0xFF00 => true,
                    0 => false,
                    _ => return Err(3),
                };
                *self.coils.get_mut(&a).ok_or(2)? = on;
                self.acted(fc, a, vec![on as u16]);
                Ok(pdu[..5].to_vec())
            }
            6 => {
                let (a, v) = (word(1)?, word(3)?);
                self.write_registers(a, &[v])?;
                self.acted(fc, a, vec![v]);
                Ok(pdu[..5].to_vec())
            }
            15 => {
                let (a, n) = (word(1)?, word(3)?);
                let count = *pdu.get(5).ok_or(3u8)? as usize;
                if n == 0 || n > 1968 || count != (n as usize).div_ceil(8) || pdu.len() != 6 + count
                {
                    return Err(3);
                }
                let addrs: Vec<u16> = range(a, n)?.collect();
                if addrs.iter().any(|x| !self.coils.contains_key(x)) {
                    return Err(2);
                }
                let mut bits = Vec::new();
                for (i, x) in addrs.iter().enumerate() {
                    let on = pdu[6 + i / 8] & (1 << (i % 8)) != 0;
                    self.coils.insert(*x, on);
                    bits.push(on as u16);
                }
                self.acted(fc, a, bits);
                Ok(pdu[..5].to_vec())
            }
            16 => {
                let (a, n) = (word(1)?, word(3)?);
                let count = *pdu.get(5).ok_or(3u8)? as usize;
                if n == 0 || n > 123 || count != n as usize * 2 || pdu.len() != 6 + count {
                    return Err(3);
                }
                let values: Vec<u16> = (0..n as usize)
                    .map(|i| word(6 + 2 * i))
                    .collect::<Result<_, _>>()?;
                self.write_registers(a, &values)?;
                self.acted(fc, a, values);
                Ok(pdu[..5].to_vec())
            }
            _ => Err(1),
        }
    }

    fn write_registers(&mut self, a: u16, values: &[u16]) -> Result<(), u8> {
        let addrs: Vec<u16> = range(a, values.len() as u16)?.collect();
        if addrs
            .iter()
            .any(|x| !self.holding_registers.contains_key(x))
        {
            return Err(2);
        }
        for (x, v) in addrs.into_iter().zip(values) {
            let v = match self.clamp.get(&x) {
                Some((lo, hi)) => (*v).clamp(*lo, *hi),
                None => *v,
            };
            self.holding_registers.insert(x, v);
        }
        Ok(())
    }

    fn acted(&mut self, fc: u8, a: u16, values: Vec<u16>) {
        *self.executed.entry(format!("fc{fc}@{a}")).or_default() += 1;
        if self.writes.len() == WRITE_LOG {
            self.writes.pop_front();
        }
        self.writes.push_back((fc, a, values));
    }
}

fn range(a: u16, n: u16) -> Result<impl Iterator<Item = u16>, u8> {
    if a as u32 + n as u32 > 65_536 {
        return Err(2);
    }
    Ok((0..n).map(move |i| a + i))
}

fn pack(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// CRC-16/MODBUS.
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

/// How long an RTU request is, judged from its first bytes: `None` until that can be told;
/// `Some(0)` for a function code this simulator does not frame (read until quiet).
pub fn rtu_request_len(so_far: &[u8]) -> Option<usize> {
    match *so_far.get(1)? {
        1..=6 => Some(8),
        15 | 16 => Some(9 + *so_far.get(6)? as usize),
        _ => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit() -> Unit {
        let f: UnitFile = serde_json::from_value(json!({
            "coils": {"0-9": false},
            "holding_registers": {"0-3": 0, "100": 5},
            "clamp": {"100": [0, 1500]}
        }))
        .unwrap();
        Unit::from_file(&f).unwrap()
    }

    #[test]
    fn reads_writes_clamps_and_exceptions() {
        let mut u = unit();
        assert_eq!(u.handle(&[3, 0, 100, 0, 1]), [3, 2, 0, 5]);
        assert_eq!(u.handle(&[6, 0, 100, 0x07, 0xD0]), [6, 0, 100, 0x07, 0xD0]);
        assert_eq!(u.holding_registers[&100], 1500);
        assert_eq!(u.handle(&[3, 0, 4, 0, 1]), [0x83, 2]);
        assert_eq!(u.handle(&[16, 0, 0, 0, 2, 4, 0, 1, 0, 2]), [16, 0, 0, 0, 2]);
        assert_eq!(u.handle(&[3, 0, 0, 0, 2]), [3, 4, 0, 1, 0, 2]);
        assert_eq!(u.handle(&[5, 0, 3, 0xFF, 0]), [5, 0, 3, 0xFF, 0]);
        assert_eq!(u.handle(&[1, 0, 0, 0, 10]), [1, 2, 0x08, 0]);
        assert_eq!(u.handle(&[8, 0, 0]), [0x88, 1]);
        assert_eq!(u.executed["fc6@100"], 1);
        assert_eq!(crc16(&[0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]), 0x8776);
    }
}
