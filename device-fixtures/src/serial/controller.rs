//! The simulated temperature controller's command set, with no I/O: one request line in, the
//! answer lines out. Several units may share the line (RS-485 multi-drop): each has an
//! address that prefixes the requests meant for it, and only that unit answers.
//!
//! | request   | answer lines                                   | counted as  |
//! |-----------|------------------------------------------------|-------------|
//! | `*IDN?`   | `ACME TC-100,SN1234,1.0`                       | `*IDN?`     |
//! | `TEMP?`   | `TEMP 21.5`                                    | `TEMP?`     |
//! | `SETP?`   | `SETP 20`                                      | `SETP?`     |
//! | `SETP n`  | `OK`, or a range or value error                | `SETP`      |
//! | `DUMP?`   | `T=21.5`, `SETP=20.0`, `MODE=AUTO`, `END`      | `DUMP?`     |
//! | `STAT?`   | `T=21.5`, `SETP=20.0`, `ALARM=NONE` (3 lines)  | `STAT?`     |
//! | other     | unknown command error                          | not counted |

use std::collections::BTreeMap;

/// Answer to `*IDN?`.
pub const IDENTITY: &str = "ACME TC-100,SN1234,1.0";
/// The temperature every unit reads.
pub const TEMPERATURE: f64 = 21.5;
/// Setpoint of a unit at power-up.
pub const INITIAL_SETPOINT: f64 = 20.0;
/// Accepted setpoints, inclusive.
pub const SETPOINT_RANGE: (f64, f64) = (0.0, 100.0);
/// Operating mode every unit reports in `DUMP?`.
pub const MODE: &str = "AUTO";
/// Last line of a `DUMP?` block.
pub const BLOCK_END: &str = "END";

/// How a unit words a refused command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStyle {
    /// `ERR 1 UNKNOWN COMMAND`, `ERR 2 BAD VALUE`, `ERR 3 OUT OF RANGE`.
    Numeric,
    /// `ERR:SYNTAX unknown command`, `ERR:VALUE bad value`, `ERR:RANGE setpoint out of range`.
    Text,
}

/// Why a unit refused a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Unknown,
    BadValue,
    OutOfRange,
}

impl Refusal {
    fn line(self, style: ErrorStyle) -> String {
        let text = match (style, self) {
            (ErrorStyle::Numeric, Refusal::Unknown) => "ERR 1 UNKNOWN COMMAND",
            (ErrorStyle::Numeric, Refusal::BadValue) => "ERR 2 BAD VALUE",
            (ErrorStyle::Numeric, Refusal::OutOfRange) => "ERR 3 OUT OF RANGE",
            (ErrorStyle::Text, Refusal::Unknown) => "ERR:SYNTAX unknown command",
            (ErrorStyle::Text, Refusal::BadValue) => "ERR:VALUE bad value",
            (ErrorStyle::Text, Refusal::OutOfRange) => "ERR:RANGE setpoint out of range",
        };
        text.to_owned()
    }
}

/// What a unit did with one command.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Answer lines, without terminators.
    pub lines: Vec<String>,
    /// The command's name (`SETP`, `SETP?`, ...) when the unit acted on it; `None` when it
    /// refused it.
    pub executed: Option<&'static str>,
}

impl Outcome {
    fn acted(name: &'static str, lines: Vec<String>) -> Self {
        Self {
            lines,
            executed: Some(name),
        }
    }

    fn refused(refusal: Refusal, style: ErrorStyle) -> Self {
        Self {
            lines: vec![refusal.line(style)],
            executed: None,
        }
    }
}

/// The units on one line, by address (`""` for a single unaddressed unit).
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    setpoints: BTreeMap<String, f64>,
}

impl Controller {
    /// Units with these addresses; no address gives one unit that answers every line.
    pub fn new(addresses: &[String]) -> Self {
        let setpoints = if addresses.is_empty() {
            BTreeMap::from([(String::new(), INITIAL_SETPOINT)])
        } else {
            addresses
                .iter()
                .map(|a| (a.clone(), INITIAL_SETPOINT))
                .collect()
        };
        Self { setpoints }
    }

    /// Setpoint per unit address.
    pub fn setpoints(&self) -> &BTreeMap<String, f64> {
        &self.setpoints
    }

    /// Power cycle: every unit back to its power-up setpoint.
    pub fn reset(&mut self) {
        for setpoint in self.setpoints.values_mut() {
            *setpoint = INITIAL_SETPOINT;
        }
    }

    /// The address of the unit `line` is meant for and the command for it, or `None` when no
    /// unit is addressed. The longest matching address wins ("1" and "10" may share a bus).
    pub fn route<'a>(&self, line: &'a str) -> Option<(String, &'a str)> {
        self.setpoints
            .keys()
            .filter_map(|a| line.strip_prefix(a.as_str()).map(|rest| (a.clone(), rest)))
            .max_by_key(|(a, _)| a.len())
            .map(|(a, command)| (a, command.trim()))
    }

    /// Runs `command` on the unit at `address` (as `route` gave them).
    pub fn execute(&mut self, address: &str, command: &str, style: ErrorStyle) -> Outcome {
        let Some(setpoint) = self.setpoints.get_mut(address) else {
            return Outcome::refused(Refusal::Unknown, style);
        };
        let block = |last: &str| {
            vec![
                format!("T={}", decimal(TEMPERATURE)),
                format!("SETP={}", decimal(*setpoint)),
                last.to_owned(),
            ]
        };
        match command {
            "*IDN?" => Outcome::acted("*IDN?", vec![IDENTITY.to_owned()]),
            "TEMP?" => Outcome::acted("TEMP?", vec![format!("TEMP {TEMPERATURE}")]),
            "SETP?" => Outcome::acted("SETP?", vec![format!("SETP {setpoint}")]),
            "STAT?" => Outcome::acted("STAT?", block("ALARM=NONE")),
            "DUMP?" => {
                let mut lines = block(&format!("MODE={MODE}"));
                lines.push(BLOCK_END.to_owned());
                Outcome::acted("DUMP?", lines)
            }
            _ => match command.strip_prefix("SETP ") {
                Some(value) => match value.trim().parse::<f64>() {
                    Ok(v) if (SETPOINT_RANGE.0..=SETPOINT_RANGE.1).contains(&v) => {
                        *setpoint = v;
                        Outcome::acted("SETP", vec!["OK".to_owned()])
                    }
                    Ok(_) => Outcome::refused(Refusal::OutOfRange, style),
                    Err(_) => Outcome::refused(Refusal::BadValue, style),
                },
                None => Outcome::refused(Refusal::Unknown, style),
            },
        }
    }

    /// `route` then `execute`: the outcome for the unit `line` addresses, if any.
    pub fn answer(&mut self, line: &str, style: ErrorStyle) -> Option<Outcome> {
        let (address, command) = self.route(line)?;
        Some(self.execute(&address, command, style))
    }
}

/// A number with at least one decimal: `20.0`, `21.5`.
fn decimal(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(c: &mut Controller, line: &str) -> Option<String> {
        let outcome = c.answer(line, ErrorStyle::Numeric)?;
        assert_eq!(outcome.lines.len(), 1, "{line}");
        Some(outcome.lines[0].clone())
    }

    #[test]
    fn single_unit_answers_everything() {
        let mut c = Controller::new(&[]);
        assert_eq!(one(&mut c, "*IDN?").as_deref(), Some(IDENTITY));
        assert_eq!(one(&mut c, "TEMP?").as_deref(), Some("TEMP 21.5"));
        assert_eq!(one(&mut c, "SETP?").as_deref(), Some("SETP 20"));
        assert_eq!(one(&mut c, "SETP 30").as_deref(), Some("OK"));
        assert_eq!(one(&mut c, "SETP?").as_deref(), Some("SETP 30"));
        assert_eq!(
            one(&mut c, "SETP 100.5").as_deref(),
            Some("ERR 3 OUT OF RANGE")
        );
        assert_eq!(
            one(&mut c, "SETP -1").as_deref(),
            Some("ERR 3 OUT OF RANGE")
        );
        assert_eq!(one(&mut c, "SETP warm").as_deref(), Some("ERR 2 BAD VALUE"));
        assert_eq!(one(&mut c, "FLY").as_deref(), Some("ERR 1 UNKNOWN COMMAND"));
        assert_eq!(c.setpoints()[""], 30.0);
        c.reset();
        assert_eq!(c.setpoints()[""], INITIAL_SETPOINT);
    }

    #[test]
    fn addressed_units_answer_only_their_own_lines() {
        let mut c = Controller::new(&["01".into(), "02".into()]);
        assert_eq!(one(&mut c, "01SETP 40").as_deref(), Some("OK"));
        assert_eq!(one(&mut c, "02SETP 60").as_deref(), Some("OK"));
        assert_eq!(one(&mut c, "01SETP?").as_deref(), Some("SETP 40"));
        assert_eq!(one(&mut c, "02SETP?").as_deref(), Some("SETP 60"));
        assert_eq!(one(&mut c, "03TEMP?"), None);
        assert_eq!(one(&mut c, "TEMP?"), None);
        assert_eq!(
            one(&mut c, "02BOOM").as_deref(),
            Some("ERR 1 UNKNOWN COMMAND")
        );
        let mut c = Controller::new(&["1".into(), "10".into()]);
        assert_eq!(c.route("10SETP 5"), Some(("10".to_owned(), "SETP 5")));
        assert_eq!(one(&mut c, "10SETP 5").as_deref(), Some("OK"));
        assert_eq!(c.setpoints()["10"], 5.0);
        assert_eq!(c.setpoints()["1"], INITIAL_SETPOINT);
    }

    #[test]
    fn blocks_answer_several_lines() {
        let mut c = Controller::new(&[]);
        let dump = c.answer("DUMP?", ErrorStyle::Numeric).unwrap();
        assert_eq!(dump.lines, ["T=21.5", "SETP=20.0", "MODE=AUTO", "END"]);
        assert_eq!(dump.executed, Some("DUMP?"));
        c.answer("SETP 22.5", ErrorStyle::Numeric).unwrap();
        let stat = c.answer("STAT?", ErrorStyle::Numeric).unwrap();
        assert_eq!(stat.lines, ["T=21.5", "SETP=22.5", "ALARM=NONE"]);
    }

    #[test]
    fn text_errors_and_what_counts_as_executed() {
        let mut c = Controller::new(&[]);
        let text = |c: &mut Controller, line| c.answer(line, ErrorStyle::Text).unwrap();
        let range = text(&mut c, "SETP 999");
        assert_eq!(range.lines, ["ERR:RANGE setpoint out of range"]);
        assert_eq!(range.executed, None);
        assert_eq!(text(&mut c, "FLY").lines, ["ERR:SYNTAX unknown command"]);
        assert_eq!(text(&mut c, "SETP x").lines, ["ERR:VALUE bad value"]);
        assert_eq!(text(&mut c, "SETP 5").executed, Some("SETP"));
        assert_eq!(text(&mut c, " SETP? ").executed, Some("SETP?"));
        assert_eq!(c.setpoints()[""], 5.0);
    }
}
