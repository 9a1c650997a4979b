//! A Modbus action compiled at load, no I/O: the reads it makes (values of `fields` in the
//! same table coalesced into as few requests as their addresses allow) and how their replies
//! become the result, or the write it makes from the call's values.

use super::codec::{Codec, Table};
use super::pdu::{Reply, Request, MAX_READ_BITS, MAX_READ_REGISTERS};
use crate::config::http::JsonTemplate;
use serde_json::{Map, Value};

/// A compiled Modbus action.
#[derive(Debug)]
pub enum ModbusAction {
    Read(ReadPlan),
    Write(WritePlan),
}

/// What one read item is.
#[derive(Debug, Clone)]
pub enum Shape {
    /// One typed value.
    Value(Codec),
    /// `count` raw registers (numbers) or bits (bools), as an array.
    Raw(u16),
}

impl Shape {
    /// Registers or bits it takes.
    pub fn width(&self) -> u16 {
        match self {
            Shape::Value(c) => c.width(),
            Shape::Raw(n) => *n,
        }
    }
}

/// One value read: the whole result, or one named field of it.
#[derive(Debug, Clone)]
pub struct ReadItem {
    pub name: Option<String>,
    pub table: Table,
    pub address: u16,
    pub shape: Shape,
}

/// Consecutive registers or bits read in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub table: Table,
    pub address: u16,
    pub count: u16,
}

impl Span {
    fn end(&self) -> u32 {
        self.address as u32 + self.count as u32
    }

    /// The read request of this span.
    pub fn request(&self) -> Request {
        match self.table {
            Table::Coil => Request::ReadCoils(self.address, self.count),
            Table::DiscreteInput => Request::ReadDiscreteInputs(self.address, self.count),
            Table::InputRegister => Request::ReadInputRegisters(self.address, self.count),
            Table::HoldingRegister => Request::ReadHoldingRegisters(self.address, self.count),
        }
    }
}

/// Reads and how their replies become the result.
#[derive(Debug)]
pub struct ReadPlan {
    pub items: Vec<ReadItem>,
    /// The requests, in table and address order.
    pub spans: Vec<Span>,
}

impl ReadPlan {
    /// Plans the reads of `items`: per table, items whose ranges touch or overlap share a
    /// request while it stays within one request's limit.
    pub fn new(items: Vec<ReadItem>) -> ReadPlan {
        let mut ranges: Vec<Span> = items
            .iter()
            .map(|i| Span {
                table: i.table,
                address: i.address,
                count: i.shape.width(),
            })
            .collect();
        ranges.sort_by_key(|s| (s.table, s.address, s.count));
        let mut spans: Vec<Span> = Vec::new();
        for r in ranges {
            let limit = if r.table.is_bits() {
                MAX_READ_BITS
            } else {
                MAX_READ_REGISTERS
            } as u32;
            match spans.last_mut() {
                Some(last)
                    if last.table == r.table
                        && r.address as u32 <= last.end()
                        && r.end().max(last.end()) - last.address as u32 <= limit =>
                {
                    last.count = (r.end().max(last.end()) - last.address as u32) as u16;
                }
                _ => spans.push(r),
            }
        }
        ReadPlan { items, spans }
    }

    /// The result from the replies to `spans`, in order: one value, or an object of fields.
    pub fn assemble(&self, replies: &[Reply]) -> Result<Value, String> {
        let mut object = Map::new();
        for item in &self.items {
            let (span, reply) = self
                .spans
                .iter()
                .zip(replies)
                .find(|(s, _)| {
                    s.table == item.table
                        && s.address <= item.address
                        && item.address as u32 + item.shape.width() as u32 <= s.end()
                })
                .ok_or("no reply covers a value")?;
            let at = (item.address - span.address) as usize;
            let n = item.shape.width() as usize;
            let value = match (reply, &item.shape) {
                (Reply::Bits(bits), Shape::Raw(_)) => {
                    Value::Array(bits[at..at + n].iter().map(|b| Value::Bool(*b)).collect())
                }
                (Reply::Bits(bits), Shape::Value(_)) => Value::Bool(bits[at]),
                (Reply::Words(words), Shape::Raw(_)) => {
                    Value::Array(words[at..at + n].iter().map(|w| Value::from(*w)).collect())
                }
                (Reply::Words(words), Shape::Value(codec)) => codec.decode(&words[at..at + n]),
                (Reply::Written, _) => return Err("a read was answered as a write".into()),
            };
            match &item.name {
                None => return Ok(value),
                Some(name) => {
                    object.insert(name.clone(), value);
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// One write.
#[derive(Debug)]
pub struct WritePlan {
    pub table: Table,
    pub address: u16,
    pub codec: Codec,
    /// The value: a param, a literal, or an array of them (consecutive values).
    pub value: JsonTemplate,
    /// FC 15/16 even for one coil or register.
    pub multiple: bool,
}

impl WritePlan {
    /// The request writing the call's value, or why the value cannot be written.
    pub fn request(&self, vars: &Map<String, Value>) -> Result<Request, String> {
        let value = self
            .value
            .render(vars)
            .ok_or("no value to write (the param is absent)")?;
        let values = match value {
            Value::Array(items) if !items.is_empty() => items,
            Value::Array(_) => return Err("an empty array writes nothing".into()),
            one => vec![one],
        };
        let a = self.address;
        if self.table == Table::Coil {
            let bits = values
                .iter()
                .map(|v| self.codec.encode_bit(v))
                .collect::<Result<Vec<_>, _>>()?;
            check_end(a, bits.len())?;
            return Ok(match bits.as_slice() {
                [one] if !self.multiple => Request::WriteSingleCoil(a, *one),
                _ if bits.len() > super::pdu::MAX_WRITE_BITS as usize => {
                    return Err(format!(
                        "{} coils are more than one write takes",
                        bits.len()
                    ))
                }
                _ => Request::WriteMultipleCoils(a, bits),
            });
        }
        let mut words = Vec::new();
        for v in &values {
            words.extend(self.codec.encode(v)?);
        }
        check_end(a, words.len())?;
        Ok(match words.as_slice() {
            [one] if !self.multiple => Request::WriteSingleRegister(a, *one),
            _ if words.len() > super::pdu::MAX_WRITE_REGISTERS as usize => {
                return Err(format!(
                    "{} registers are more than one write takes",
                    words.len()
                ))
            }
            _ => Request::WriteMultipleRegisters(a, words),
        })
    }
}

fn check_end(address: u16, n: usize) -> Result<(), String> {
    if address as usize + n > 65_536 {
        return Err(format!(
            "{n} values from address {address} pass address 65535"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::codec::{Order, ValueType};
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

    fn item(name: &str, table: Table, address: u16, ty: ValueType) -> ReadItem {
        ReadItem {
            name: Some(name.into()),
            table,
            address,
            shape: Shape::Value(codec(ty)),
        }
    }

    #[test]
    fn adjacent_fields_share_a_request_and_gaps_split_them() {
        let plan = ReadPlan::new(vec![
            item("v", Table::HoldingRegister, 0, ValueType::F32),
            item("i", Table::HoldingRegister, 2, ValueType::F32),
            item("f", Table::HoldingRegister, 4, ValueType::U16),
            item("far", Table::HoldingRegister, 200, ValueType::U16),
            item("run", Table::Coil, 0, ValueType::Bool),
            item("temp", Table::InputRegister, 10, ValueType::I16),
        ]);
        assert_eq!(
            plan.spans,
            [
                Span {
                    table: Table::Coil,
                    address: 0,
                    count: 1
                },
                Span {
                    table: Table::InputRegister,
                    address: 10,
                    count: 1
                },
                Span {
                    table: Table::HoldingRegister,
                    address: 0,
                    count: 5
                },
                Span {
                    table: Table::HoldingRegister,
                    address: 200,
                    count: 1
                },
            ]
        );
        let replies = [
            Reply::Bits(vec![true]),
            Reply::Words(vec![(-5i16) as u16]),
            Reply::Words(vec![0x4366, 0, 0x40A0, 0, 50]),
            Reply::Words(vec![7]),
        ];
        assert_eq!(
            plan.assemble(&replies).unwrap(),
            json!({"v": 230.0, "i": 5.0, "f": 50, "far": 7, "run": true, "temp": -5})
        );
    }

    #[test]
    fn a_long_block_is_split_at_the_request_limit() {
        let items = (0..130u16)
            .map(|a| item(&format!("r{a}"), Table::HoldingRegister, a, ValueType::U16))
            .collect();
        let plan = ReadPlan::new(items);
        assert_eq!(plan.spans.len(), 2);
        assert_eq!(plan.spans[0].count, 125);
        assert_eq!(plan.spans[1].address, 125);
    }

    #[test]
    fn writes_pick_their_function_code() {
        let plan = |table, multiple, value: Value| WritePlan {
            table,
            address: 10,
            codec: codec(ValueType::U16),
            value: JsonTemplate::Literal(value),
            multiple,
        };
        let none = Map::new();
        assert_eq!(
            plan(Table::HoldingRegister, false, json!(5)).request(&none),
            Ok(Request::WriteSingleRegister(10, 5))
        );
        assert_eq!(
            plan(Table::HoldingRegister, true, json!(5)).request(&none),
            Ok(Request::WriteMultipleRegisters(10, vec![5]))
        );
        assert_eq!(
            plan(Table::HoldingRegister, false, json!([1, 2, 3])).request(&none),
            Ok(Request::WriteMultipleRegisters(10, vec![1, 2, 3]))
        );
        assert_eq!(
            plan(Table::Coil, false, json!(true)).request(&none),
            Ok(Request::WriteSingleCoil(10, true))
        );
        assert_eq!(
            plan(Table::Coil, false, json!([true, false])).request(&none),
            Ok(Request::WriteMultipleCoils(10, vec![true, false]))
        );
        assert!(plan(Table::HoldingRegister, false, json!(70000))
            .request(&none)
            .is_err());
    }
}
