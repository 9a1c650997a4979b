//! Register codecs, no I/O: how a typed value sits in coils or 16-bit registers (type, byte
//! order within a register, word order across registers) and how operators see it in
//! engineering units (`value = raw * scale + offset`). Writes go the other way, rounded to the
//! nearest integer (halves away from zero) and refused when out of the type's range.

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

/// The four Modbus tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Read-write bits (FC 1, 5, 15).
    Coil,
    /// Read-only bits (FC 2).
    DiscreteInput,
    /// Read-only registers (FC 4).
    InputRegister,
    /// Read-write registers (FC 3, 6, 16).
    HoldingRegister,
}

impl Table {
    /// Whether the table holds bits rather than registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }

    /// Whether gatewayd may write it.
    pub fn is_writable(self) -> bool {
        matches!(self, Table::Coil | Table::HoldingRegister)
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Table::Coil => "coil",
            Table::DiscreteInput => "discrete_input",
            Table::InputRegister => "input_register",
            Table::HoldingRegister => "holding_register",
        })
    }
}

/// The type of a value in registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    #[default]
    U16,
    I16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    /// One coil or discrete input; in a register, zero is false and anything else true.
    Bool,
    /// Text of `length` bytes, two to a register; trailing NULs and spaces are dropped.
    String,
}

/// Byte order within a register, or word order across the registers of one value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Most significant first (the Modbus default).
    #[default]
    Big,
    /// Least significant first ("swapped").
    Little,
}

/// How one value is laid out and scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct Codec {
    pub ty: ValueType,
    /// Bytes of a `string`.
    pub length: u16,
    pub byte_order: Order,
    pub word_order: Order,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
}

impl Codec {
    /// Registers (or bits, in a bit table) one value takes.
    pub fn width(&self) -> u16 {
        match self.ty {
            ValueType::U16 | ValueType::I16 | ValueType::Bool => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
            ValueType::String => self.length.div_ceil(2),
        }
    }

    fn scaled(&self) -> bool {
        self.scale.is_some() || self.offset.is_some()
    }

    /// The value in `words` (exactly `width()` registers) as JSON.
    pub fn decode(&self, words: &[u16]) -> Value {
        let bytes = self.bytes_of(words);
        let raw: Raw = match self.ty {
            ValueType::Bool => return Value::Bool(words[0] != 0),
            ValueType::String => {
                let end = bytes
                    .iter()
                    .rposition(|b| *b != 0 && *b != b' ')
                    .map_or(0, |i| i + 1);
                let text = &bytes[..end];
                let text = text.split(|b| *b == 0).next().unwrap_or_default();
                return Value::String(String::from_utf8_lossy(text).into_owned());
            }
            ValueType::U16 => Raw::U(u16::from_be_bytes(arr(&bytes)) as u64),
            ValueType::I16 => Raw::I(i16::from_be_bytes(arr(&bytes)) as i64),
            ValueType::U32 => Raw::U(u32::from_be_bytes(arr(&bytes)) as u64),
            ValueType::I32 => Raw::I(i32::from_be_bytes(arr(&bytes)) as i64),
            ValueType::U64 => Raw::U(u64::from_be_bytes(arr(&bytes))),
            ValueType::I64 => Raw::I(i64::from_be_bytes(arr(&bytes))),
            ValueType::F32 => Raw::F(f32::from_be_bytes(arr(&bytes)) as f64),
            ValueType::F64 => Raw::F(f64::from_be_bytes(arr(&bytes))),
        };
        if !self.scaled() {
            return match raw {
                Raw::U(u) => Value::from(u),
                Raw::I(i) => Value::from(i),
                Raw::F(f) => float(f),
            };
        }
        let x = match raw {
            Raw::U(u) => u as f64,
            Raw::I(i) => i as f64,
            Raw::F(f) => f,
        };
        float(x * self.scale.unwrap_or(1.0) + self.offset.unwrap_or(0.0))
    }

    /// The registers that hold `value`, or why it cannot be written (wrong JSON type, out of
    /// the type's range after scaling, a string too long).
    pub fn encode(&self, value: &Value) -> Result<Vec<u16>, String> {
        let big: Vec<u8> = match self.ty {
            ValueType::Bool => {
                let b = as_bool(value)?;
                return Ok(vec![b as u16]);
            }
            ValueType::String => {
                let s = value
                    .as_str()
                    .ok_or_else(|| format!("{value} is not a string"))?;
                if s.len() > self.length as usize {
                    return Err(format!(
                        "'{s}' is {} bytes, longer than {}",
                        s.len(),
                        self.length
                    ));
                }
                let mut b = s.as_bytes().to_vec();
                b.resize(self.width() as usize * 2, 0);
                b
            }
            ValueType::F32 | ValueType::F64 => {
                let x = self.unscale(value)?;
                if !x.is_finite() {
                    return Err(format!("{value} does not give a finite number"));
                }
                if self.ty == ValueType::F32 {
                    if x.abs() > f32::MAX as f64 {
                        return Err(format!("{value} is out of range for f32"));
                    }
                    (x as f32).to_be_bytes().to_vec()
                } else {
                    x.to_be_bytes().to_vec()
                }
            }
            _ => {
                let (lo, hi, name) = self.int_range();
                let x = match (value.as_i64(), value.as_u64(), self.scaled()) {
                    (Some(i), _, false) => i as i128,
                    (_, Some(u), false) => u as i128,
                    _ => {
                        let x = self.unscale(value)?.round();
                        if !x.is_finite() || x < lo as f64 || x > hi as f64 {
                            return Err(range_error(value, name, lo, hi));
                        }
                        x as i128
                    }
                };
                if x < lo || x > hi {
                    return Err(range_error(value, name, lo, hi));
                }
                match self.ty {
                    ValueType::U16 => (x as u16).to_be_bytes().to_vec(),
                    ValueType::I16 => (x as i16).to_be_bytes().to_vec(),
                    ValueType::U32 => (x as u32).to_be_bytes().to_vec(),
                    ValueType::I32 => (x as i32).to_be_bytes().to_vec(),
                    ValueType::U64 => (x as u64).to_be_bytes().to_vec(),
                    _ => (x as i64).to_be_bytes().to_vec(),
                }
            }
        };
        Ok(self.words_of(big))
    }

    /// A bit value for a coil.
    pub fn encode_bit(&self, value: &Value) -> Result<bool, String> {
        as_bool(value)
    }

    fn int_range(&self) -> (i128, i128, &'static str) {
        match self.ty {
            ValueType::U16 => (0, u16::MAX as i128, "u16"),
            ValueType::I16 => (i16::MIN as i128, i16::MAX as i128, "i16"),
            ValueType::U32 => (0, u32::MAX as i128, "u32"),
            ValueType::I32 => (i32::MIN as i128, i32::MAX as i128, "i32"),
            ValueType::U64 => (0, u64::MAX as i128, "u64"),
            _ => (i64::MIN as i128, i64::MAX as i128, "i64"),
        }
    }

    /// `(value - offset) / scale`.
    fn unscale(&self, value: &Value) -> Result<f64, String> {
        let x = value
            .as_f64()
            .ok_or_else(|| format!("{value} is not a number"))?;
        Ok((x - self.offset.unwrap_or(0.0)) / self.scale.unwrap_or(1.0))
    }

    /// The value's bytes most significant first, from registers in wire order.
    fn bytes_of(&self, words: &[u16]) -> Vec<u8> {
        let mut words = words.to_vec();
        if self.word_order == Order::Little && self.ty != ValueType::String {
            words.reverse();
        }
        let mut out = Vec::with_capacity(words.len() * 2);
        for w in words {
            let b = w.to_be_bytes();
            match self.byte_order {
                Order::Big => out.extend_from_slice(&b),
                Order::Little => out.extend_from_slice(&[b[1], b[0]]),
            }
        }
        out
    }

    /// Registers in wire order from the value's bytes, most significant first.
    fn words_of(&self, bytes: Vec<u8>) -> Vec<u16> {
        let mut words: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| match self.byte_order {
                Order::Big => u16::from_be_bytes([c[0], c[1]]),
                Order::Little => u16::from_be_bytes([c[1], c[0]]),
            })
            .collect();
        if self.word_order == Order::Little && self.ty != ValueType::String {
            words.reverse();
        }
        words
    }
}

enum Raw {
    U(u64),
    I(i64),
    F(f64),
}

fn arr<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

/// A float as JSON; NaN and infinities (which JSON cannot hold) become `null`.
fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn as_bool(value: &Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
        Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
        other => Err(format!("{other} is not a bool (true, false, 1 or 0)")),
    }
}

fn range_error(value: &Value, name: &str, lo: i128, hi: i128) -> String {
    format!("{value} is out of range for {name} ({lo} to {hi} after scale and offset)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn codec(ty: ValueType) -> Codec {
        Codec {
            ty,
            length: 0,
            byte_order: Order::Big,
            word_order: Order::Big,
            scale: None,
            offset: None,
        }
    }

    #[test]
    fn floats_in_both_word_orders() {
        // 21.5f32 = 0x41AC0000.
        let mut c = codec(ValueType::F32);
        assert_eq!(c.decode(&[0x41AC, 0x0000]), json!(21.5));
        assert_eq!(c.encode(&json!(21.5)).unwrap(), [0x41AC, 0]);
        c.word_order = Order::Little;
        assert_eq!(c.decode(&[0x0000, 0x41AC]), json!(21.5));
        assert_eq!(c.encode(&json!(21.5)).unwrap(), [0, 0x41AC]);
        c.byte_order = Order::Little;
        assert_eq!(c.decode(&[0x0000, 0xAC41]), json!(21.5));
        c.scale = Some(10.0);
        assert_eq!(c.decode(&[0x0000, 0xAC41]), json!(215.0));
    }

    #[test]
    fn scale_offset_rounding_and_range() {
        let mut c = codec(ValueType::I16);
        c.scale = Some(0.1);
        assert_eq!(c.decode(&[215]), json!(21.5));
        assert_eq!(c.encode(&json!(21.5)).unwrap(), [215]);
        // Halves round away from zero.
        assert_eq!(c.encode(&json!(-0.25)).unwrap(), [(-3i16) as u16]);
        assert_eq!(c.decode(&[(-3i16) as u16]), json!(-0.30000000000000004));
        let e = c.encode(&json!(4000)).unwrap_err();
        assert!(e.contains("out of range for i16"), "{e}");
        let u = codec(ValueType::U16);
        assert!(u.encode(&json!(-1)).is_err());
        assert!(u.encode(&json!(65536)).is_err());
        assert!(u.encode(&json!("7")).is_err());
        assert_eq!(u.encode(&json!(65535)).unwrap(), [65535]);
        let mut o = codec(ValueType::U16);
        o.offset = Some(-40.0);
        assert_eq!(o.decode(&[60]), json!(20.0));
        assert_eq!(o.encode(&json!(20)).unwrap(), [60]);
    }

    #[test]
    fn wide_integers_and_strings() {
        let mut c = codec(ValueType::U32);
        assert_eq!(c.decode(&[0x0001, 0x0002]), json!(65538));
        c.word_order = Order::Little;
        assert_eq!(c.decode(&[0x0002, 0x0001]), json!(65538));
        let i = codec(ValueType::I64);
        assert_eq!(i.decode(&[0xFFFF; 4]), json!(-1));
        assert_eq!(
            i.encode(&json!(-2)).unwrap(),
            [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]
        );
        let mut s = codec(ValueType::String);
        s.length = 6;
        assert_eq!(s.width(), 3);
        assert_eq!(s.decode(&[0x4142, 0x4300, 0x0000]), json!("ABC"));
        assert_eq!(s.encode(&json!("ABC")).unwrap(), [0x4142, 0x4300, 0]);
        assert!(s.encode(&json!("ABCDEFG")).is_err());
        let b = codec(ValueType::Bool);
        assert_eq!(b.decode(&[2]), json!(true));
        assert_eq!(b.encode(&json!(false)).unwrap(), [0]);
    }
}
